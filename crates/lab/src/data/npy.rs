//! The gradient files of `precond replay`: a (T, b, m) float32 or float64 `.npy`, C or Fortran
//! order. Parsing is separate from the file system so that it can be fuzzed
//! (`fuzz/fuzz_targets/npy.rs` includes this file).

use npyz::{DType, NpyFile, Order, TypeChar};

/// The element type of the input file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F32,
    F64,
}

/// Gradients read from a file, in C order (T, b, m).
#[derive(Clone, Debug, PartialEq)]
pub enum GradData {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// A (T, b, m) gradient sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Grads {
    pub steps: usize,
    pub rows: usize,
    pub blocks: usize,
    pub data: GradData,
}

/// Parses a (T, b, m) float32/float64 `.npy` (C or Fortran order) into C order; the error says
/// what is wrong (the caller names the file).
pub fn parse_grads(bytes: &[u8]) -> Result<Grads, String> {
    check_preamble(bytes)?;
    let npy = NpyFile::new(bytes).map_err(|e| format!("not a valid .npy file: {e}"))?;
    let header = npy.header().clone();
    let shape: Vec<u64> = header.shape().to_vec();
    let [t, b, m] = shape[..] else {
        return Err(format!(
            "expected a 3-D array (T, b, m), got shape {shape:?}"
        ));
    };
    if b == 0 || m == 0 {
        return Err(format!("b and m must be at least 1, got shape {shape:?}"));
    }
    let precision = match header.dtype() {
        DType::Plain(ts) if ts.type_char() == TypeChar::Float && ts.size_field() == 4 => {
            Precision::F32
        }
        DType::Plain(ts) if ts.type_char() == TypeChar::Float && ts.size_field() == 8 => {
            Precision::F64
        }
        other => {
            return Err(format!(
                "unsupported dtype {}: expected float32 or float64",
                other.descr()
            ))
        }
    };
    let item = if precision == Precision::F32 { 4 } else { 8 };
    let dims = [t, b, m].map(|d| usize::try_from(d).unwrap_or(usize::MAX));
    let n = dims[0]
        .checked_mul(dims[1])
        .and_then(|x| x.checked_mul(dims[2]))
        .filter(|n| n.checked_mul(item).is_some())
        .ok_or_else(|| format!("shape {shape:?} is too large"))?;
    let order = header.order();
    let data: &[u8] = npy.into_inner();
    let want = n * item;
    if data.len() < want {
        return Err(format!(
            "truncated: shape {shape:?} needs {want} data bytes, the file has {}",
            data.len()
        ));
    }
    if data.len() > want {
        return Err(format!(
            "{} unexpected bytes after the data of shape {shape:?}",
            data.len() - want
        ));
    }
    let [t, b, m] = dims;
    let read_err = |e: std::io::Error| format!("cannot read the data: {e}");
    let data = match precision {
        Precision::F32 => GradData::F32(to_c_order(
            NpyFile::with_header(header, data)
                .into_vec::<f32>()
                .map_err(read_err)?,
            order,
            [t, b, m],
        )),
        Precision::F64 => GradData::F64(to_c_order(
            NpyFile::with_header(header, data)
                .into_vec::<f64>()
                .map_err(read_err)?,
            order,
            [t, b, m],
        )),
    };
    Ok(Grads {
        steps: t,
        rows: b,
        blocks: m,
        data,
    })
}

/// Fortran order stores element (s, r, c) at s + T·(r + b·c); returns C order.
fn to_c_order<T: Copy>(v: Vec<T>, order: Order, [t, b, m]: [usize; 3]) -> Vec<T> {
    match order {
        Order::C => v,
        Order::Fortran => {
            let mut out = Vec::with_capacity(v.len());
            for s in 0..t {
                for r in 0..b {
                    for c in 0..m {
                        out.push(v[s + t * (r + b * c)]);
                    }
                }
            }
            out
        }
    }
}

/// Checks npyz cannot be made to misbehave, before it parses the file:
/// - the header-length field (v1: u16 at byte 8; v2, v3: u32) must fit in the file: npyz
///   allocates that many bytes before reading them, so a 200-byte file claiming a 4 GB header
///   aborted the process instead of being an error;
/// - the header may not nest brackets more than [`MAX_HEADER_DEPTH`] deep: npyz's Python-literal
///   parser backtracks exponentially on nesting, so 40 `{` in a 200-byte header took longer than
///   10 s (a float array's header is a flat dict holding one shape tuple: depth 2).
///
/// Both were found by `fuzz/fuzz_targets/npy.rs`. Other preambles are left to npyz's errors.
fn check_preamble(bytes: &[u8]) -> Result<(), String> {
    if !bytes.starts_with(b"\x93NUMPY") || bytes.len() < 8 {
        return Ok(());
    }
    let (len, start) = match bytes[6] {
        1 if bytes.len() >= 10 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => {
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (usize::try_from(len).unwrap_or(usize::MAX), 12)
        }
        _ => return Ok(()),
    };
    let available = bytes.len() - start;
    if len > available {
        return Err(format!(
            "truncated header: it claims {len} bytes, the file has {available} after the preamble"
        ));
    }
    let header = &bytes[start..start + len];
    check_shape_size(header)?;
    let mut depth = 0usize;
    for &byte in header {
        match byte {
            b'{' | b'[' | b'(' => {
                depth += 1;
                if depth > MAX_HEADER_DEPTH {
                    return Err(format!(
                        "header nests brackets more than {MAX_HEADER_DEPTH} deep (a float array's \
                         header is a flat dict)"
                    ));
                }
            }
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// The product of the header's `'shape'` must fit in a u64: npyz multiplies the dimensions
/// unchecked (a panic with overflow checks on, a wrapped element count without; found by
/// `fuzz/fuzz_targets/npy.rs`). Reads the integers of the tuple after the key as Python writes
/// them (digits, `_` separators); a header it cannot read this way is left to npyz.
fn check_shape_size(header: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(header);
    let Some(at) = text.find("'shape'").or_else(|| text.find("\"shape\"")) else {
        return Ok(());
    };
    let rest = text[at + 7..].trim_start();
    let Some(rest) = rest.strip_prefix(':') else {
        return Ok(());
    };
    let Some(rest) = rest.trim_start().strip_prefix('(') else {
        return Ok(());
    };
    let Some(end) = rest.find(')') else {
        return Ok(());
    };
    let mut product: u64 = 1;
    for item in rest[..end]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let digits: String = item.chars().filter(|&c| c != '_').collect();
        let Ok(dim) = digits.parse::<u128>() else {
            return Ok(());
        };
        product = u64::try_from(dim)
            .ok()
            .and_then(|d| product.checked_mul(d))
            .ok_or_else(|| format!("shape ({}) is too large", &rest[..end]))?;
    }
    Ok(())
}

/// The deepest bracket nesting accepted in a header (see [`check_preamble`]).
const MAX_HEADER_DEPTH: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use npyz::WriterBuilder;

    /// A version-3 preamble claiming a 4,286,251,126-byte header in a 40-byte file (the shape of
    /// the fuzzer's out-of-memory input): an error, not a 4 GB allocation.
    #[test]
    fn header_longer_than_the_file_is_an_error() {
        let mut bytes = b"\x93NUMPY\x03\x00".to_vec();
        bytes.extend_from_slice(&0xff7b_0076u32.to_le_bytes());
        bytes.extend_from_slice(&[b' '; 28]);
        let err = parse_grads(&bytes).unwrap_err();
        assert!(
            err.contains("truncated header") && err.contains("4286251126"),
            "{err}"
        );
        // Version 1: a u16 length.
        let mut v1 = b"\x93NUMPY\x01\x00".to_vec();
        v1.extend_from_slice(&500u16.to_le_bytes());
        v1.extend_from_slice(b"{'descr': '<f4'}");
        assert!(parse_grads(&v1).unwrap_err().contains("claims 500 bytes"));
    }

    /// The fuzzer's slow input: 40 nested `{` (npyz's parser took over 10 s); refused at once.
    #[test]
    fn deeply_nested_header_is_refused() {
        let header = format!("{}{}\n", "{".repeat(40), " ".repeat(20));
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        let started = std::time::Instant::now();
        let err = parse_grads(&bytes).unwrap_err();
        assert!(err.contains("nests brackets"), "{err}");
        assert!(started.elapsed().as_secs_f64() < 1.0);
        // A real header (depth 2) still parses.
        let shape = [1usize, 2, 2];
        let mut ok = Vec::new();
        {
            let mut w = npyz::WriteOptions::<f32>::new()
                .default_dtype()
                .shape(&shape.map(|d| d as u64))
                .writer(&mut ok)
                .begin_nd()
                .unwrap();
            w.extend([1.0f32, 2.0, 3.0, 4.0]).unwrap();
            w.finish().unwrap();
        }
        let g = parse_grads(&ok).unwrap();
        // The fuzzer's overflowing shape: the product of the dimensions exceeds u64.
        let header = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 000861293337929825053, 4444444444444, 2), }\n";
        let mut big = b"\x93NUMPY\x01\x00".to_vec();
        big.extend_from_slice(&(header.len() as u16).to_le_bytes());
        big.extend_from_slice(header.as_bytes());
        let err = parse_grads(&big).unwrap_err();
        assert!(err.contains("too large"), "{err}");
        assert_eq!((g.steps, g.rows, g.blocks), (1, 2, 2));
        assert_eq!(g.data, GradData::F32(vec![1.0, 2.0, 3.0, 4.0]));
    }
}

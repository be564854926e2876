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

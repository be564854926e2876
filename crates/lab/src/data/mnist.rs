//! MNIST in its original IDX files (gzipped or not).
//!
//! Files looked up in the data directory, `.gz` first:
//! `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
//! `t10k-labels-idx1-ubyte`. Every header is checked (magic number, counts, 28x28 images) and the
//! (decompressed) file length must equal what the header announces.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use thiserror::Error;

/// Magic number of an IDX3 (unsigned byte, 3 dimensions) image file.
pub const IMAGES_MAGIC: u32 = 2051;
/// Magic number of an IDX1 (unsigned byte, 1 dimension) label file.
pub const LABELS_MAGIC: u32 = 2049;
/// Image side length expected in MNIST.
pub const SIDE: usize = 28;
/// Pixels per image.
pub const PIXELS: usize = SIDE * SIDE;

/// Errors while reading MNIST. Each names the file and what was expected.
#[derive(Debug, Error)]
pub enum MnistError {
    #[error("{dir}: neither {stem}.gz nor {stem} found", dir = dir.display())]
    Missing { dir: PathBuf, stem: String },
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: bad magic {found}, expected {expected} ({what})")]
    BadMagic {
        file: String,
        found: u32,
        expected: u32,
        what: &'static str,
    },
    #[error("{file}: truncated: expected {expected} bytes, found {found}")]
    Truncated {
        file: String,
        expected: usize,
        found: usize,
    },
    #[error("{file}: trailing data: expected {expected} bytes, found {found}")]
    TooLong {
        file: String,
        expected: usize,
        found: usize,
    },
    #[error("{file}: images are {rows}x{cols}, expected {SIDE}x{SIDE}")]
    BadShape {
        file: String,
        rows: usize,
        cols: usize,
    },
    #[error("{file}: label {value} at index {index}, expected 0-9")]
    BadLabel {
        file: String,
        index: usize,
        value: u8,
    },
    #[error("{images} holds {n_images} images but {labels} holds {n_labels} labels")]
    CountMismatch {
        images: String,
        n_images: usize,
        labels: String,
        n_labels: usize,
    },
}

/// One split: `n` images of `PIXELS` pixels each, row-major, f32 in [0, 1].
#[derive(Debug, Clone)]
pub struct Split {
    pub images: Vec<f32>,
    /// Digit labels 0-9 (unused by the autoencoder, kept for other probes).
    #[allow(dead_code)]
    pub labels: Vec<u8>,
    pub n: usize,
}

impl Split {
    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }
}

/// The training and test splits.
#[derive(Debug, Clone)]
pub struct Mnist {
    pub train: Split,
    pub test: Split,
}

/// Load MNIST from `dir`. `limit` keeps the first N training images (the test set stays whole
/// unless `test_limit` is given).
pub fn load(
    dir: &Path,
    limit: Option<usize>,
    test_limit: Option<usize>,
) -> Result<Mnist, MnistError> {
    let train = load_split(dir, "train", limit)?;
    let test = load_split(dir, "t10k", test_limit)?;
    Ok(Mnist { train, test })
}

/// Load one split (`prefix` is `train` or `t10k`), keeping at most `limit` examples.
pub fn load_split(dir: &Path, prefix: &str, limit: Option<usize>) -> Result<Split, MnistError> {
    let (img_name, img_bytes) = read_file(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let (lbl_name, lbl_bytes) = read_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    parse_split((&img_name, &img_bytes), (&lbl_name, &lbl_bytes), limit)
}

/// One split from the (decompressed) bytes of its image and label files, each given with its
/// file name for the errors; at most `limit` examples. Separate from the file system so that it
/// can be fuzzed (`fuzz/fuzz_targets/idx.rs` includes this file).
pub fn parse_split(
    (img_name, img_bytes): (&str, &[u8]),
    (lbl_name, lbl_bytes): (&str, &[u8]),
    limit: Option<usize>,
) -> Result<Split, MnistError> {
    let (n_images, pixels) = parse_images(img_name, img_bytes)?;
    let (n_labels, labels) = parse_labels(lbl_name, lbl_bytes)?;
    if n_images != n_labels {
        return Err(MnistError::CountMismatch {
            images: img_name.to_string(),
            n_images,
            labels: lbl_name.to_string(),
            n_labels,
        });
    }
    let n = limit.map_or(n_images, |l| l.min(n_images));
    let images = pixels[..n * PIXELS]
        .iter()
        .map(|&p| f32::from(p) / 255.0)
        .collect();
    Ok(Split {
        images,
        labels: labels[..n].to_vec(),
        n,
    })
}

/// Find `stem.gz` or `stem` in `dir` and return its file name and (decompressed) bytes.
fn read_file(dir: &Path, stem: &str) -> Result<(String, Vec<u8>), MnistError> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let path = dir.join(&name);
        if !path.is_file() {
            continue;
        }
        let io = |source| MnistError::Io {
            file: name.clone(),
            source,
        };
        let raw = fs::read(&path).map_err(io)?;
        let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            GzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(io)?;
            out
        } else {
            raw
        };
        return Ok((name, bytes));
    }
    Err(MnistError::Missing {
        dir: dir.to_path_buf(),
        stem: stem.to_string(),
    })
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn check_len(file: &str, expected: usize, found: usize) -> Result<(), MnistError> {
    let file = file.to_string();
    match found.cmp(&expected) {
        std::cmp::Ordering::Less => Err(MnistError::Truncated {
            file,
            expected,
            found,
        }),
        std::cmp::Ordering::Greater => Err(MnistError::TooLong {
            file,
            expected,
            found,
        }),
        std::cmp::Ordering::Equal => Ok(()),
    }
}

/// Parse an IDX3 image file: returns the image count and the raw pixel bytes.
fn parse_images<'a>(file: &str, bytes: &'a [u8]) -> Result<(usize, &'a [u8]), MnistError> {
    const HEADER: usize = 16;
    if bytes.len() < 4 {
        return Err(MnistError::Truncated {
            file: file.to_string(),
            expected: HEADER,
            found: bytes.len(),
        });
    }
    let magic = be_u32(bytes, 0);
    if magic != IMAGES_MAGIC {
        return Err(MnistError::BadMagic {
            file: file.to_string(),
            found: magic,
            expected: IMAGES_MAGIC,
            what: "IDX3 images",
        });
    }
    if bytes.len() < HEADER {
        return Err(MnistError::Truncated {
            file: file.to_string(),
            expected: HEADER,
            found: bytes.len(),
        });
    }
    let n = be_u32(bytes, 4) as usize;
    let rows = be_u32(bytes, 8) as usize;
    let cols = be_u32(bytes, 12) as usize;
    if rows != SIDE || cols != SIDE {
        return Err(MnistError::BadShape {
            file: file.to_string(),
            rows,
            cols,
        });
    }
    check_len(file, HEADER + n * PIXELS, bytes.len())?;
    Ok((n, &bytes[HEADER..]))
}

/// Parse an IDX1 label file: returns the label count and the labels.
fn parse_labels<'a>(file: &str, bytes: &'a [u8]) -> Result<(usize, &'a [u8]), MnistError> {
    const HEADER: usize = 8;
    if bytes.len() < 4 {
        return Err(MnistError::Truncated {
            file: file.to_string(),
            expected: HEADER,
            found: bytes.len(),
        });
    }
    let magic = be_u32(bytes, 0);
    if magic != LABELS_MAGIC {
        return Err(MnistError::BadMagic {
            file: file.to_string(),
            found: magic,
            expected: LABELS_MAGIC,
            what: "IDX1 labels",
        });
    }
    if bytes.len() < HEADER {
        return Err(MnistError::Truncated {
            file: file.to_string(),
            expected: HEADER,
            found: bytes.len(),
        });
    }
    let n = be_u32(bytes, 4) as usize;
    check_len(file, HEADER + n, bytes.len())?;
    let labels = &bytes[HEADER..];
    if let Some(index) = labels.iter().position(|&l| l > 9) {
        return Err(MnistError::BadLabel {
            file: file.to_string(),
            index,
            value: labels[index],
        });
    }
    Ok((n, labels))
}

#[cfg(test)]
/// Encode images as an IDX3 file (used by tests to write fixtures).
pub fn encode_images(pixels: &[u8], n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + pixels.len());
    for v in [IMAGES_MAGIC, n as u32, SIDE as u32, SIDE as u32] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

#[cfg(test)]
/// Encode labels as an IDX1 file (used by tests to write fixtures).
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    for v in [LABELS_MAGIC, labels.len() as u32] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(labels);
    out
}

#[cfg(test)]
/// Gzip `bytes` (used by tests to write fixtures).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    enc.write_all(bytes).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

#[cfg(test)]
/// Write a small synthetic MNIST (`n_train` and `n_test` images) into `dir`, gzipped or raw.
/// Each image is a bright square whose position depends on the label, plus a little noise, so
/// an autoencoder has something to learn.
pub fn write_fixture(dir: &Path, n_train: usize, n_test: usize, gz: bool) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for (prefix, n) in [("train", n_train), ("t10k", n_test)] {
        let mut pixels = vec![0u8; n * PIXELS];
        let mut labels = vec![0u8; n];
        for i in 0..n {
            let label = (next() % 10) as u8;
            labels[i] = label;
            let (r0, c0) = (2 + 2 * label as usize, 4 + (label as usize % 5) * 4);
            for r in 0..SIDE {
                for c in 0..SIDE {
                    let inside = (r0..r0 + 8).contains(&r) && (c0..c0 + 8).contains(&c);
                    let noise = (next() % 40) as u8;
                    pixels[i * PIXELS + r * SIDE + c] = if inside { 215 + noise } else { noise };
                }
            }
        }
        let files = [
            (
                format!("{prefix}-images-idx3-ubyte"),
                encode_images(&pixels, n),
            ),
            (
                format!("{prefix}-labels-idx1-ubyte"),
                encode_labels(&labels),
            ),
        ];
        for (name, bytes) in files {
            if gz {
                fs::write(dir.join(format!("{name}.gz")), gzip(&bytes))?;
            } else {
                fs::write(dir.join(name), bytes)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_gzipped_and_raw_fixtures_alike() {
        let tmp = tempfile::tempdir().unwrap();
        let (gz, raw) = (tmp.path().join("gz"), tmp.path().join("raw"));
        write_fixture(&gz, 30, 7, true).unwrap();
        write_fixture(&raw, 30, 7, false).unwrap();
        let a = load(&gz, None, None).unwrap();
        let b = load(&raw, None, None).unwrap();
        assert_eq!((a.train.n, a.test.n), (30, 7));
        assert_eq!(a.train.images.len(), 30 * PIXELS);
        assert_eq!(a.train.images, b.train.images);
        assert_eq!(a.test.labels, b.test.labels);
        assert!(a.train.images.iter().all(|&p| (0.0..=1.0).contains(&p)));
        assert!(a.train.images.iter().any(|&p| p > 0.8));
    }

    #[test]
    fn pixels_are_scaled_to_unit_interval_and_limit_keeps_first() {
        let tmp = tempfile::tempdir().unwrap();
        let mut pixels = vec![0u8; 3 * PIXELS];
        pixels[0] = 255;
        pixels[1] = 51;
        pixels[PIXELS] = 102;
        for (name, bytes) in [
            ("train-images-idx3-ubyte", encode_images(&pixels, 3)),
            ("train-labels-idx1-ubyte", encode_labels(&[7, 1, 2])),
            ("t10k-images-idx3-ubyte", encode_images(&pixels, 3)),
            ("t10k-labels-idx1-ubyte", encode_labels(&[0, 0, 9])),
        ] {
            fs::write(tmp.path().join(name), bytes).unwrap();
        }
        let m = load(tmp.path(), Some(2), None).unwrap();
        assert_eq!(m.train.n, 2);
        assert_eq!(m.train.labels, vec![7, 1]);
        assert_eq!(m.train.image(0)[..2], [1.0, 0.2]);
        assert_eq!(m.train.image(1)[0], 0.4);
        assert_eq!(m.test.n, 3);
    }

    #[test]
    fn bad_magic_names_file_and_expectation() {
        let tmp = tempfile::tempdir().unwrap();
        write_fixture(tmp.path(), 4, 4, true).unwrap();
        let mut bytes = encode_images(&vec![0u8; 4 * PIXELS], 4);
        bytes[..4].copy_from_slice(&1234u32.to_be_bytes());
        fs::write(tmp.path().join("train-images-idx3-ubyte.gz"), gzip(&bytes)).unwrap();
        let err = load(tmp.path(), None, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "train-images-idx3-ubyte.gz: bad magic 1234, expected 2051 (IDX3 images)"
        );

        let mut labels = encode_labels(&[1, 2, 3, 4]);
        labels[..4].copy_from_slice(&2051u32.to_be_bytes());
        write_fixture(tmp.path(), 4, 4, true).unwrap();
        fs::write(tmp.path().join("t10k-labels-idx1-ubyte.gz"), gzip(&labels)).unwrap();
        let err = load(tmp.path(), None, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "t10k-labels-idx1-ubyte.gz: bad magic 2051, expected 2049 (IDX1 labels)"
        );
    }

    #[test]
    fn truncated_and_overlong_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        write_fixture(tmp.path(), 5, 5, false).unwrap();
        let path = tmp.path().join("train-images-idx3-ubyte");
        let full = fs::read(&path).unwrap();
        fs::write(&path, &full[..full.len() - 10]).unwrap();
        let err = load(tmp.path(), None, None).unwrap_err().to_string();
        let expected = 16 + 5 * PIXELS;
        assert_eq!(
            err,
            format!(
                "train-images-idx3-ubyte: truncated: expected {expected} bytes, found {}",
                expected - 10
            )
        );

        let mut long = full.clone();
        long.push(0);
        fs::write(&path, &long).unwrap();
        let err = load(tmp.path(), None, None).unwrap_err().to_string();
        assert!(err.contains("trailing data"), "{err}");

        // A header cut short is reported too.
        fs::write(&path, &full[..10]).unwrap();
        let err = load(tmp.path(), None, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "train-images-idx3-ubyte: truncated: expected 16 bytes, found 10"
        );

        // A truncated gzip stream is an I/O error naming the file.
        write_fixture(tmp.path(), 5, 5, true).unwrap();
        let gz = tmp.path().join("t10k-images-idx3-ubyte.gz");
        let bytes = fs::read(&gz).unwrap();
        fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
        let err = load(tmp.path(), None, None).unwrap_err().to_string();
        assert!(err.starts_with("t10k-images-idx3-ubyte.gz: "), "{err}");
    }

    #[test]
    fn missing_files_and_count_mismatch_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let err = load(tmp.path(), None, None).unwrap_err().to_string();
        assert!(
            err.contains("neither train-images-idx3-ubyte.gz nor train-images-idx3-ubyte"),
            "{err}"
        );
        write_fixture(tmp.path(), 5, 5, false).unwrap();
        fs::write(
            tmp.path().join("train-labels-idx1-ubyte"),
            encode_labels(&[1, 2, 3]),
        )
        .unwrap();
        let err = load(tmp.path(), None, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "train-images-idx3-ubyte holds 5 images but train-labels-idx1-ubyte holds 3 labels"
        );
        fs::write(
            tmp.path().join("train-labels-idx1-ubyte"),
            encode_labels(&[1, 2, 3, 4, 12]),
        )
        .unwrap();
        let err = load(tmp.path(), None, None).unwrap_err().to_string();
        assert_eq!(
            err,
            "train-labels-idx1-ubyte: label 12 at index 4, expected 0-9"
        );
    }
}

//! MNIST IDX reader: arbitrary image and label bytes must give a split or an error naming the
//! file, never a panic. The input is split in two at a position given by its first two bytes.
#![no_main]

#[allow(dead_code)]
#[path = "../../crates/lab/src/mnist.rs"]
mod mnist;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let cut = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let rest = &data[2..];
    let (images, labels) = rest.split_at(cut.min(rest.len()));
    match mnist::parse_split(("images", images), ("labels", labels), Some(3)) {
        Ok(split) => {
            assert!(split.n <= 3);
            assert_eq!(split.images.len(), split.n * mnist::PIXELS);
            assert!(split.images.iter().all(|p| (0.0..=1.0).contains(p)));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("images") || msg.contains("labels"), "{msg}");
        }
    }
});

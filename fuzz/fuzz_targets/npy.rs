//! Replay's gradient reader: arbitrary bytes must give a (T, b, m) array of the right length or
//! an error, never a panic (or an allocation larger than the input implies).
#![no_main]

#[allow(dead_code)]
#[path = "../../crates/lab/src/npy.rs"]
mod npy;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = npy::parse_grads(data) {
        let n = g.steps * g.rows * g.blocks;
        match g.data {
            npy::GradData::F32(v) => assert_eq!(v.len(), n),
            npy::GradData::F64(v) => assert_eq!(v.len(), n),
        }
    }
});

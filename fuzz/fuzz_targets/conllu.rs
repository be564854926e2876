//! CoNLL-U reader: arbitrary bytes must give sentences or a `file:line` error, never a panic.
#![no_main]

#[allow(dead_code)]
#[path = "../../crates/lab/src/conllu.rs"]
mod conllu;

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.conllu");
    match conllu::parse_bytes(data, path) {
        Ok(sentences) => {
            assert!(!sentences.is_empty());
            let _ = conllu::has_tags(&sentences, conllu::TagColumn::Upos);
        }
        Err(e) => {
            // Every error names the file.
            assert!(e.to_string().contains("fuzz.conllu"), "{e}");
        }
    }
});

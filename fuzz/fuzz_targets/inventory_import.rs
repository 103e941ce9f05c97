//! The inventory importers (JSON array, JSON lines, CSV) on arbitrary input:
//! an import either yields validated credentials or a typed error naming a
//! line and field, never a panic.
#![no_main]

use keywave_coordinator::inventory::{parse_reader, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for format in [Format::Json, Format::JsonLines, Format::Csv] {
        if let Ok(creds) = parse_reader(format, data) {
            for c in &creds {
                assert!(!c.id.is_empty(), "an imported credential has an id");
            }
        }
    }
});

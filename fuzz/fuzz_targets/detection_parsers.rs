//! The webhook translators (GitHub secret scanning, GitGuardian, the generic
//! signed endpoint) on arbitrary bodies: each returns a validated detection,
//! an "ignored" verdict or a typed error, never a panic.
#![no_main]

use keywave_coordinator::detect::adapters;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = adapters::github("secret_scanning_alert", data);
    let _ = adapters::github("ping", data);
    let _ = adapters::gitguardian(data);
    let _ = adapters::generic(data);
});

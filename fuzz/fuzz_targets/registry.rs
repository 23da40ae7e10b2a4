//! Fuzz target: The registry reader (`models.toml`) with every owner's check: any text gives a registry or a clear error.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| editguard_fuzz::readers::registry(data));

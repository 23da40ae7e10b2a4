//! Fuzz target: The suite reader (`cases/*.toml`): any text gives a suite or a clear error, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| editguard_fuzz::readers::suite(data));

//! Fuzz target: The ME-PPL corpus reader: any bytes give sentences or a clear error naming the file.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| editguard_fuzz::readers::corpus(data));

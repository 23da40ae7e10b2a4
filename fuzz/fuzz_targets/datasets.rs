//! Fuzz target: The dataset readers (every task's files, COUNTERFACT, zsRE): any bytes give items or a clear error.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| editguard_fuzz::readers::datasets(data));

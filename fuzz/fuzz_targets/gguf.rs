//! Fuzz target: The GGUF reader, tokenizer and loaders: any bytes load or give a clear error naming the file, never a panic,
//! a hang or an allocation the file's size does not justify.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| editguard_fuzz::readers::gguf(data));

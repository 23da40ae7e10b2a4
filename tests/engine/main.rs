//! Engine tests: the real default model against the PyTorch reference, the architectures against golden logits of
//! tiny random models, gradients against finite differences, and the command line's error messages.

mod architectures;
mod cli;
mod fuzz_regressions;
mod generic_paths;
mod gradients;
mod harness;
mod mend;
mod methods;
mod mining;
mod reference;
mod structure;
mod support;
mod tasks;
mod tracing;

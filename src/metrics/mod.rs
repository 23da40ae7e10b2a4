//! Measurements of a (possibly edited) model.

pub mod perplexity;

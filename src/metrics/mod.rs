//! Measurements of a (possibly edited) model.

pub mod edit_quality;
pub mod perplexity;
pub mod rank_correlation;

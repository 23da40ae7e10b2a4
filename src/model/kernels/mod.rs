//! The CPU compute kernels under the forward and backward passes: matrix products on the worker pool (AVX-512 where
//! the CPU has it), tiled attention for the fast path, the prefix path and decoding, fused differentiable RMS norm
//! and gated MLP products, products with frozen or trained weights whose backward passes compute only what training
//! needs, and a vectorised `exp`.
//!
//! The architectures and caches above call these for `f32` tensors on the CPU and compose candle operations
//! everywhere else. [`NUMERICS`] names the arithmetic they do: results that are cached across runs (MEND's trained
//! editors) include it in their keys, so a change of summation order that moves results in the last bits retrains
//! them instead of comparing snapshots against an editor the current code would not train.

pub mod attention_cpu;
pub mod cpu_matmul;
pub mod fast_exp;
pub mod frozen;
pub mod fused;
pub mod generic;
pub mod prefix_attention_cpu;
pub mod simd_matmul;
pub mod tile_products;
pub mod tiled_attention;
pub mod trained_product;
pub mod workers;

/// The version of the kernels' arithmetic: bump it whenever a kernel's results change (summation order, tiling,
/// precision), so cached results computed with the old arithmetic are rebuilt.
pub const NUMERICS: &str = "editguard-cpu-kernels/2 (tiled attention)";

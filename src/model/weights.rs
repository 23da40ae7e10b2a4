//! Weight sources: tensors by their Hugging Face name, from safetensors or GGUF files.
//!
//! Architectures ask for weights by the names a Hugging Face checkpoint uses (`model.layers.3.mlp.down_proj.weight`),
//! in `(out_features, in_features)` orientation. A [`WeightSource`] hides where they come from: memory-mapped
//! safetensors shards, or a GGUF file whose names, quantisation and Q/K row order are translated by `gguf.rs`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Tensors by Hugging Face name. Sources are shared across threads: layers load (and dequantise) in parallel.
pub trait WeightSource: Sync {
    /// The tensor `name`, converted to `dtype` on `device`.
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor>;
    /// True when the source holds `name`.
    fn contains(&self, name: &str) -> bool;
    /// A short description for error messages.
    fn describe(&self) -> String;

    /// Tensor `name`, which must have `shape` (what the configuration implies): a file whose tensors disagree with
    /// its own hyper-parameters is refused at load, naming the tensor, before anything is sized from them.
    fn get_shaped(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let tensor = self.get(name, dtype, device)?;
        if tensor.dims() != shape {
            return Err(Error::model_file(
                self.describe(),
                format!("tensor `{name}` has shape {:?}; the hyper-parameters ask for {shape:?}", tensor.dims()),
            ));
        }
        Ok(tensor)
    }

    /// Returns the first of `names` that exists.
    fn get_any(&self, names: &[String], dtype: DType, device: &Device) -> Result<Tensor> {
        match names.iter().find(|n| self.contains(n)) {
            Some(name) => self.get(name, dtype, device),
            None => Err(Error::model_file(self.describe(), format!("no tensor named any of {names:?}"))),
        }
    }
}

/// Memory-mapped safetensors shards.
pub struct SafetensorsWeights {
    files: Vec<PathBuf>,
    tensors: candle_core::safetensors::MmapedSafetensors,
    names: std::collections::HashSet<String>,
}

impl SafetensorsWeights {
    /// Maps the shards (without reading them).
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let describe = || files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
        // SAFETY: the files are treated as immutable for the lifetime of the map, as candle requires.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
            .map_err(|e| Error::model_file(describe(), e.to_string()))?;
        let names = tensors.tensors().into_iter().map(|(name, _)| name).collect();
        Ok(SafetensorsWeights { files: files.to_vec(), tensors, names })
    }
}

impl WeightSource for SafetensorsWeights {
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let tensor = self.tensors.load(name, device).map_err(|e| Error::model_file(self.describe(), e.to_string()))?;
        Ok(tensor.to_dtype(dtype)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn describe(&self) -> String {
        self.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    }
}

/// Builds `count` layers with `load(index)`, spread over the available cores (dequantising GGUF weights is the
/// bulk of loading a model).
///
/// Each worker loads a consecutive range of layers and stops at its first error, and nothing is sized from `count`
/// before layers exist: a layer count the weights do not back (a corrupt `block_count` of four million, found by the
/// `gguf` fuzz target) fails at the first missing layer of each range instead of allocating and trying them all.
/// The first error in layer order is returned.
pub fn load_layers<T: Send>(count: usize, load: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, count.max(1));
    let width = count.div_ceil(threads).max(1);
    let ranges: Vec<Result<Vec<T>>> = std::thread::scope(|scope| {
        let load = &load;
        let workers: Vec<_> = (0..count)
            .step_by(width)
            .map(|first| scope.spawn(move || (first..(first + width).min(count)).map(load).collect()))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    let mut layers = Vec::new();
    for range in ranges {
        layers.extend(range?);
    }
    Ok(layers)
}

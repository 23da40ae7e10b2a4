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
/// The last layer is loaded first, alone: a layer count the weights do not back (a corrupt `block_count` of four
/// million, found by the `gguf` fuzz target) fails there, before anything is sized from it; and each worker stops at
/// its first error instead of trying every remaining layer.
pub fn load_layers<T: Send>(count: usize, load: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    let Some(rest) = count.checked_sub(1) else { return Ok(Vec::new()) };
    let last = load(rest)?;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, rest.max(1));
    let mut slots: Vec<Option<Result<T>>> = (0..rest).map(|_| None).collect();
    let width = rest.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (worker, chunk) in slots.chunks_mut(width).enumerate() {
            let load = &load;
            scope.spawn(move || {
                for (offset, slot) in chunk.iter_mut().enumerate() {
                    let layer = load(worker * width + offset);
                    let failed = layer.is_err();
                    *slot = Some(layer);
                    if failed {
                        break;
                    }
                }
            });
        }
    });
    let mut layers = Vec::with_capacity(count);
    for slot in slots {
        // A worker leaves slots empty only after an error in the same chunk, which comes first.
        layers.push(slot.expect("a slot is empty only after an error, which ends the collection first")?);
    }
    layers.push(last);
    Ok(layers)
}

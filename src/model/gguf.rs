//! GGUF files: metadata, hyper-parameters and dequantised weights under Hugging Face names.
//!
//! llama.cpp's converter renames tensors (`blk.3.ffn_down.weight`) and permutes the rows of the query and key
//! projections so that its interleaved rotary kernel can be used. [`GgufWeights`] undoes both: it serves tensors under
//! Hugging Face names, dequantised to the compute dtype, with Q/K rows put back in the half-split order that the
//! Hugging Face rotary layout expects (Gemma 3's rows are stored as they are: llama.cpp rotates them half-split). The
//! same architecture file therefore runs GGUF and safetensors checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::weights::WeightSource;
use crate::error::{Error, Result};

/// An open, memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    content: Content,
}

impl GgufFile {
    /// Maps the file and parses its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the cache publishes files atomically and never rewrites them in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        super::gguf_header::check(&map)
            .map_err(|e| Error::model_file(path.display().to_string(), format!("not a readable GGUF file: {e}")))?;
        let content = Content::read(&mut std::io::Cursor::new(&map[..]))
            .map_err(|e| Error::model_file(path.display().to_string(), format!("not a readable GGUF file: {e}")))?;
        Ok(GgufFile { path: path.to_path_buf(), map, content })
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata entries.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn error(&self, message: String) -> Error {
        Error::model_file(self.path.display().to_string(), message)
    }

    /// A metadata entry, or an error naming the key.
    pub fn value(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| self.error(format!("missing metadata key `{key}`")))
    }

    /// A string entry.
    pub fn string(&self, key: &str) -> Result<String> {
        let value = self.value(key)?;
        value.to_string().cloned().map_err(|e| self.error(format!("metadata `{key}`: {e}")))
    }

    /// An unsigned integer entry (any integer width).
    pub fn usize(&self, key: &str) -> Result<usize> {
        let value = self.value(key)?;
        let n = match value {
            Value::U8(v) => *v as u64,
            Value::U16(v) => *v as u64,
            Value::U32(v) => *v as u64,
            Value::U64(v) => *v,
            Value::I8(v) if *v >= 0 => *v as u64,
            Value::I16(v) if *v >= 0 => *v as u64,
            Value::I32(v) if *v >= 0 => *v as u64,
            Value::I64(v) if *v >= 0 => *v as u64,
            other => {
                return Err(
                    self.error(format!("metadata `{key}`: expected an unsigned integer, found {}", kind(other)))
                );
            }
        };
        usize::try_from(n).map_err(|_| self.error(format!("metadata `{key}`: {n} does not fit this machine's usize")))
    }

    /// A size entry (a count of layers, heads, units): an unsigned integer of at least 1.
    pub fn size(&self, key: &str) -> Result<usize> {
        match self.usize(key)? {
            0 => Err(self.error(format!("metadata `{key}`: expected a size of at least 1, found 0"))),
            n => Ok(n),
        }
    }

    /// The layer count (`<arch>.block_count`): a size no larger than the file's number of tensors, since every layer
    /// has some, so a corrupt count cannot size per-layer tables beyond what the file holds.
    pub fn block_count(&self, key: &str) -> Result<usize> {
        let count = self.size(key)?;
        let tensors = self.content.tensor_infos.len();
        if count > tensors {
            return Err(self.error(format!("metadata `{key}`: {count} layers, but the file holds {tensors} tensors")));
        }
        Ok(count)
    }

    /// A size entry, or `default` when the key is absent (a present but invalid entry is an error, not the default).
    pub fn size_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.content.metadata.contains_key(key) { self.size(key) } else { Ok(default) }
    }

    /// A float entry.
    pub fn f64(&self, key: &str) -> Result<f64> {
        match self.value(key)? {
            Value::F32(v) => Ok(*v as f64),
            Value::F64(v) => Ok(*v),
            other => Err(self.error(format!("metadata `{key}`: expected a float, found {}", kind(other)))),
        }
    }

    /// An array entry.
    pub fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.value(key)?.to_vec().map_err(|e| self.error(format!("metadata `{key}`: {e}")))
    }

    /// True when the file holds tensor `name` (GGUF naming).
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Tensor `name` (GGUF naming), dequantised to f32 and converted to `dtype`.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut cursor = std::io::Cursor::new(&self.map[..]);
        let quantized =
            self.content.tensor(&mut cursor, name, device).map_err(|e| self.error(format!("tensor `{name}`: {e}")))?;
        Ok(quantized.dequantize(device)?.to_dtype(dtype)?)
    }
}

/// The type of a metadata value, for errors (an array's elements are not printed: it may hold the whole vocabulary).
fn kind(value: &Value) -> String {
    match value {
        Value::Array(items) => format!("an array of {} values", items.len()),
        Value::String(text) => format!("a string of {} bytes", text.len()),
        other => format!("{other:?}"),
    }
}

/// How a GGUF tensor's rows must be reordered to get the Hugging Face layout.
#[derive(Debug, Clone, Copy)]
enum RowOrder {
    AsIs,
    /// Undo llama.cpp's rotary permutation for a projection with this many heads.
    Unpermute(usize),
}

/// Llama-family weights of a GGUF file, served under Hugging Face names.
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    naming: Naming,
}

/// How llama.cpp named (and reordered) an architecture's tensors.
#[derive(Debug, Clone, Copy)]
enum Naming {
    /// Llama: `ffn_norm` is the norm before the MLP; Q/K rows permuted for the interleaved rotary kernel.
    Llama { heads: usize, kv_heads: usize },
    /// Gemma 3: sandwich norms (`post_attention_norm`, `ffn_norm` before the MLP, `post_ffw_norm`) and per-head
    /// query/key norms; Q/K rows as in Hugging Face (llama.cpp uses the half-split rotary for Gemma).
    Gemma3,
}

impl<'a> GgufWeights<'a> {
    /// Serves `file` with the llama name mapping; `heads`/`kv_heads` drive the Q/K unpermutation.
    pub fn llama(file: &'a GgufFile, heads: usize, kv_heads: usize) -> Self {
        GgufWeights { file, naming: Naming::Llama { heads, kv_heads } }
    }

    /// Serves `file` with the Gemma 3 name mapping (no reordering).
    pub fn gemma3(file: &'a GgufFile) -> Self {
        GgufWeights { file, naming: Naming::Gemma3 }
    }

    fn translate(&self, hf_name: &str) -> Option<(String, RowOrder)> {
        let fixed = match hf_name {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(name) = fixed {
            return Some((name.to_string(), RowOrder::AsIs));
        }
        let rest = hf_name.strip_prefix("model.layers.")?;
        let (layer, suffix) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (gguf, order) = match (self.naming, suffix) {
            (_, "input_layernorm.weight") => ("attn_norm.weight", RowOrder::AsIs),
            (Naming::Llama { heads, .. }, "self_attn.q_proj.weight") => ("attn_q.weight", RowOrder::Unpermute(heads)),
            (Naming::Llama { kv_heads, .. }, "self_attn.k_proj.weight") => {
                ("attn_k.weight", RowOrder::Unpermute(kv_heads))
            }
            (Naming::Gemma3, "self_attn.q_proj.weight") => ("attn_q.weight", RowOrder::AsIs),
            (Naming::Gemma3, "self_attn.k_proj.weight") => ("attn_k.weight", RowOrder::AsIs),
            (_, "self_attn.v_proj.weight") => ("attn_v.weight", RowOrder::AsIs),
            (_, "self_attn.o_proj.weight") => ("attn_output.weight", RowOrder::AsIs),
            (Naming::Llama { .. }, "post_attention_layernorm.weight") => ("ffn_norm.weight", RowOrder::AsIs),
            (Naming::Gemma3, "post_attention_layernorm.weight") => ("post_attention_norm.weight", RowOrder::AsIs),
            (Naming::Gemma3, "pre_feedforward_layernorm.weight") => ("ffn_norm.weight", RowOrder::AsIs),
            (Naming::Gemma3, "post_feedforward_layernorm.weight") => ("post_ffw_norm.weight", RowOrder::AsIs),
            (Naming::Gemma3, "self_attn.q_norm.weight") => ("attn_q_norm.weight", RowOrder::AsIs),
            (Naming::Gemma3, "self_attn.k_norm.weight") => ("attn_k_norm.weight", RowOrder::AsIs),
            (_, "mlp.gate_proj.weight") => ("ffn_gate.weight", RowOrder::AsIs),
            (_, "mlp.up_proj.weight") => ("ffn_up.weight", RowOrder::AsIs),
            (_, "mlp.down_proj.weight") => ("ffn_down.weight", RowOrder::AsIs),
            _ => return None,
        };
        Some((format!("blk.{layer}.{gguf}"), order))
    }
}

/// Inverts llama.cpp's `permute`: GGUF rows `(head, i, half)` back to Hugging Face rows `(head, half, i)`.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let per_head = rows / heads;
    w.reshape((heads, per_head / 2, 2, cols))?.transpose(1, 2)?.reshape((rows, cols))
}

impl WeightSource for GgufWeights<'_> {
    fn get(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (gguf_name, order) = self
            .translate(name)
            .ok_or_else(|| Error::model_file(self.describe(), format!("no GGUF tensor corresponds to `{name}`")))?;
        let tensor = self.file.tensor(&gguf_name, dtype, device)?;
        Ok(match order {
            RowOrder::AsIs => tensor,
            RowOrder::Unpermute(heads) => unpermute_rows(&tensor, heads)?,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.translate(name).is_some_and(|(gguf, _)| self.file.has_tensor(&gguf))
    }

    fn describe(&self) -> String {
        self.file.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permutation, written from its definition, so the inverse can be checked against it.
    fn permute_rows(w: &Tensor, heads: usize) -> Tensor {
        let (rows, cols) = w.dims2().unwrap();
        w.reshape((heads, 2, rows / heads / 2, cols)).unwrap().transpose(1, 2).unwrap().reshape((rows, cols)).unwrap()
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let w = Tensor::arange(0f32, 48.0, &Device::Cpu).unwrap().reshape((12, 4)).unwrap();
        for heads in [1, 3] {
            let round_trip = unpermute_rows(&permute_rows(&w, heads), heads).unwrap();
            assert_eq!(round_trip.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        }
        // Not the identity: rows really move.
        let moved = unpermute_rows(&w, 3).unwrap();
        assert_ne!(moved.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}

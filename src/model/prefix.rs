//! Reusing the keys and values of a constant prefix, so that an optimisation recomputes only the tokens it affects.
//!
//! ROME and MEMIT add their vector at the subject's last token; every earlier token of a prompt is the same at every
//! optimisation step. [`KvMode::Record`] records each layer's keys and values during one plain (fast) pass;
//! [`PrefixCache::new`] keeps, for every sequence, the rows before its own start position (keys rotated for their
//! positions); later passes run with [`KvMode::Prefix`] on the remaining tokens only, whose attention reads the cached
//! prefix before their own keys. The results equal a full pass (tested); the work per step shrinks to the tokens from
//! the subject on, typically a fifth of the batch.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use super::decode::{DecodeCache, decode_attention};
use super::kernels::prefix_attention_cpu::PrefixGeometry;
use super::layers::{AttentionShape, Path, Rotary, causal_attention, softmax_last};
use super::packing::Packing;
use crate::error::{Error, Result};

/// How a pass treats attention keys and values.
#[derive(Clone, Copy, Default)]
pub enum KvMode<'a> {
    /// Ordinary attention over the batch.
    #[default]
    Plain,
    /// Ordinary attention, recording every layer's (unrotated) keys and values.
    Record(&'a KvRecorder),
    /// The batch holds only each sequence's tokens from its start on; earlier keys and values come from the cache.
    Prefix(&'a PrefixCache),
    /// Greedy decoding: the batch's keys and values are appended to a growing per-sequence cache, and attention reads
    /// it (see [`super::decode`]).
    Decode(&'a DecodeCache),
}

/// Keys and values recorded per layer during a [`KvMode::Record`] pass.
#[derive(Default)]
pub struct KvRecorder {
    layers: Mutex<Vec<(usize, Tensor, Tensor)>>,
}

impl KvRecorder {
    fn push(&self, layer: usize, k: &Tensor, v: &Tensor) {
        if let Ok(mut layers) = self.layers.lock() {
            layers.push((layer, k.detach(), v.detach()));
        }
    }

    /// A recorder holding layers recorded earlier (from [`into_layers`](Self::into_layers)), so that one recorded
    /// pass can feed several prefix caches (tensors are shared, not copied).
    pub fn from_layers(layers: Vec<(usize, Tensor, Tensor)>) -> Self {
        KvRecorder { layers: Mutex::new(layers) }
    }

    /// The recorded `(layer, keys, values)`, keys unrotated.
    pub fn into_layers(self) -> Result<Vec<(usize, Tensor, Tensor)>> {
        self.layers.into_inner().map_err(|_| Error::invalid("(prefix cache)", "lock", "poisoned"))
    }
}

/// Each sequence's keys (rotated) and values before its start position, per layer.
pub struct PrefixCache {
    starts: Vec<usize>,
    layers: Vec<(usize, Tensor, Tensor)>,
    prefix_rows: usize,
    layouts: Mutex<Vec<SuffixLayout>>,
}

/// The attention layout of every layer of a network, indexed by layer: its shape (heads, scale, window) and its
/// rotary tables, if any.
pub type LayerLayouts<'a> = [(AttentionShape, Option<&'a Rotary>)];

/// Index tensors, rotary tables and the mask of one suffix packing: the same for every step, and for every layer
/// with the same rotary base and window.
#[derive(Clone)]
struct SuffixLayout {
    lengths: Vec<usize>,
    rotary_base: Option<f64>,
    window: Option<usize>,
    key_index: Tensor,
    longest_total: usize,
    mask: Tensor,
    tables: Option<(Tensor, Tensor)>,
}

impl PrefixCache {
    /// Keeps the rows before `starts[i]` of sequence `i` from a recorded full pass over `packing`.
    pub fn new(recorder: KvRecorder, packing: &Packing, starts: &[usize], layouts: &LayerLayouts) -> Result<Self> {
        let sources: Vec<usize> = (0..starts.len()).collect();
        if starts.len() != packing.batch() {
            return Err(Error::invalid("(prefix cache)", "starts", "one start per sequence"));
        }
        Self::shared(recorder, packing, &sources, starts, layouts)
    }

    /// A cache for later sequences that share recorded prefixes: sequence `i` of the later passes continues the first
    /// `starts[i]` tokens of recorded sequence `sources[i]` (several may share one, e.g. the options of a
    /// multiple-choice item after their common context).
    pub fn shared(
        recorder: KvRecorder,
        packing: &Packing,
        sources: &[usize],
        starts: &[usize],
        layouts: &LayerLayouts,
    ) -> Result<Self> {
        let lengths = packing.lengths();
        let bad = sources.len() != starts.len()
            || sources.iter().zip(starts).any(|(&source, &start)| source >= lengths.len() || start >= lengths[source]);
        if bad {
            return Err(Error::invalid(
                "(prefix cache)",
                "starts",
                "one start per sequence, inside its source sequence",
            ));
        }
        let device = packing.positions().device().clone();
        let offsets = super::packing::offsets(lengths);
        let mut rows = Vec::new();
        for (&source, &start) in sources.iter().zip(starts) {
            rows.extend((offsets[source]..offsets[source] + start).map(|r| r as u32));
        }
        let prefix_rows = Tensor::from_vec(rows, starts.iter().sum::<usize>(), &device)?;
        let recorded = recorder.into_layers()?;
        let mut layers = Vec::with_capacity(recorded.len());
        for (layer, k, v) in recorded {
            let (shape, rotary) = *layouts.get(layer).ok_or_else(|| {
                Error::invalid("(prefix cache)", "layer", format!("layer {layer} has no attention layout"))
            })?;
            let (k, v) =
                (k.contiguous()?.index_select(&prefix_rows, 0)?, v.contiguous()?.index_select(&prefix_rows, 0)?);
            let k = match rotary {
                Some(rotary) => rotate_prefix(&k, starts, shape, rotary)?,
                None => k,
            };
            layers.push((layer, k, v));
        }
        let prefix_rows = starts.iter().sum();
        Ok(PrefixCache { starts: starts.to_vec(), layers, prefix_rows, layouts: Mutex::new(Vec::new()) })
    }

    /// The layout for `packing` and a layer's rotary tables and window, built on first use and reused while the
    /// packing stays the same.
    fn layout(
        &self,
        packing: &Packing,
        shape: AttentionShape,
        rotary: Option<&Rotary>,
        dtype: DType,
    ) -> Result<SuffixLayout> {
        let mut built = self.layouts.lock().map_err(|_| Error::invalid("(prefix cache)", "lock", "poisoned"))?;
        let rotary_base = rotary.map(Rotary::base);
        built.retain(|l| l.lengths == packing.lengths());
        if let Some(layout) = built.iter().find(|l| l.rotary_base == rotary_base && l.window == shape.window) {
            return Ok(layout.clone());
        }
        let device = packing.positions().device();
        let starts = &self.starts;
        let batch = packing.batch();
        let longest_total = starts.iter().zip(packing.lengths()).map(|(s, l)| s + l).max().unwrap_or(1);
        let mut key_index = Vec::with_capacity(batch * longest_total);
        let (mut prefix_offset, mut own_offset) = (0usize, 0usize);
        for (&start, &length) in starts.iter().zip(packing.lengths()) {
            for j in 0..longest_total {
                let index = if j < start {
                    prefix_offset + j
                } else if j < start + length {
                    self.prefix_rows + own_offset + (j - start)
                } else {
                    self.prefix_rows + own_offset + length - 1
                };
                key_index.push(index as u32);
            }
            prefix_offset += start;
            own_offset += length;
        }
        let positions: Vec<u32> =
            starts.iter().zip(packing.lengths()).flat_map(|(&s, &l)| s as u32..(s + l) as u32).collect();
        let positions = Tensor::from_vec(positions, packing.rows(), device)?;
        let layout = SuffixLayout {
            lengths: packing.lengths().to_vec(),
            rotary_base,
            window: shape.window,
            key_index: Tensor::from_vec(key_index, batch * longest_total, device)?,
            longest_total,
            mask: prefix_mask(starts, packing.longest(), longest_total, shape, dtype, device)?,
            tables: rotary.map(|r| r.tables_at(&positions)).transpose()?,
        };
        built.push(layout.clone());
        Ok(layout)
    }

    /// The start position of every sequence.
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    fn layer(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        self.layers
            .iter()
            .find(|(l, _, _)| *l == layer)
            .map(|(_, k, v)| (k, v))
            .ok_or_else(|| Error::invalid("(prefix cache)", "layer", format!("layer {layer} was not recorded")))
    }
}

/// Rotates packed prefix keys for positions `0..start` of each sequence.
fn rotate_prefix(k: &Tensor, starts: &[usize], shape: AttentionShape, rotary: &Rotary) -> Result<Tensor> {
    let positions: Vec<u32> = starts.iter().flat_map(|&s| 0..s as u32).collect();
    if positions.is_empty() {
        return Ok(k.clone());
    }
    let positions = Tensor::from_vec(positions, k.dim(0)?, k.device())?;
    Ok(rotary.apply_at_rows(k, &positions, shape.kv_heads, shape.head_dim)?)
}

/// Attention for layer `layer` in the given mode; see [`causal_attention`] for the plain case.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    packing: &Packing,
    shape: AttentionShape,
    rotary: Option<&Rotary>,
    path: Path,
    mode: KvMode,
) -> Result<Tensor> {
    match mode {
        KvMode::Plain => Ok(causal_attention(q, k, v, packing, shape, rotary, path)?),
        KvMode::Record(recorder) => {
            recorder.push(layer, k, v);
            Ok(causal_attention(q, k, v, packing, shape, rotary, path)?)
        }
        KvMode::Prefix(cache) => prefix_attention(layer, q, k, v, packing, cache, shape, rotary, path),
        KvMode::Decode(cache) => decode_attention(layer, q, k, v, packing, cache, shape, rotary),
    }
}

/// Attention of the tokens from each sequence's start on, over the cached prefix and themselves: one differentiable
/// CPU operation for `f32` on the CPU ([`super::kernels::prefix_attention_cpu`]), composed candle operations otherwise.
#[allow(clippy::too_many_arguments)]
fn prefix_attention(
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    packing: &Packing,
    cache: &PrefixCache,
    shape: AttentionShape,
    rotary: Option<&Rotary>,
    path: Path,
) -> Result<Tensor> {
    let AttentionShape { heads, kv_heads, head_dim, scale, .. } = shape;
    let (prefix_k, prefix_v) = cache.layer(layer)?;
    if super::kernels::fused::supports(q) {
        let geometry = PrefixGeometry { starts: cache.starts.clone(), lengths: packing.lengths().to_vec(), shape };
        return super::kernels::prefix_attention_cpu::prefix_attention(
            q,
            k,
            v,
            (prefix_k, prefix_v),
            &geometry,
            rotary,
        );
    }
    let layout = cache.layout(packing, shape, rotary, q.dtype())?;
    let (q, k) = match (rotary, &layout.tables) {
        (Some(rotary), Some((cos, sin))) => (
            rotary.apply_with_tables(q, cos, sin, heads, head_dim)?,
            rotary.apply_with_tables(k, cos, sin, kv_heads, head_dim)?,
        ),
        _ => (q.clone(), k.clone()),
    };
    // Full key/value rows per sequence: its prefix rows, then its own rows.
    let batch = packing.batch();
    let (longest_total, longest_query) = (layout.longest_total, packing.longest());
    let gather = |prefix: &Tensor, own: &Tensor| -> Result<Tensor> {
        let all = Tensor::cat(&[prefix, &own.contiguous()?], 0)?;
        Ok(all
            .index_select(&layout.key_index, 0)?
            .reshape((batch, longest_total, kv_heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (k, v) = (gather(prefix_k, &k)?, gather(prefix_v, v)?);
    let repeat = heads / kv_heads;
    let k = candle_transformers::utils::repeat_kv(k, repeat)?.contiguous()?;
    let v = candle_transformers::utils::repeat_kv(v, repeat)?.contiguous()?;
    let q = packing.pad(&q)?.reshape((batch, longest_query, heads, head_dim))?.transpose(1, 2)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * f64::from(scale))?;
    let weights = softmax_last(&scores.broadcast_add(&layout.mask)?, path)?;
    let context = weights.matmul(&v)?.transpose(1, 2)?.reshape((batch, longest_query, heads * head_dim))?;
    Ok(packing.unpad(&context)?)
}

/// `(batch, 1, queries, keys)` additive mask: query `i` of a sequence starting at `s` sees the keys the layer lets
/// position `s + i` see (`0..=s + i`, or its sliding window).
fn prefix_mask(
    starts: &[usize],
    queries: usize,
    keys: usize,
    shape: AttentionShape,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let mut mask = Vec::with_capacity(starts.len() * queries * keys);
    for &start in starts {
        for i in 0..queries {
            mask.extend((0..keys).map(|j| if shape.sees(start + i, j) { 0.0 } else { f32::NEG_INFINITY }));
        }
    }
    Ok(Tensor::from_vec(mask, (starts.len(), 1, queries, keys), device)?.to_dtype(dtype)?)
}

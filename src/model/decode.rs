//! The key/value cache of greedy decoding and its attention kernel.
//!
//! Generation appends one token per sequence per step, so its cache must grow without copying what it holds: every
//! sequence keeps its own growing buffers of (rotated) keys and values per layer, and a prefix shared by all
//! sequences (e.g. the few-shot examples every GSM8K prompt starts with) is stored once and read by all. A pass in
//! [`KvMode::Decode`](super::KvMode::Decode) appends the batch's keys and values to the buffers of their sequences
//! and attends, for each new token, to the shared prefix, the sequence's earlier tokens and itself. The kernel works
//! on host `f32` values (like [`super::attention_cpu`]), sequences shared out across the cores; it has no backward
//! pass, which decoding does not need.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use super::attention_cpu::dot;
use super::fast_exp::{exp_f32, with_simd};
use super::layers::{AttentionShape, Rotary};
use super::packing::Packing;
use super::prefix::{KvRecorder, LayerLayouts};
use crate::error::{Error, Result};

/// Packed key rows (rotated) and value rows, `kv_heads·head_dim` values each.
#[derive(Clone, Default)]
struct KvRows {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// Keys (rotated) and values of a prefix every sequence starts with, per layer.
pub struct SharedPrefix {
    rows: usize,
    layers: Vec<KvRows>,
}

impl SharedPrefix {
    /// No shared prefix.
    pub fn empty(layers: usize) -> Arc<Self> {
        Arc::new(SharedPrefix { rows: 0, layers: vec![KvRows::default(); layers] })
    }

    /// The prefix recorded by a [`KvMode::Record`](super::KvMode::Record) pass over one sequence of `rows` tokens.
    pub fn recorded(recorder: KvRecorder, rows: usize, layouts: &LayerLayouts) -> Result<Arc<Self>> {
        let mut result = vec![KvRows::default(); layouts.len()];
        let positions: Vec<usize> = (0..rows).collect();
        for (layer, k, v) in recorder.into_layers()? {
            let (slot, (shape, rotary)) = result
                .get_mut(layer)
                .zip(layouts.get(layer))
                .ok_or_else(|| Error::invalid("(decode cache)", "layer", "out of range"))?;
            let mut k = host_values(&k)?;
            if let Some(rotary) = rotary {
                rotary.rotate_packed(&mut k, shape.kv_heads, shape.head_dim, &positions);
            }
            *slot = KvRows { keys: k, values: host_values(&v)? };
        }
        Ok(Arc::new(SharedPrefix { rows, layers: result }))
    }

    /// Tokens in the prefix.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// The growing keys and values of a batch of sequences being decoded.
pub struct DecodeCache {
    shared: Arc<SharedPrefix>,
    /// Per layer, per sequence: its own keys (rotated) and values so far.
    own: Vec<Mutex<Vec<KvRows>>>,
}

impl DecodeCache {
    /// An empty cache for `sequences` sequences continuing `shared`.
    pub fn new(shared: Arc<SharedPrefix>, sequences: usize) -> Self {
        let own = (0..shared.layers.len()).map(|_| Mutex::new(vec![KvRows::default(); sequences])).collect();
        DecodeCache { shared, own }
    }

    /// Drops the sequences whose `keep` flag is false (finished ones); later passes hold the kept ones, in order.
    pub fn retain(&self, keep: &[bool]) -> Result<()> {
        for layer in &self.own {
            let mut rows = layer.lock().map_err(|_| Error::invalid("(decode cache)", "lock", "poisoned"))?;
            if rows.len() != keep.len() {
                return Err(Error::invalid("(decode cache)", "keep", "one flag per cached sequence"));
            }
            let mut flags = keep.iter();
            rows.retain(|_| *flags.next().unwrap_or(&false));
        }
        Ok(())
    }
}

fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Attention of the batch's new tokens over the shared prefix, their sequence's cached tokens and themselves;
/// appends the new keys and values to the cache.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    layer: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    packing: &Packing,
    cache: &DecodeCache,
    shape: AttentionShape,
    rotary: Option<&Rotary>,
) -> Result<Tensor> {
    let AttentionShape { heads, kv_heads, head_dim, .. } = shape;
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let mut own = cache
        .own
        .get(layer)
        .ok_or_else(|| Error::invalid("(decode cache)", "layer", format!("no layer {layer}")))?
        .lock()
        .map_err(|_| Error::invalid("(decode cache)", "lock", "poisoned"))?;
    if own.len() != packing.batch() {
        return Err(Error::invalid("(decode cache)", "batch", "one sequence of the pass per cached sequence"));
    }
    let (mut q_values, mut k_values, v_values) = (host_values(q)?, host_values(k)?, host_values(v)?);
    let earlier: Vec<usize> = own.iter().map(|rows| rows.keys.len() / kv_width).collect();
    let positions: Vec<usize> = earlier
        .iter()
        .zip(packing.lengths())
        .flat_map(|(&before, &length)| (0..length).map(move |i| cache.shared.rows + before + i))
        .collect();
    if let Some(rotary) = rotary {
        rotary.rotate_packed(&mut q_values, heads, head_dim, &positions);
        rotary.rotate_packed(&mut k_values, kv_heads, head_dim, &positions);
    }
    let mut row = 0;
    for (rows, &length) in own.iter_mut().zip(packing.lengths()) {
        rows.keys.extend_from_slice(&k_values[row * kv_width..(row + length) * kv_width]);
        rows.values.extend_from_slice(&v_values[row * kv_width..(row + length) * kv_width]);
        row += length;
    }
    let shared = &cache.shared.layers[layer];
    let mut out = vec![0f32; packing.rows() * q_width];
    let threads = super::workers::threads().min(packing.batch());
    let per_thread = packing.batch().div_ceil(threads.max(1));
    let mut pieces = Vec::new();
    let mut rest: &mut [f32] = &mut out;
    let mut first_row = 0;
    for (index, sequences) in own.chunks(per_thread).enumerate() {
        let lengths = &packing.lengths()[index * per_thread..index * per_thread + sequences.len()];
        let rows: usize = lengths.iter().sum();
        let (mine, others) = rest.split_at_mut(rows * q_width);
        rest = others;
        let queries = &q_values[first_row * q_width..(first_row + rows) * q_width];
        first_row += rows;
        pieces.push((sequences, lengths, queries, mine));
    }
    super::workers::for_each_item(pieces, |(sequences, lengths, queries, mine)| {
        with_simd(|| {
            let mut weights = Vec::new();
            let mut query_row = 0;
            for (rows, &length) in sequences.iter().zip(lengths) {
                let visible_before = cache.shared.rows + rows.keys.len() / kv_width - length;
                for i in 0..length {
                    let query = &queries[(query_row + i) * q_width..][..q_width];
                    let target = &mut mine[(query_row + i) * q_width..][..q_width];
                    let parts = [shared, rows];
                    attend(query, &parts, visible_before + i + 1, shape, &mut weights, target);
                }
                query_row += length;
            }
        })
    });
    Ok(Tensor::from_vec(out, (packing.rows(), q_width), q.device())?.to_dtype(q.dtype())?)
}

/// One query's attention over the rows it sees among the first `visible` rows of the concatenated `parts` (all of
/// them, or the last `window` under a sliding window: earlier rows are skipped, not masked), written into `target`.
/// Key and value rows are read once each for all heads, in memory order.
#[inline(always)]
fn attend(
    query: &[f32],
    parts: &[&KvRows; 2],
    visible: usize,
    shape: AttentionShape,
    weights: &mut Vec<f32>,
    target: &mut [f32],
) {
    let AttentionShape { heads, kv_heads, head_dim, scale, .. } = shape;
    let kv_width = kv_heads * head_dim;
    let group = heads / kv_heads;
    let first = shape.first_visible(visible - 1);
    let seen = visible - first;
    weights.clear();
    weights.resize(heads * seen, 0.0);
    // The rows of each part that are seen, as (part, its first global row, local rows).
    let mut spans = Vec::with_capacity(parts.len());
    let mut start = 0;
    for part in parts {
        let rows = (part.keys.len() / kv_width).min(visible - start);
        let local = first.saturating_sub(start).min(rows)..rows;
        spans.push((*part, start, local));
        start += rows;
    }
    for (part, start, local) in &spans {
        for r in local.clone() {
            let key = &part.keys[r * kv_width..][..kv_width];
            for head in 0..heads {
                let column = (head / group) * head_dim;
                weights[head * seen + start + r - first] =
                    dot(&query[head * head_dim..][..head_dim], &key[column..][..head_dim]) * scale;
            }
        }
    }
    for head in 0..heads {
        let row = &mut weights[head * seen..][..seen];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0f32;
        for weight in row.iter_mut() {
            *weight = exp_f32(*weight - max);
            total += *weight;
        }
        let inverse = 1.0 / total;
        row.iter_mut().for_each(|w| *w *= inverse);
    }
    target.fill(0.0);
    for (part, start, local) in &spans {
        for r in local.clone() {
            let value = &part.values[r * kv_width..][..kv_width];
            for head in 0..heads {
                let column = (head / group) * head_dim;
                let p = weights[head * seen + start + r - first];
                for (t, &x) in target[head * head_dim..][..head_dim].iter_mut().zip(&value[column..][..head_dim]) {
                    *t += p * x;
                }
            }
        }
    }
}

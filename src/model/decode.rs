//! The key/value cache of greedy decoding and its attention kernel.
//!
//! Generation appends one token per sequence per step, so its cache must grow without copying what it holds: every
//! sequence keeps its own growing buffers of (rotated) keys and values per layer, and a prefix shared by all
//! sequences (e.g. the few-shot examples every GSM8K prompt starts with) is stored once and read by all. A pass in
//! [`KvMode::Decode`](super::KvMode::Decode) appends the batch's keys and values to the buffers of their sequences
//! and attends, for each new token, to the shared prefix, the sequence's earlier tokens and itself, through the tiled
//! kernel ([`super::kernels::tiled_attention`]: per sequence and key/value head, the new tokens of every query head of the group
//! form one block, so each cached key and value row is read once for the whole group); blocks are shared out across
//! the cores. It has no backward pass, which decoding does not need.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use super::kernels::attention_cpu::{BlockRows, SharedOutput, attend_positions, position_blocks};
use super::kernels::tiled_attention::KeyRows;
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
    // Blocks: per sequence and key/value head, runs of the new tokens (usually one: every query head of the group).
    let first_rows = super::packing::offsets(packing.lengths());
    let blocks: Vec<(usize, usize, std::ops::Range<usize>)> = (0..packing.batch())
        .flat_map(|s| position_blocks(packing.lengths()[s], shape).map(move |(kv_head, new)| (s, kv_head, new)))
        .collect();
    let target = SharedOutput::new(&mut out);
    let own = &*own;
    super::kernels::workers::for_each_item(blocks, |(s, kv_head, new)| {
        let cached = own[s].keys.len() / kv_width;
        // Positions: the shared prefix, then the sequence's rows (the new ones last).
        let before = cache.shared.rows + cached - packing.lengths()[s];
        let column = kv_head * head_dim;
        let keys = KeyRows {
            parts: [(&shared.keys[..], cache.shared.rows), (&own[s].keys[..], cached)],
            width: kv_width,
            column,
            head_dim,
        };
        let values = KeyRows {
            parts: [(&shared.values[..], cache.shared.rows), (&own[s].values[..], cached)],
            width: kv_width,
            column,
            head_dim,
        };
        let positions = before + new.start..before + new.end;
        let block = BlockRows::new(first_rows[s], before, positions, kv_head, shape);
        attend_positions(&q_values, &block, (&keys, &values), shape, &target, None);
    });
    Ok(Tensor::from_vec(out, (packing.rows(), q_width), q.device())?.to_dtype(q.dtype())?)
}

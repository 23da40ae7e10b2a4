//! The runs of a causal trace: the clean run with every layer's states, the corrupted runs with their keys and
//! values, and the restored runs, batched one centre layer at a time.
//!
//! A restoration centred on layer `L` at token `t` changes nothing below the first layer of its window and nothing
//! at tokens before `t` (attention is causal). Its run therefore starts from the corrupted runs' residual stream
//! below the window, holds only the tokens from `t` on, and reads the earlier tokens' keys and values from the
//! corrupted runs' recording. All restored tokens × noise samples of one centre layer are one packed batch.

use std::sync::Mutex;

use candle_core::{DType, Tensor};

use super::{Kind, Noise, sites_of, softmax, window_layers};
use crate::error::{Error, Result};
use crate::model::{
    Hook, HookPoint, HookSet, KvMode, KvRecorder, LoadedModel, Packing, Path, ReplaceAtSites, Site,
};

/// Records the whole packed activation at some hook points of every layer.
struct RecordLayers {
    points: Vec<HookPoint>,
    seen: Mutex<Vec<(usize, HookPoint, Tensor)>>,
}

impl RecordLayers {
    fn new(points: Vec<HookPoint>) -> Self {
        RecordLayers { points, seen: Mutex::new(Vec::new()) }
    }

    /// The activations recorded at `point`, in layer order.
    fn layers(&self, point: HookPoint, layers: usize) -> Result<Vec<Tensor>> {
        let seen = self.seen.lock().map_err(|_| Error::invalid("(trace)", "lock", "poisoned"))?;
        (0..layers)
            .map(|layer| {
                seen.iter().find(|(l, p, _)| *l == layer && *p == point).map(|(_, _, x)| x.clone()).ok_or_else(|| {
                    Error::invalid("(trace)", "hook", format!("{point:?} of layer {layer} was not recorded"))
                })
            })
            .collect()
    }
}

impl Hook for RecordLayers {
    fn visit(&self, layer: usize, point: HookPoint, x: Tensor, _packing: &Packing) -> Result<Tensor> {
        if self.points.contains(&point)
            && let Ok(mut seen) = self.seen.lock()
        {
            seen.push((layer, point, x.clone()));
        }
        Ok(x)
    }
}

/// The clean run: `(tokens, hidden)` block and MLP outputs of every layer, and p(target) at the last token.
pub(super) struct CleanRun {
    block: Vec<Tensor>,
    mlp: Vec<Tensor>,
    pub(super) p: f64,
}

impl CleanRun {
    fn states(&self, point: HookPoint) -> &[Tensor] {
        if point == HookPoint::MlpOutput { &self.mlp } else { &self.block }
    }
}

/// The corrupted runs, one packed sequence per noise sample.
pub(super) struct CorruptedRun {
    /// The noised embeddings, `(samples · tokens, hidden)`.
    embedded: Tensor,
    /// Every layer's block output.
    block: Vec<Tensor>,
    /// Every layer's keys and values.
    kv: Vec<(usize, Tensor, Tensor)>,
    packing: Packing,
    samples: usize,
    pub(super) p: f64,
}

/// p(target) of every row of `logits` `(rows, vocab)`.
fn target_probabilities(logits: &Tensor, target: u32) -> Result<Vec<f64>> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    rows.iter()
        .map(|row| {
            softmax(row).get(target as usize).copied().ok_or_else(|| {
                Error::invalid("(trace)", "target", format!("token {target} is outside the vocabulary"))
            })
        })
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

pub(super) fn clean_run(model: &LoadedModel, ids: &[u32], target: u32) -> Result<CleanRun> {
    let layers = model.dims().layers;
    let batch = model.batch(&[ids])?;
    let record = RecordLayers::new(vec![HookPoint::BlockOutput, HookPoint::MlpOutput]);
    let hidden = model.hidden_states(&batch, &record, Path::Fast)?;
    let logits = model.logits_at(&hidden, &batch.packing, &[(0, ids.len() - 1)], Path::Fast)?;
    let p = target_probabilities(&logits, target)?[0];
    let (block, mlp) = (record.layers(HookPoint::BlockOutput, layers)?, record.layers(HookPoint::MlpOutput, layers)?);
    Ok(CleanRun { block, mlp, p })
}

/// The noised embeddings of `samples` copies of `ids`.
fn noised_embeddings(model: &LoadedModel, ids: &[u32], noise: &Noise) -> Result<(crate::model::PackedBatch, Tensor)> {
    let sequences = vec![ids; noise.samples];
    let batch = model.batch(&sequences)?;
    let embedded = (model.embed(&batch)? + &noise.rows)?;
    Ok((batch, embedded))
}

pub(super) fn corrupted_run(model: &LoadedModel, ids: &[u32], target: u32, noise: &Noise) -> Result<CorruptedRun> {
    let layers = model.dims().layers;
    let (batch, embedded) = noised_embeddings(model, ids, noise)?;
    let record = RecordLayers::new(vec![HookPoint::BlockOutput]);
    let recorder = KvRecorder::default();
    let kv = KvMode::Record(&recorder);
    let hidden = model.run_layers_kv(embedded.clone(), &batch.packing, 0..layers, &record, Path::Fast, kv)?;
    let last = sites_of(noise.samples, ids.len() - 1);
    let logits = model.logits_at(&hidden, &batch.packing, &last, Path::Fast)?;
    let p = mean(&target_probabilities(&logits, target)?);
    Ok(CorruptedRun {
        embedded,
        block: record.layers(HookPoint::BlockOutput, layers)?,
        kv: recorder.into_layers()?,
        packing: batch.packing,
        samples: noise.samples,
        p,
    })
}

/// Rows `index` of `x`.
fn rows(x: &Tensor, index: &[usize]) -> Result<Tensor> {
    let index: Vec<u32> = index.iter().map(|&i| i as u32).collect();
    let index = Tensor::from_vec(index.clone(), index.len(), x.device())?;
    Ok(x.index_select(&index, 0)?)
}

/// `p_restored[i][layer]` for every restored position `positions[i]` and centre layer: one packed batch per layer.
#[allow(clippy::too_many_arguments)]
pub(super) fn restored(
    model: &LoadedModel,
    ids: &[u32],
    target: u32,
    kind: Kind,
    window: usize,
    positions: &[usize],
    clean: &CleanRun,
    corrupted: &CorruptedRun,
) -> Result<Vec<Vec<f64>>> {
    let layers = model.dims().layers;
    let (tokens, samples) = (ids.len(), corrupted.samples);
    // Sequence (position i, sample k) holds tokens positions[i].. of corrupted sequence k.
    let (mut source_rows, mut lengths, mut starts, mut sources, mut clean_rows) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &position in positions {
        for sample in 0..samples {
            source_rows.extend(sample * tokens + position..(sample + 1) * tokens);
            lengths.push(tokens - position);
            starts.push(position);
            sources.push(sample);
            clean_rows.push(position);
        }
    }
    let packing = Packing::starting_at(&lengths, &starts, &model.device)?;
    let restored_sites: Vec<Site> = (0..lengths.len()).map(|sequence| (sequence, 0)).collect();
    let last_sites: Vec<Site> = lengths.iter().enumerate().map(|(sequence, &length)| (sequence, length - 1)).collect();
    let clean_at = |point: HookPoint, layer: usize| rows(&clean.states(point)[layer], &clean_rows);
    let mut result = vec![vec![0.0; layers]; positions.len()];
    for centre in 0..layers {
        let span = window_layers(centre, window, layers);
        // The first layer the run computes, and the layers whose output it puts back.
        let (first, hooked) = match kind {
            Kind::Hidden => (span.start + 1, span.start + 1..span.end),
            Kind::Mlp => (span.start, span.clone()),
        };
        let below = if first == 0 { &corrupted.embedded } else { &corrupted.block[first - 1] };
        let mut hidden = rows(below, &source_rows)?;
        if kind == Kind::Hidden {
            let put_back = ReplaceAtSites::new(
                span.start,
                HookPoint::BlockOutput,
                restored_sites.clone(),
                clean_at(HookPoint::BlockOutput, span.start)?,
            );
            hidden = put_back.visit(span.start, HookPoint::BlockOutput, hidden, &packing)?;
        }
        let replacements = hooked
            .map(|layer| {
                let values = clean_at(kind.point(), layer)?;
                Ok(ReplaceAtSites::new(layer, kind.point(), restored_sites.clone(), values))
            })
            .collect::<Result<Vec<_>>>()?;
        let hooks = replacements.iter().fold(HookSet::new(), |set, hook| set.with(hook));
        if first < layers {
            let recorded = corrupted.kv.iter().filter(|(layer, _, _)| *layer >= first).cloned().collect();
            let cache = model.shared_prefix_cache(
                KvRecorder::from_layers(recorded),
                &corrupted.packing,
                &sources,
                &starts,
            )?;
            hidden = model.run_layers_kv(hidden, &packing, first..layers, &hooks, Path::Fast, KvMode::Prefix(&cache))?;
        }
        let logits = model.logits_at(&hidden, &packing, &last_sites, Path::Fast)?;
        let probabilities = target_probabilities(&logits, target)?;
        for (index, per_sample) in probabilities.chunks(samples).enumerate() {
            result[index][centre] = mean(per_sample);
        }
    }
    Ok(result)
}

/// Corrupted runs with clean activations put back at `(layer, point, position)`, every run from the embeddings up.
pub(super) fn patched(
    model: &LoadedModel,
    ids: &[u32],
    target: u32,
    noise: &Noise,
    restore: &[(usize, HookPoint, usize)],
) -> Result<f64> {
    let layers = model.dims().layers;
    let clean = clean_run(model, ids, target)?;
    let (batch, embedded) = noised_embeddings(model, ids, noise)?;
    let mut groups: Vec<((usize, HookPoint), Vec<usize>)> = Vec::new();
    for &(layer, point, position) in restore {
        match groups.iter_mut().find(|(key, _)| *key == (layer, point)) {
            Some((_, positions)) => positions.push(position),
            None => groups.push(((layer, point), vec![position])),
        }
    }
    let replacements = groups
        .iter()
        .map(|&((layer, point), ref positions)| {
            let sites: Vec<Site> = positions.iter().flat_map(|&p| sites_of(noise.samples, p)).collect();
            let order: Vec<usize> =
                positions.iter().flat_map(|&p| std::iter::repeat_n(p, noise.samples)).collect();
            Ok(ReplaceAtSites::new(layer, point, sites, rows(&clean.states(point)[layer], &order)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let hooks = replacements.iter().fold(HookSet::new(), |set, hook| set.with(hook));
    let hidden = model.run_layers(embedded, &batch, 0..layers, &hooks, Path::Fast)?;
    let last = sites_of(noise.samples, ids.len() - 1);
    let logits = model.logits_at(&hidden, &batch.packing, &last, Path::Fast)?;
    Ok(mean(&target_probabilities(&logits, target)?))
}

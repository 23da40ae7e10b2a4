//! The runs of a causal trace: the clean run with every layer's states, the corrupted runs with their keys and
//! values, and the restored runs, batched in one sweep up the layers.
//!
//! A restoration centred on layer `L` at token `t` changes nothing below the first layer of its window and nothing
//! at tokens before `t` (attention is causal). Its run therefore starts from the corrupted runs' residual stream
//! below the window, holds only the tokens from `t` on, and reads the earlier tokens' keys and values from the
//! corrupted runs' recording. Every restoration joins one packed batch at its first computed layer ([`restored`]).

use std::ops::Range;
use std::sync::Mutex;

use candle_core::{DType, Tensor};

use super::{Kind, Noise, sites_of, softmax, window_layers};
use crate::error::{Error, Result};
use crate::model::{Hook, HookPoint, HookSet, KvMode, KvRecorder, LoadedModel, Packing, Path, ReplaceAtSites, Site};

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
            softmax(row)
                .get(target as usize)
                .copied()
                .ok_or_else(|| Error::invalid("(trace)", "target", format!("token {target} is outside the vocabulary")))
        })
        .collect()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The clean run over `ids`, recording every layer's block and MLP outputs.
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

/// The corrupted runs (one sequence per noise sample), recording every layer's block output, keys and values.
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
    let count = index.len();
    let index = Tensor::from_vec(index, count, x.device())?;
    Ok(x.index_select(&index, 0)?)
}

/// The restorations of one kind centred on one layer: `positions × samples` sequences of the sweep.
struct Group {
    /// Index of the kind in the kinds traced.
    kind_index: usize,
    kind: Kind,
    centre: usize,
    /// The first layer of the window.
    window_start: usize,
    /// The first layer the group's sequences run through.
    first: usize,
    /// The layers whose output (at the kind's point) is put back while the sequences run.
    hooked: Range<usize>,
    /// Index of the group's first sequence in the sweep, once it has joined.
    offset: usize,
}

/// The sequences of the sweep that have joined so far: sequence `s` holds tokens `starts[s]..` of corrupted run
/// `sources[s]`.
#[derive(Default)]
struct Sweep {
    hidden: Option<Tensor>,
    lengths: Vec<usize>,
    starts: Vec<usize>,
    sources: Vec<usize>,
}

/// Sequences whose logits are computed in one product (the vocabulary can be large).
const LOGIT_CHUNK: usize = 256;

/// `p_restored[kind][i][centre]` for every kind of `kinds` (with its window), restored position `positions[i]` and
/// centre layer.
///
/// Every restoration of every kind and centre layer runs in one sweep up the layers: before layer `l`, the groups
/// whose first computed layer is `l` join the packed batch with the corrupted runs' residual stream below `l` (a
/// hidden-state group with the clean state of its window's first layer already put back); at each layer the
/// groups whose window covers it get their clean activations put back; every layer reads the tokens before each
/// sequence's start from the corrupted runs' keys and values. One pass per layer for everything keeps the products
/// large (hundreds to thousands of rows) and the number of operations small.
#[allow(clippy::too_many_arguments)]
pub(super) fn restored(
    model: &LoadedModel,
    ids: &[u32],
    target: u32,
    kinds: &[(Kind, usize)],
    positions: &[usize],
    clean: &CleanRun,
    corrupted: &CorruptedRun,
) -> Result<Vec<Vec<Vec<f64>>>> {
    let layers = model.dims().layers;
    let (tokens, samples) = (ids.len(), corrupted.samples);
    let per_group = positions.len() * samples;
    // Within a group, sequence `i · samples + k` restores positions[i] in noise sample k.
    let (mut source_rows, mut group_starts, mut group_sources) = (Vec::new(), Vec::new(), Vec::new());
    for &position in positions {
        for sample in 0..samples {
            source_rows.extend(sample * tokens + position..(sample + 1) * tokens);
            group_starts.push(position);
            group_sources.push(sample);
        }
    }
    let group_lengths: Vec<usize> = group_starts.iter().map(|&start| tokens - start).collect();
    let group_packing = Packing::starting_at(&group_lengths, &group_starts, &model.device)?;
    let group_sites: Vec<Site> = (0..per_group).map(|sequence| (sequence, 0)).collect();

    let mut groups = Vec::new();
    for (kind_index, &(kind, window)) in kinds.iter().enumerate() {
        for centre in 0..layers {
            let span = window_layers(centre, window, layers);
            let (first, hooked) = match kind {
                Kind::Hidden => (span.start + 1, span.start + 1..span.end),
                Kind::Mlp => (span.start, span.clone()),
            };
            groups.push(Group { kind_index, kind, centre, window_start: span.start, first, hooked, offset: 0 });
        }
    }
    groups.sort_by_key(|g| g.first);

    let mut sweep = Sweep::default();
    let mut joined = 0;
    for layer in 0..=layers {
        while joined < groups.len() && groups[joined].first == layer {
            let group = &mut groups[joined];
            let below = if layer == 0 { &corrupted.embedded } else { &corrupted.block[layer - 1] };
            let mut hidden = rows(below, &source_rows)?;
            if group.kind == Kind::Hidden {
                let clean_rows = rows(&clean.block[group.window_start], &group_starts)?;
                let put_back =
                    ReplaceAtSites::new(group.window_start, HookPoint::BlockOutput, group_sites.clone(), clean_rows);
                hidden = put_back.visit(group.window_start, HookPoint::BlockOutput, hidden, &group_packing)?;
            }
            group.offset = sweep.lengths.len();
            sweep.hidden = Some(match sweep.hidden.take() {
                Some(active) => Tensor::cat(&[&active, &hidden], 0)?,
                None => hidden,
            });
            sweep.lengths.extend(&group_lengths);
            sweep.starts.extend(&group_starts);
            sweep.sources.extend(&group_sources);
            joined += 1;
        }
        let Some(hidden) = sweep.hidden.take() else { continue };
        if layer == layers {
            sweep.hidden = Some(hidden);
            break;
        }
        let packing = Packing::starting_at(&sweep.lengths, &sweep.starts, &model.device)?;
        let replacements = [HookPoint::BlockOutput, HookPoint::MlpOutput]
            .into_iter()
            .filter_map(|point| put_back_at(layer, point, &groups[..joined], &group_starts, clean).transpose())
            .collect::<Result<Vec<_>>>()?;
        let hooks = replacements.iter().fold(HookSet::new(), |set, hook| set.with(hook));
        let recorded = corrupted.kv.iter().filter(|(l, _, _)| *l == layer).cloned().collect();
        let recorder = KvRecorder::from_layers(recorded);
        let cache = model.shared_prefix_cache(recorder, &corrupted.packing, &sweep.sources, &sweep.starts)?;
        let kv = KvMode::Prefix(&cache);
        sweep.hidden = Some(model.run_layers_kv(hidden, &packing, layer..layer + 1, &hooks, Path::Fast, kv)?);
    }

    let hidden = sweep.hidden.ok_or_else(|| Error::invalid("(trace)", "kind", "nothing to restore"))?;
    let packing = Packing::starting_at(&sweep.lengths, &sweep.starts, &model.device)?;
    let last_sites: Vec<Site> = sweep.lengths.iter().enumerate().map(|(s, &length)| (s, length - 1)).collect();
    let mut probabilities = Vec::with_capacity(last_sites.len());
    for chunk in last_sites.chunks(LOGIT_CHUNK) {
        let logits = model.logits_at(&hidden, &packing, chunk, Path::Fast)?;
        probabilities.extend(target_probabilities(&logits, target)?);
    }
    let mut result = vec![vec![vec![0.0; layers]; positions.len()]; kinds.len()];
    for group in &groups {
        let own = &probabilities[group.offset..group.offset + per_group];
        for (index, per_sample) in own.chunks(samples).enumerate() {
            result[group.kind_index][index][group.centre] = mean(per_sample);
        }
    }
    Ok(result)
}

/// The hook that puts the clean activation back at `point` of `layer` for every joined group whose window covers
/// the layer (None when no group does).
fn put_back_at(
    layer: usize,
    point: HookPoint,
    joined: &[Group],
    group_starts: &[usize],
    clean: &CleanRun,
) -> Result<Option<ReplaceAtSites>> {
    let (mut sites, mut clean_positions) = (Vec::new(), Vec::new());
    for group in joined.iter().filter(|g| g.kind.point() == point && g.hooked.contains(&layer)) {
        sites.extend((0..group_starts.len()).map(|sequence| (group.offset + sequence, 0)));
        clean_positions.extend(group_starts);
    }
    if sites.is_empty() {
        return Ok(None);
    }
    let values = rows(&clean.states(point)[layer], &clean_positions)?;
    Ok(Some(ReplaceAtSites::new(layer, point, sites, values)))
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
            let order: Vec<usize> = positions.iter().flat_map(|&p| std::iter::repeat_n(p, noise.samples)).collect();
            Ok(ReplaceAtSites::new(layer, point, sites, rows(&clean.states(point)[layer], &order)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let hooks = replacements.iter().fold(HookSet::new(), |set, hook| set.with(hook));
    let hidden = model.run_layers(embedded, &batch, 0..layers, &hooks, Path::Fast)?;
    let last = sites_of(noise.samples, ids.len() - 1);
    let logits = model.logits_at(&hidden, &batch.packing, &last, Path::Fast)?;
    Ok(mean(&target_probabilities(&logits, target)?))
}

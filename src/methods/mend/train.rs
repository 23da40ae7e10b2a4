//! Training MEND's editor (`editguard train mend`), as `EditTrainer` of eric-mitchell/mend trains it.
//!
//! Each training step takes one request of COUNTERFACT's train split (never the edit split the suites use) and the
//! locality probe of another, randomly chosen, train record. The edit's gradient factors are computed on the
//! unedited model and transformed by the editor (whose normalisation statistics take in the factors first); the
//! updates `α_w · Σ δ̃ ũᵀ` are installed as differentiable weights; and the edited model is scored on the
//! paraphrase (or, with `edit_loss_on = "prompt"`, the edit prompt itself) followed by the target — `L_edit`, the
//! mean NLL of the target tokens — and on the locality probe's answer positions — `L_loc`, the mean
//! `KL(p_pre ‖ p_post)`. The loss `cedit · L_edit + cloc · L_loc` is back-propagated into the transforms and the step
//! sizes; gradients of `accumulate_bs` steps are averaged, clipped to `grad_clip` (global norm), and applied by two
//! Adam optimisers (learning rates `lr` and `lr_lr`, no weight decay); a step whose gradient is not finite is skipped
//! and counted. Every `val_interval` steps the editor is validated on `val_steps` held-out records (statistics
//! frozen): losses, the share whose paraphrase predicts the whole target (`edit accuracy`), and efficacy (the edited
//! prompt prefers the new target over the old). The best validation `cedit · L_edit + cloc · L_loc` is kept (the
//! reference's `loss/total_edit_val`), and training stops early after `early_stop_patience` steps without
//! improvement — the reference's rule, which EasyEdit removed. The editor returned is the best one.
//!
//! Speed: the edit, the prompt the edit loss reads and the locality probe are one packed batch, so the layers below the
//! lowest edited one run once per step on the fast path and one unedited pass above them gives both the factors and
//! the unedited locality distribution; frozen weights get no gradient, and logits are computed only where a loss
//! reads them.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{D, DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::accumulate::Accumulator;
use super::editor::{Editor, EditorShape};
use super::factors::{TargetBatch, below_edited, factors_above, lowest_edited_layer, mean_nll, target_batch};
use super::{EditLossPrompt, LocalityFrom, MendParams};
use crate::data::counterfact::{EditDataset, seeded_order};
use crate::data::request::{EditRequest, LocalityProbe};
use crate::error::{Error, Result, ensure_finite};
use crate::methods::fused_adam::{AdamParams, FusedAdam};
use crate::metrics::edit_quality::score_continuations;
use crate::model::{LoadedModel, NoHooks, Path, Site, WeightBackup, WeightId};

/// One point of the learning curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Training steps (edits) so far.
    pub step: usize,
    /// Mean training `L_edit` since the previous point.
    pub train_edit: f64,
    /// Mean training `L_loc` since the previous point.
    pub train_loc: f64,
    /// Validation `L_edit`.
    pub val_edit: f64,
    /// Validation `L_loc`.
    pub val_loc: f64,
    /// Share of validation records whose paraphrase predicts the whole target after the edit.
    pub val_accuracy: f64,
    /// Share of validation records whose edited prompt prefers the new target over the old one.
    pub val_efficacy: f64,
    /// Mean step size `α` over the edited weights.
    pub mean_edit_lr: f64,
}

/// What a training run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingReport {
    /// Training steps run.
    pub steps: usize,
    /// Optimiser steps taken.
    pub optimizer_steps: usize,
    /// Steps whose gradient was not finite (skipped).
    pub skipped_non_finite: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// The step of the best validation.
    pub best_step: usize,
    /// The best validation `cedit · L_edit + cloc · L_loc`.
    pub best_val: f64,
    /// True when early stopping ended training.
    pub stopped_early: bool,
    /// The learning curve (one point per validation).
    pub curve: Vec<CurvePoint>,
}

/// Progress of a training run, for a progress bar.
#[derive(Debug, Clone)]
pub struct TrainProgress {
    /// Steps done.
    pub step: usize,
    /// Steps planned.
    pub total: usize,
    /// Running mean training `L_edit`.
    pub train_edit: f64,
    /// Running mean training `L_loc`.
    pub train_loc: f64,
    /// The latest validation point.
    pub last: Option<CurvePoint>,
}

/// A training example: an edit and an unrelated locality probe.
#[derive(Debug, Clone)]
pub struct Example {
    /// The edit.
    pub edit: EditRequest,
    /// The locality probe of another record.
    pub loc: LocalityProbe,
}

/// Train and validation examples from COUNTERFACT's train split: the seeded order of the records, the last
/// `val_records` held out. Each record's locality probe is the first neighbourhood probe of another record of the same
/// part, drawn at random among those with the same relation (prompt template; any other record when the relation has
/// no other) — see [`LocalityFrom`].
pub fn examples(params: &MendParams, data_dir: Option<&std::path::Path>) -> Result<(Vec<Example>, Vec<Example>)> {
    let records = EditDataset::CounterFactTrain.load(data_dir)?;
    let ordered = seeded_order(&records, params.seed);
    if ordered.len() <= params.val_records + 1 {
        return Err(Error::invalid("(mend)", "val_records", "leaves no training records"));
    }
    let (train, val) = ordered.split_at(ordered.len() - params.val_records);
    let pair = |part: &[EditRequest], salt: u64| -> Vec<Example> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(params.seed ^ salt);
        let with_probe: Vec<usize> = (0..part.len()).filter(|&i| !part[i].locality.is_empty()).collect();
        let mut by_relation: HashMap<&str, Vec<usize>> = HashMap::new();
        for &i in &with_probe {
            by_relation.entry(part[i].prompt.as_str()).or_default().push(i);
        }
        part.iter()
            .enumerate()
            .map(|(index, edit)| {
                let same: Vec<usize> = match params.locality_from {
                    LocalityFrom::SameRelation => by_relation
                        .get(edit.prompt.as_str())
                        .map(|v| v.iter().copied().filter(|&j| j != index).collect())
                        .unwrap_or_default(),
                    LocalityFrom::Any => Vec::new(),
                };
                let pool = if same.is_empty() { &with_probe } else { &same };
                let other = pool[rng.random_range(0..pool.len())];
                Example { edit: edit.clone(), loc: part[other].locality[0].clone() }
            })
            .collect()
    };
    // Different salts give the two parts independent locality draws.
    Ok((pair(train, 1), pair(val, 2)))
}

/// The losses of one edit of a training or validation step.
#[derive(Debug, Clone, Copy)]
pub struct StepLosses {
    /// `L_edit`.
    pub edit: f64,
    /// `L_loc`.
    pub loc: f64,
    /// The whole target predicted on the scored prompt.
    pub accurate: bool,
}

/// Runs one edit of `example` through the editor and scores the edited model; with `training`, the statistics take
/// in the factors and the returned gradients cover the editor's parameters.
pub fn edit_step(
    model: &mut LoadedModel,
    editor: &Editor,
    weights: &[WeightId],
    example: &Example,
    params: &MendParams,
    training: bool,
) -> Result<(StepLosses, Option<GradStore>)> {
    let trace = std::env::var_os("EDITGUARD_TRACE").is_some();
    let started = Instant::now();
    let lap = |what: &str| {
        if trace {
            eprintln!("mend step: {what} {:.3}s", started.elapsed().as_secs_f64());
        }
    };
    let layers = model.dims().layers;
    let outer_prompt = match (params.edit_loss_on, example.edit.rephrase_prompts.first()) {
        (EditLossPrompt::Rephrase, Some(rephrase)) => rephrase.clone(),
        _ => example.edit.prompt_text(),
    };
    // One packed batch: row 0 the edit (its gradient gives the factors), row 1 the prompt the edit loss reads after
    // the edit, row 2 the locality probe. The layers below the lowest edited one run once for all three.
    let rows = [
        (example.edit.prompt_text(), example.edit.target_new.clone()),
        (outer_prompt, example.edit.target_new.clone()),
        (example.loc.prompt.clone(), example.loc.answer.clone()),
    ];
    let packed = target_batch(model, &rows)?;
    let [inner, edit, loc] = sites_by_row(&packed);
    let batch = &packed.batch;
    let below = below_edited(model, batch, weights)?;
    lap("below");
    // The unedited pass gives the factors (loss on row 0 only, so rows 1 and 2 have δ = 0 and drop out) and the
    // unedited distribution at the locality sites on the differentiable path the edited pass takes too, so that a zero
    // edit has a zero KL.
    let (factors, unedited) = factors_above(model, batch, below.clone(), &inner.0, &inner.1, weights)?;
    let pre_logits = model.logits_at(&unedited, &batch.packing, &loc.0, Path::Differentiable)?;
    let pre = candle_nn::ops::log_softmax(&pre_logits, D::Minus1)?;
    lap("factors");
    let lowest = lowest_edited_layer(weights)?;
    let mut backups: Vec<WeightBackup> = Vec::new();
    let result = (|| -> Result<(Tensor, Tensor, Tensor)> {
        let updates = editor.updates(&factors.pairs(), training)?;
        for (&id, update) in weights.iter().zip(updates) {
            let update = if training { update } else { update.detach() };
            backups.push(model.apply_delta(id, &update)?);
        }
        lap("updates");
        let hidden = model.run_layers(below, batch, lowest..layers, &NoHooks, Path::Differentiable)?;
        let sites: Vec<_> = edit.0.iter().chain(&loc.0).copied().collect();
        let logits = model.logits_at(&hidden, &batch.packing, &sites, Path::Differentiable)?;
        let edit_logits = logits.narrow(0, 0, edit.0.len())?;
        let loc_logits = logits.narrow(0, edit.0.len(), loc.0.len())?;
        let edit_loss = mean_nll(&edit_logits, &edit.1)?;
        let post = candle_nn::ops::log_softmax(&loc_logits, D::Minus1)?;
        let loc_loss = (pre.exp()? * (&pre - post)?)?.sum(D::Minus1)?.mean_all()?;
        Ok((edit_loss, loc_loss, edit_logits))
    })();
    while let Some(backup) = backups.pop() {
        model.restore(backup)?;
    }
    lap("edited forward");
    let (edit_loss, loc_loss, edit_logits) = result?;
    let predicted = edit_logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let accurate = predicted == edit.1;
    let losses = StepLosses {
        edit: f64::from(edit_loss.to_scalar::<f32>()?),
        loc: f64::from(loc_loss.to_scalar::<f32>()?),
        accurate,
    };
    if !training {
        return Ok((losses, None));
    }
    let total = ((edit_loss * params.cedit)? + (loc_loss * params.cloc)?)?;
    let grads = total.backward()?;
    lap("backward");
    Ok((losses, Some(grads)))
}

/// The sites and labels of each of the three rows of a training step's batch.
fn sites_by_row(packed: &TargetBatch) -> [(Vec<Site>, Vec<u32>); 3] {
    let mut out: [(Vec<Site>, Vec<u32>); 3] = Default::default();
    for (&site, &label) in packed.sites.iter().zip(&packed.labels) {
        out[site.0].0.push(site);
        out[site.0].1.push(label);
    }
    out
}

/// Efficacy of one edit: the edited prompt prefers the new target over the old one (ROME's COUNTERFACT score).
fn efficacy(model: &mut LoadedModel, editor: &Editor, weights: &[WeightId], request: &EditRequest) -> Result<bool> {
    let Some(old) = &request.ground_truth else { return Ok(false) };
    let factors = super::factors::edit_factors(model, std::slice::from_ref(request), weights)?;
    let mut backups = Vec::new();
    let result = (|| -> Result<bool> {
        for (&id, update) in weights.iter().zip(editor.updates(&factors.pairs(), false)?) {
            backups.push(model.apply_delta(id, &update.detach())?);
        }
        let prompt = request.prompt_text();
        let pairs = [(prompt.clone(), format!(" {}", request.target_new)), (prompt, format!(" {old}"))];
        let scores = score_continuations(model, &pairs)?;
        Ok(scores[0].mean_nll < scores[1].mean_nll)
    })();
    while let Some(backup) = backups.pop() {
        model.restore(backup)?;
    }
    result
}

/// Validates `editor` on `examples` (statistics frozen).
pub fn validate(
    model: &mut LoadedModel,
    editor: &Editor,
    weights: &[WeightId],
    examples: &[Example],
    params: &MendParams,
) -> Result<(f64, f64, f64, f64)> {
    let (mut edit, mut loc, mut accurate, mut effective) = (0.0, 0.0, 0usize, 0usize);
    for example in examples {
        let (losses, _) = edit_step(model, editor, weights, example, params, false)?;
        edit += losses.edit;
        loc += losses.loc;
        accurate += usize::from(losses.accurate);
        effective += usize::from(efficacy(model, editor, weights, &example.edit)?);
    }
    let n = examples.len().max(1) as f64;
    Ok((edit / n, loc / n, accurate as f64 / n, effective as f64 / n))
}

/// The editor's shape for `weights` of `model`.
pub fn editor_shape(model: &LoadedModel, params: &MendParams, weights: &[WeightId]) -> Result<EditorShape> {
    let shapes = weights
        .iter()
        .map(|&id| {
            let (out, input) = model.network.weight(id)?.dims2()?;
            Ok((id, input, out))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EditorShape {
        weights: shapes,
        rank: params.rank,
        n_hidden: params.n_hidden,
        edit_lr: params.edit_lr,
        seed: params.seed,
    })
}

/// Trains an editor for `weights` of `model` (which must be unedited; it is restored after every step).
pub fn train(
    model: &mut LoadedModel,
    params: &MendParams,
    weights: &[WeightId],
    data_dir: Option<&std::path::Path>,
    progress: &mut dyn FnMut(&TrainProgress),
) -> Result<(Editor, TrainingReport)> {
    if !model.is_pristine() {
        return Err(Error::invalid("(mend)", "model", "MEND's editor is trained on the unedited model"));
    }
    let started = Instant::now();
    let (train_set, val_set) = examples(params, data_dir)?;
    let val_set = &val_set[..params.val_steps.min(val_set.len())];
    let editor = Editor::new(&editor_shape(model, params, weights)?, &model.device)?;
    let transform_vars = editor.transform_vars();
    let lr_vars = vec![editor.edit_lrs.clone()];
    let all_vars: Vec<Var> = transform_vars.iter().chain(&lr_vars).cloned().collect();
    let mut optimizer = FusedAdam::new(transform_vars, AdamParams::with_lr(params.lr))?;
    let mut lr_optimizer = FusedAdam::new(lr_vars, AdamParams::with_lr(params.lr_lr))?;
    let mut accumulator = Accumulator::new(all_vars.len());
    let mut report = TrainingReport {
        steps: 0,
        optimizer_steps: 0,
        skipped_non_finite: 0,
        seconds: 0.0,
        best_step: 0,
        best_val: f64::INFINITY,
        stopped_early: false,
        curve: Vec::new(),
    };
    let (mut edit_sum, mut loc_sum, mut since) = (0.0, 0.0, 0usize);
    let mut best = None;
    let mut accumulated = 0usize;
    for step in 0..params.max_iters {
        let example = &train_set[step % train_set.len()];
        let (losses, grads) = edit_step(model, &editor, weights, example, params, true)?;
        let grads = grads.expect("training steps return gradients");
        if losses.edit.is_finite() && losses.loc.is_finite() && accumulator.add(&all_vars, &grads)? {
            edit_sum += losses.edit;
            loc_sum += losses.loc;
            since += 1;
        } else {
            report.skipped_non_finite += 1;
        }
        accumulated += 1;
        if accumulated == params.accumulate_bs {
            let store = accumulator.take_clipped(&all_vars, params.accumulate_bs, params.grad_clip)?;
            optimizer.step(&store)?;
            lr_optimizer.step(&store)?;
            report.optimizer_steps += 1;
            accumulated = 0;
        }
        report.steps = step + 1;
        let mut point = None;
        if report.steps.is_multiple_of(params.val_interval) || report.steps == params.max_iters {
            let (val_edit, val_loc, val_accuracy, val_efficacy) = validate(model, &editor, weights, val_set, params)?;
            let lrs = editor.edit_lrs.as_tensor().to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let current = CurvePoint {
                step: report.steps,
                train_edit: edit_sum / since.max(1) as f64,
                train_loc: loc_sum / since.max(1) as f64,
                val_edit: ensure_finite("MEND validation edit loss", val_edit)?,
                val_loc: ensure_finite("MEND validation locality loss", val_loc)?,
                val_accuracy,
                val_efficacy,
                mean_edit_lr: lrs.iter().sum::<f64>() / lrs.len().max(1) as f64,
            };
            (edit_sum, loc_sum, since) = (0.0, 0.0, 0);
            let total = params.cedit * current.val_edit + params.cloc * current.val_loc;
            if total < report.best_val {
                report.best_val = total;
                report.best_step = report.steps;
                best = Some(editor.named_tensors()?);
            }
            report.curve.push(current.clone());
            point = Some(current);
        }
        progress(&TrainProgress {
            step: report.steps,
            total: params.max_iters,
            train_edit: edit_sum / since.max(1) as f64,
            train_loc: loc_sum / since.max(1) as f64,
            last: point.or_else(|| report.curve.last().cloned()),
        });
        if report.steps - report.best_step > params.early_stop_patience && report.best_step > 0 {
            report.stopped_early = true;
            break;
        }
    }
    if let Some(best) = best {
        editor.load_tensors(&best, "(best validation)")?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok((editor, report))
}

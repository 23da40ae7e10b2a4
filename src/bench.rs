//! `editguard bench`: how fast editguard is on this machine.
//!
//! Speed and memory are measured here, never asserted in timed tests. Figures: model load time (including fetch from
//! the cache and dequantisation), tokens/s of batched ME-PPL_50 perplexity, seconds per forward + backward step through
//! the differentiable path for a short prompt with a vector injected at an MLP output (the inner loop of ROME), and
//! the seconds per edit of each editing method (with the training time of a trained component such as MEND's editor),
//! items/s of each downstream task on a seeded sample, and the process's peak resident memory; long documents and
//! decoding over a long cache are in [`crate::bench_long`].

use std::time::Instant;

use candle_core::{D, Var};
use serde::Serialize;

use crate::error::Result;
use crate::methods::TrainedComponent;
use crate::metrics::perplexity::{PerplexityOptions, perplexity};
use crate::model::{AddAtSites, HookPoint, LoadedModel, Path};
use crate::tasks::{EvalOptions, TaskEntry, evaluate};

/// What `editguard bench` prints.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Model id.
    pub model: String,
    /// Seconds to load the weights and tokenizer (cache hit).
    pub load_seconds: f64,
    /// Tokens per ME-PPL_50 pass.
    pub ppl_tokens: usize,
    /// Seconds per ME-PPL_50 pass (best of the repeats).
    pub ppl_seconds: f64,
    /// Tokens per second (best of the repeats).
    pub ppl_tokens_per_second: f64,
    /// Mean sentence perplexity found (sanity check).
    pub ppl_mean: f64,
    /// Prompt length of the gradient step.
    pub step_prompt_tokens: usize,
    /// Seconds per forward + backward step (median of the repeats).
    pub step_seconds: f64,
    /// Seconds per edit for each method with hyper-parameters for this model: (method, first edit including context
    /// template generation, a second edit with the templates cached).
    pub edit_seconds: Vec<(String, f64, f64)>,
    /// Methods with a trained component (MEND's editor): how long its training took (made ready before the edits are
    /// timed, trained now when nothing was cached).
    pub trained: Vec<(String, TrainedComponent)>,
    /// Downstream task throughput on a seeded sample.
    pub task_speed: Vec<TaskSpeed>,
    /// Peak resident memory of the process in MiB, where the OS reports it.
    pub peak_memory_mib: Option<f64>,
    /// Logical CPUs seen.
    pub cpus: usize,
    /// The same perplexity run by PyTorch/transformers in the same invocation (`--pytorch PYTHON`).
    pub pytorch: Option<crate::bench_pytorch::PytorchRun>,
    /// Perplexity throughput on single long documents (`--long`).
    pub long_documents: Vec<crate::bench_long::LongDocument>,
    /// PyTorch on the same long documents, in the same order (with `--pytorch`).
    pub pytorch_long: Vec<crate::bench_pytorch::PytorchRun>,
    /// Greedy decoding over a long cache (`--decode-cache`).
    pub decode: Option<crate::bench_long::DecodeSpeed>,
}

/// Throughput of one task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskSpeed {
    /// Task name.
    pub task: String,
    /// Items scored.
    pub items: usize,
    /// Seconds, data loading included.
    pub seconds: f64,
    /// Items per second.
    pub items_per_second: f64,
}

/// Times one method: two edits of COUNTERFACT case 0 with the same method instance, undone after each; a trained
/// component is made ready first, outside the timing, and returned.
pub fn edit_seconds(
    model: &mut LoadedModel,
    registry: &crate::registry::Registry,
    method: &str,
) -> Result<(f64, f64, Option<TrainedComponent>)> {
    let method = crate::methods::build_method(registry, &model.id, method)?;
    let request = crate::methods::EditRequest::from_text(
        "0",
        "The mother tongue of Danielle Darrieux is",
        "Danielle Darrieux",
        "English",
    )?;
    let env = crate::methods::EditEnv::default();
    let trained = method.prepare(model, &env)?;
    let mut seconds = Vec::new();
    for _ in 0..2 {
        let edit = method.apply(model, std::slice::from_ref(&request), &env)?;
        seconds.push(edit.seconds);
        edit.undo(model)?;
    }
    Ok((seconds[0], seconds[1], trained))
}

/// Runs the benchmark on a loaded model; `methods` are timed with their models.toml hyper-parameters.
pub fn run(
    model: &mut LoadedModel,
    registry: &crate::registry::Registry,
    methods: &[String],
    sentences: &[String],
    repeats: usize,
    options: PerplexityOptions,
    (tasks, task_options): (&[&TaskEntry], &EvalOptions),
) -> Result<BenchReport> {
    let repeats = repeats.max(1);
    let mut best = f64::INFINITY;
    let mut report = None;
    for _ in 0..repeats {
        let r = perplexity(&*model, sentences, options, None)?;
        best = best.min(r.seconds);
        report = Some(r);
    }
    let report = report.expect("at least one repeat");
    let prompt = model.encode("The mother tongue of Danielle Darrieux is French, and she")?;
    let prompt: Vec<u32> = prompt.into_iter().take(10).collect();
    let mut steps = Vec::new();
    for _ in 0..repeats.max(3) {
        steps.push(gradient_step(&*model, &prompt)?);
    }
    steps.sort_by(f64::total_cmp);
    let (mut edit_times, mut trained) = (Vec::new(), Vec::new());
    for method in methods {
        let (first, second, component) = edit_seconds(model, registry, method)?;
        edit_times.push((method.clone(), first, second));
        trained.extend(component.map(|c| (method.clone(), c)));
    }
    let mut task_speed = Vec::new();
    for entry in tasks {
        let score = evaluate(model, entry, task_options)?;
        task_speed.push(TaskSpeed {
            task: score.task,
            items: score.items,
            seconds: score.seconds,
            items_per_second: score.items as f64 / score.seconds,
        });
    }
    Ok(BenchReport {
        model: model.id.clone(),
        load_seconds: model.load_seconds,
        ppl_tokens: report.tokens,
        ppl_seconds: best,
        ppl_tokens_per_second: report.tokens as f64 / best,
        ppl_mean: report.mean_sentence_ppl,
        step_prompt_tokens: prompt.len(),
        step_seconds: steps[steps.len() / 2],
        edit_seconds: edit_times,
        trained,
        task_speed,
        peak_memory_mib: peak_memory_mib(),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        pytorch: None,
        long_documents: Vec::new(),
        pytorch_long: Vec::new(),
        decode: None,
    })
}

/// Seconds of one step of ROME's inner loop on `prompt`: a vector added at the MLP output of an early layer, the
/// layers from there on through the differentiable path, the NLL of the last token, and the backward pass to the
/// vector. The residual stream below that layer cannot depend on the vector, so it is computed once before timing,
/// as an editing method computes it once for all its steps.
pub fn gradient_step(model: &LoadedModel, prompt: &[u32]) -> Result<f64> {
    let dims = model.dims();
    let layer = dims.layers.min(6).saturating_sub(1);
    let last = prompt.len() - 2;
    let batch = model.batch(&[&prompt[..prompt.len() - 1]])?;
    let below = model.run_layers(model.embed(&batch)?, &batch, 0..layer, &crate::model::NoHooks, Path::Fast)?;
    let started = Instant::now();
    let delta = Var::zeros(dims.hidden, model.dtype, &model.device)?;
    let hook = AddAtSites::same(layer, HookPoint::MlpOutput, vec![(0, last)], delta.as_tensor())?;
    let hidden = model.run_layers(below, &batch, layer..dims.layers, &hook, Path::Differentiable)?;
    let logits = model.logits_at(&hidden, &batch.packing, &[(0, last)], Path::Differentiable)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let target = log_probs.get(0)?.get(prompt[prompt.len() - 1] as usize)?;
    let grads = target.neg()?.backward()?;
    if grads.get(delta.as_tensor()).is_none() {
        return Err(crate::Error::invalid("(bench)", "gradient", "no gradient reached the injected vector"));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Peak resident set size (VmHWM) in MiB on Linux.
pub fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

//! `editguard bench`: measures editguard on this machine and, with `--pytorch`, PyTorch beside it in the same run.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use editguard::bench::BenchReport;
use editguard::bench_long::{decode_speed, document_of, long_document};
use editguard::data::me_ppl::Corpus;
use editguard::metrics::perplexity::PerplexityOptions;
use editguard::registry::Registry;

/// Arguments of `editguard bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Model id (default: the registry's default model).
    #[arg(long)]
    model: Option<String>,
    /// Repeats per measurement (best/median reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Upper bound on padded tokens per forward pass.
    #[arg(long, default_value_t = PerplexityOptions::default().token_budget)]
    token_budget: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Editing methods to time (default: every method with hyper-parameters for the model; `none` for none).
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// Tasks to time (items/s on a seeded sample; default all; `none` for none).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    tasks: Vec<String>,
    /// Items per timed task.
    #[arg(long, default_value_t = 50)]
    task_items: usize,
    /// Single long documents to score, by length in tokens (ME-PPL_1k's sentences concatenated; `none` for none).
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    long: Vec<String>,
    /// Time greedy decoding after a prompt of this many tokens (0: skip).
    #[arg(long, default_value_t = 2048)]
    decode_cache: usize,
    /// Tokens to generate when timing decoding.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Also run the perplexities (ME-PPL_50 and the long documents) through PyTorch/transformers with this Python
    /// interpreter (it needs torch, transformers, gguf and accelerate), side by side in this run (GGUF models).
    #[arg(long)]
    pytorch: Option<String>,
}

/// Runs `editguard bench`.
pub fn run(args: BenchArgs, registry: &Registry, data_dir: Option<PathBuf>) -> Result<()> {
    let id = args.model.clone().unwrap_or_else(|| registry.default_model.clone());
    let sentences = Corpus::MePpl50.load(data_dir.as_deref())?;
    let mut model = super::load(registry, &id)?;
    let methods: Vec<String> = match args.methods.as_slice() {
        [] => registry.get(&id)?.methods.keys().cloned().collect(),
        [none] if none == "none" => Vec::new(),
        given => given.to_vec(),
    };
    let tasks = match args.tasks.as_slice() {
        [none] if none == "none" => Vec::new(),
        names => editguard::tasks::entries_named(names)?,
    };
    let lengths: Vec<usize> = match args.long.as_slice() {
        [none] if none == "none" => Vec::new(),
        given => given
            .iter()
            .map(|l| l.parse().map_err(|_| anyhow::anyhow!("--long: `{l}` is not a token count (or `none`)")))
            .collect::<Result<_>>()?,
    };
    let bar = super::spinner("benchmarking".to_string());
    let options = PerplexityOptions { token_budget: args.token_budget, ..PerplexityOptions::default() };
    let task_options = editguard::tasks::EvalOptions {
        limit: Some(args.task_items),
        data_dir: data_dir.clone(),
        ..Default::default()
    };
    let report = editguard::bench::run(
        &mut model,
        registry,
        &methods,
        &sentences,
        args.repeats,
        options,
        (&tasks, &task_options),
    );
    bar.finish_and_clear();
    let mut report = report?;
    let long_sentences = Corpus::MePpl1k.load(data_dir.as_deref())?;
    let mut documents = Vec::new();
    for &length in &lengths {
        let bar = super::spinner(format!("scoring a {length}-token document"));
        let document = document_of(&model, &long_sentences, length)?;
        report.long_documents.push(long_document(&model, &document, length, args.repeats)?);
        bar.finish_and_clear();
        documents.push(document);
    }
    if args.decode_cache > 0 {
        let bar = super::spinner(format!("decoding after a {}-token prompt", args.decode_cache));
        let document = document_of(&model, &long_sentences, args.decode_cache)?;
        report.decode = Some(decode_speed(&model, &document, args.decode_tokens)?);
        bar.finish_and_clear();
    }
    if let Some(python) = &args.pytorch {
        let bar = super::spinner("running the same perplexities through PyTorch".to_string());
        let files = editguard::source::fetch(registry, &id)?;
        let bos = model.prepended_bos().is_some();
        let threads = editguard::model::kernels::workers::threads();
        let corpus = Corpus::MePpl50.locate(data_dir.as_deref())?;
        report.pytorch =
            Some(editguard::bench_pytorch::run(python, &files.weights[0], &corpus, bos, threads, args.repeats)?);
        let folder = tempfile::tempdir()?;
        for (index, document) in documents.iter().enumerate() {
            let corpus = folder.path().join(format!("document-{index}.json"));
            std::fs::write(&corpus, serde_json::to_vec(&[serde_json::json!({ "Text": document })])?)?;
            let run = editguard::bench_pytorch::run(python, &files.weights[0], &corpus, bos, threads, args.repeats)?;
            report.pytorch_long.push(run);
        }
        bar.finish_and_clear();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(report: &BenchReport) {
    println!("model                 {} on {} CPUs", report.model, report.cpus);
    println!("load                  {:.2} s", report.load_seconds);
    println!(
        "ME-PPL_50 perplexity  {:.0} tokens/s ({} tokens in {:.2} s, mean ppl {:.2})",
        report.ppl_tokens_per_second, report.ppl_tokens, report.ppl_seconds, report.ppl_mean
    );
    for (index, document) in report.long_documents.iter().enumerate() {
        println!(
            "{:<21} {:.0} tokens/s ({} tokens in {:.2} s, ppl {:.2}; {:.2}x the ME-PPL_50 rate)",
            format!("document of {}", document.asked_tokens),
            document.tokens_per_second,
            document.tokens,
            document.seconds,
            document.ppl,
            document.tokens_per_second / report.ppl_tokens_per_second
        );
        if let Some(torch) = report.pytorch_long.get(index) {
            println!(
                "{:<21} {:.0} tokens/s ({:.2} s, ppl {:.2}): editguard is {:.2}x as fast",
                "  PyTorch",
                torch.tokens_per_second,
                torch.seconds,
                torch.mean_sentence_ppl,
                document.tokens_per_second / torch.tokens_per_second
            );
        }
    }
    if let Some(decode) = &report.decode {
        println!(
            "decoding              {:.1} ms per token after a {}-token prompt ({} tokens timed)",
            decode.seconds_per_token * 1e3,
            decode.cache_tokens,
            decode.timed_tokens
        );
    }
    println!(
        "fwd+bwd step          {:.3} s ({}-token prompt, differentiable path)",
        report.step_seconds, report.step_prompt_tokens
    );
    for (method, first, second) in &report.edit_seconds {
        println!("{method:<21} {first:.2} s first edit (with context templates), {second:.2} s next edit");
    }
    for (method, trained) in &report.trained {
        let when = if trained.trained_now { "trained now" } else { "read from the cache" };
        println!(
            "{:<21} {:.0} s ({} steps; {when})",
            format!("{method} training"),
            trained.training_seconds,
            trained.steps
        );
    }
    for task in &report.task_speed {
        println!(
            "{:<21} {:.2} items/s ({} items in {:.1} s)",
            task.task, task.items_per_second, task.items, task.seconds
        );
    }
    match report.peak_memory_mib {
        Some(mib) => println!("peak memory           {mib:.0} MiB"),
        None => println!("peak memory           (not reported by this OS)"),
    }
    if let Some(torch) = &report.pytorch {
        println!(
            "PyTorch ME-PPL_50     {:.0} tokens/s ({} tokens in {:.2} s, mean ppl {:.2}; {} threads): editguard is \
             {:.2}x as fast",
            torch.tokens_per_second,
            torch.tokens,
            torch.seconds,
            torch.mean_sentence_ppl,
            torch.threads,
            report.ppl_tokens_per_second / torch.tokens_per_second
        );
        println!("PyTorch load          {:.2} s, peak memory {:.0} MiB", torch.load_seconds, torch.peak_rss_mib);
        println!("                      ({})", torch.implementation);
    }
}

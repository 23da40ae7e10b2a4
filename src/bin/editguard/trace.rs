//! `editguard trace`: ROME's causal tracing of one prompt, or averaged over known facts of a seeded COUNTERFACT
//! sample.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use editguard::data::counterfact::{EditDataset, seeded_order};
use editguard::model::LoadedModel;
use editguard::tracing::average::{Category, SampleReport, trace_sample};
use editguard::tracing::plot::{write_average_svg, write_heatmap_svg};
use editguard::tracing::{
    Kind, Noise, Positions, PromptTrace, TracePrompt, TraceSettings, embedding_std, next_token, subject_tokens,
    target_token, trace_prompt,
};

/// Arguments of `editguard trace`.
#[derive(Args)]
pub struct TraceArgs {
    /// Model id (default: the registry's default model).
    #[arg(long)]
    pub model: Option<String>,
    /// One prompt: a template with `{}` for the subject (COUNTERFACT's form), or a text containing the subject.
    #[arg(long, requires = "subject", conflicts_with = "sample")]
    prompt: Option<String>,
    /// The prompt's subject (its tokens are corrupted).
    #[arg(long, requires = "prompt")]
    subject: Option<String>,
    /// The answer whose first token is traced (default: the clean model's top-1 next token).
    #[arg(long, requires = "prompt")]
    target: Option<String>,
    /// Average over this many known facts: the first records of the dataset's seeded order whose true target's first
    /// token is the clean model's top-1 prediction.
    #[arg(long)]
    sample: Option<usize>,
    /// Seed of the record order and of the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dataset of --sample: counterfact or counterfact-train.
    #[arg(long, default_value = "counterfact")]
    dataset: String,
    /// What is restored: mlp, hidden or both.
    #[arg(long, default_value = "both")]
    kind: String,
    /// Noise samples (corrupted runs) per prompt.
    #[arg(long, default_value_t = 10)]
    noise_samples: usize,
    /// Layers restored around each centre layer, for every kind (default: 10 for mlp, 1 for hidden, as the reference).
    #[arg(long)]
    window: Option<usize>,
    /// Restored tokens: `key` (the subject's last token and the last token) or `all` (default: all for one prompt,
    /// key for --sample).
    #[arg(long)]
    positions: Option<String>,
    /// Noise standard deviation as a multiple of the token embeddings' (the reference's 3).
    #[arg(long, default_value_t = 3.0)]
    noise_multiplier: f64,
    /// Where the embeddings' standard deviation is measured: `vocabulary` (the whole embedding matrix) or `subjects`
    /// (the subjects' tokens: the prompt's, or those of the first 1,000 records of the seeded order).
    #[arg(long, default_value = "vocabulary")]
    noise_from: String,
    /// An absolute noise standard deviation instead (overrides --noise-multiplier and --noise-from).
    #[arg(long)]
    noise_std: Option<f64>,
    /// Write a plot here (SVG): the average curves with --sample, the heat map for one prompt.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The noise standard deviation the arguments ask for, with a description of it.
fn noise_std(args: &TraceArgs, model: &LoadedModel, subjects: &[TracePrompt]) -> Result<(f64, String)> {
    if let Some(std) = args.noise_std {
        return Ok((std, format!("{std:.4} (given)")));
    }
    let (base, source) = match args.noise_from.as_str() {
        "vocabulary" => (embedding_std(model, None)?, "token embeddings over the vocabulary"),
        "subjects" => (embedding_std(model, Some(&subject_tokens(subjects)))?, "the subjects' token embeddings"),
        other => bail!("--noise-from `{other}`: expected vocabulary or subjects"),
    };
    let std = args.noise_multiplier * base;
    Ok((std, format!("{std:.4} = {} × {base:.4} (std of {source})", args.noise_multiplier)))
}

fn settings(args: &TraceArgs, default_positions: Positions) -> Result<TraceSettings> {
    let positions = match &args.positions {
        Some(text) => Positions::parse(text)?,
        None => default_positions,
    };
    Ok(TraceSettings {
        kinds: Kind::parse_list(&args.kind)?,
        window: args.window,
        noise_samples: args.noise_samples,
        positions,
    })
}

/// Runs `editguard trace`.
pub fn run(args: TraceArgs, data_dir: Option<PathBuf>, model: LoadedModel) -> Result<()> {
    match (&args.prompt, &args.subject, args.sample) {
        (Some(prompt), Some(subject), None) => single(&args, prompt, subject, &model),
        (None, None, Some(n)) => sample(&args, n, data_dir, &model),
        _ => bail!("give either --prompt with --subject (one prompt) or --sample N (known COUNTERFACT facts)"),
    }
}

fn single(args: &TraceArgs, prompt: &str, subject: &str, model: &LoadedModel) -> Result<()> {
    let settings = settings(args, Positions::All)?;
    let prompt = TracePrompt::new(model, prompt, subject)?;
    let (top, probabilities) = next_token(model, &prompt.ids)?;
    let target = match &args.target {
        Some(text) => target_token(model, text)?,
        None => top,
    };
    let (std, described) = noise_std(args, model, std::slice::from_ref(&prompt))?;
    let noise = Noise::gaussian(model, &prompt, settings.noise_samples, std, args.seed)?;
    let trace = trace_prompt(model, &prompt, target, &settings, &noise)?;
    if let Some(path) = &args.plot {
        write_heatmap_svg(&trace, path)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&trace)?);
        return Ok(());
    }
    let rank = probabilities.iter().filter(|&&p| p > probabilities[target as usize]).count() + 1;
    println!("model       {} ({} layers)", model.id, model.dims().layers);
    println!("tokens      {}", marked_tokens(&trace));
    println!("target      {:?} (token {}, clean rank {rank})", trace.target, trace.target_id);
    println!("p(clean)    {:.4}", trace.p_clean);
    println!(
        "p(corrupt)  {:.4} ({} noise samples, std {described}, seed {})",
        trace.p_corrupted, noise.samples, args.seed
    );
    for kind in &trace.kinds {
        println!();
        println!(
            "indirect effect p(restored) − p(corrupted), restoring {} (window {}):",
            kind.kind.name(),
            kind.window
        );
        let mut header = format!("{:>5}", "layer");
        for &position in &trace.positions {
            header.push_str(&format!(" {:>9}", short_label(&trace, position)));
        }
        println!("{header}");
        for layer in 0..model.dims().layers {
            let mut row = format!("{layer:>5}");
            for restored in &kind.p_restored {
                row.push_str(&format!(" {:>9.4}", restored[layer] - trace.p_corrupted));
            }
            println!("{row}");
        }
    }
    println!();
    for kind in &trace.kinds {
        for (what, position) in [("subject's last token", prompt.subject_last()), ("last token", prompt.last())] {
            if let Some((layer, effect)) = trace.effects(kind.kind, position).and_then(|e| peak(&e)) {
                println!("peak        {:<6} at the {what:<20} layer {layer:>2} ({effect:+.4})", kind.kind.name());
            }
        }
    }
    println!("seconds     {:.2}", trace.seconds);
    if let Some(path) = &args.plot {
        println!("plot        {}", path.display());
    }
    Ok(())
}

/// The tokens with the subject's in brackets.
fn marked_tokens(trace: &PromptTrace) -> String {
    let p = &trace.prompt;
    trace
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let t = format!("{t:?}");
            if (p.subject_first..p.subject_end).contains(&i) { format!("[{t}]") } else { t }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A column label: the token (subject tokens starred), at most 9 characters.
fn short_label(trace: &PromptTrace, position: usize) -> String {
    let p = &trace.prompt;
    let star = if (p.subject_first..p.subject_end).contains(&position) { "*" } else { "" };
    let text: String = trace.tokens[position].trim().chars().take(8 - star.len()).collect();
    format!("{position}{star}:{text}").chars().take(9).collect()
}

fn peak(effects: &[f64]) -> Option<(usize, f64)> {
    effects.iter().copied().enumerate().filter(|(_, e)| e.is_finite()).max_by(|a, b| a.1.total_cmp(&b.1))
}

fn sample(args: &TraceArgs, wanted: usize, data_dir: Option<PathBuf>, model: &LoadedModel) -> Result<()> {
    let settings = settings(args, Positions::Key)?;
    let dataset = EditDataset::parse(&args.dataset)?;
    let ordered = seeded_order(&dataset.load(data_dir.as_deref())?, args.seed);
    let subjects: Vec<TracePrompt> = if args.noise_from == "subjects" && args.noise_std.is_none() {
        ordered.iter().take(1000).filter_map(|r| TracePrompt::new(model, &r.prompt, &r.subject).ok()).collect()
    } else {
        Vec::new()
    };
    let (std, described) = noise_std(args, model, &subjects)?;
    let bar = ProgressBar::new(wanted as u64).with_style(
        ProgressStyle::with_template("tracing {bar:30} {pos}/{len} known facts ({per_sec}, eta {eta}) {msg}")
            .expect("valid template"),
    );
    let report = trace_sample(model, &ordered, wanted, args.seed, &settings, std, &mut |p| {
        bar.set_position(p.kept as u64);
        bar.set_message(format!("{} records examined", p.examined));
    });
    bar.finish_and_clear();
    let report = report?;
    if let Some(path) = &args.plot {
        write_average_svg(&report, path)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_sample(&report, args, &described);
    Ok(())
}

fn print_sample(report: &SampleReport, args: &TraceArgs, described: &str) {
    println!("model       {} ({} layers)", report.model, report.layers);
    println!(
        "records     {} known facts traced of {} examined ({} order, seed {}; {} unusable: subject not found in the \
         tokens){}",
        report.kept,
        report.examined,
        args.dataset,
        args.seed,
        report.unusable,
        if report.kept < report.wanted { " — fewer than asked: the dataset ran out" } else { "" }
    );
    println!("noise       std {described}, {} samples per record", report.settings.noise_samples);
    println!("p(clean)    {:.4} (mean)", report.mean_p_clean);
    println!("p(corrupt)  {:.4} (mean)", report.mean_p_corrupted);
    for average in &report.kinds {
        println!();
        println!(
            "average indirect effect, restoring {} (window {}); records per column in brackets:",
            average.kind.name(),
            average.window
        );
        let mut header = format!("{:>5}", "layer");
        for curve in &average.curves {
            header.push_str(&format!(" {:>24}", format!("{} ({})", curve.category.label(), curve.records)));
        }
        println!("{header}");
        for layer in 0..report.layers {
            let mut row = format!("{layer:>5}");
            for curve in &average.curves {
                row.push_str(&format!(" {:>24.4}", curve.effect[layer]));
            }
            println!("{row}");
        }
    }
    println!();
    for average in &report.kinds {
        for category in [Category::LastSubject, Category::LastToken] {
            if let Some((layer, effect)) = average.curve(category).and_then(|c| c.peak()) {
                println!(
                    "peak        {:<6} at the {:<20} layer {layer:>2} of {} (average effect {effect:+.4})",
                    average.kind.name(),
                    category.label(),
                    report.layers
                );
            }
        }
    }
    println!(
        "seconds     {:.1} ({:.2} per traced record, filtering included)",
        report.seconds,
        report.seconds / report.kept as f64
    );
    if let Some(path) = &args.plot {
        println!("plot        {}", path.display());
    }
}

//! Average indirect effects over known facts: the paper's Figure 2 and 3 curves for any model of the registry.
//!
//! Records come in a seeded random order of an edit dataset (COUNTERFACT by default); a record is *known* when the
//! clean model's top-1 next token after its prompt is the first token of `" " + ground_truth` (the reference keeps
//! only known facts the same way). The first `records` known ones are traced, each with its own seeded noise, and the
//! indirect effects are averaged per kind, token category and centre layer. Token categories are the paper's: the
//! subject's first, middle and last tokens, the first token after the subject, further tokens and the prompt's last
//! token; a record's positions in a category are averaged first (a one-token subject counts as first and last), and
//! records without the category do not count towards it.

use serde::Serialize;

use super::{Kind, Noise, Positions, PromptTrace, TracePrompt, TraceSettings, target_token, top_tokens, trace_prompt};
use crate::error::{Error, Result};
use crate::methods::EditRequest;
use crate::model::LoadedModel;

/// A group of token positions relative to the subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    /// The subject's first token.
    FirstSubject,
    /// The subject's tokens between its first and last.
    MiddleSubject,
    /// The subject's last token.
    LastSubject,
    /// The first token after the subject.
    FirstSubsequent,
    /// Tokens after that, before the last.
    FurtherTokens,
    /// The prompt's last token.
    LastToken,
}

impl Category {
    /// All categories, in prompt order.
    pub const ALL: [Category; 6] = [
        Category::FirstSubject,
        Category::MiddleSubject,
        Category::LastSubject,
        Category::FirstSubsequent,
        Category::FurtherTokens,
        Category::LastToken,
    ];

    /// The categories averaged for traces restoring `positions`: with [`Positions::Key`] the restored tokens are the
    /// subject's last and the prompt's last, which may also be a first subject token (a one-token subject) or the
    /// first subsequent token (a subject right before the last token); only their own two categories are averaged.
    pub fn averaged(positions: Positions) -> &'static [Category] {
        match positions {
            Positions::Key => &[Category::LastSubject, Category::LastToken],
            Positions::All => &Category::ALL,
        }
    }

    /// A short label for tables and legends.
    pub fn label(self) -> &'static str {
        match self {
            Category::FirstSubject => "first subject token",
            Category::MiddleSubject => "middle subject tokens",
            Category::LastSubject => "last subject token",
            Category::FirstSubsequent => "first subsequent token",
            Category::FurtherTokens => "further tokens",
            Category::LastToken => "last token",
        }
    }

    /// Whether token `position` of `prompt` belongs to this category.
    pub fn contains(self, prompt: &TracePrompt, position: usize) -> bool {
        let (first, end, last) = (prompt.subject_first, prompt.subject_end, prompt.last());
        match self {
            Category::FirstSubject => position == first,
            Category::MiddleSubject => position > first && position + 1 < end,
            Category::LastSubject => position + 1 == end,
            Category::FirstSubsequent => position == end,
            Category::FurtherTokens => position > end && position < last,
            Category::LastToken => position == last,
        }
    }
}

/// The average effect of one kind at one token category.
#[derive(Debug, Clone, Serialize)]
pub struct CategoryCurve {
    /// The category.
    pub category: Category,
    /// Records that have a traced position in it.
    pub records: usize,
    /// Average indirect effect per centre layer.
    pub effect: Vec<f64>,
}

impl CategoryCurve {
    /// The centre layer with the largest average effect, and the effect.
    pub fn peak(&self) -> Option<(usize, f64)> {
        self.effect.iter().copied().enumerate().filter(|(_, e)| e.is_finite()).max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// The averages of one kind.
#[derive(Debug, Clone, Serialize)]
pub struct KindAverage {
    /// The kind.
    pub kind: Kind,
    /// Layers restored around each centre layer.
    pub window: usize,
    /// One curve per category with at least one record.
    pub curves: Vec<CategoryCurve>,
}

impl KindAverage {
    /// The curve of `category`, if any record had it.
    pub fn curve(&self, category: Category) -> Option<&CategoryCurve> {
        self.curves.iter().find(|c| c.category == category)
    }
}

/// What [`trace_sample`] reports.
#[derive(Debug, Clone, Serialize)]
pub struct SampleReport {
    /// Model id.
    pub model: String,
    /// Number of layers.
    pub layers: usize,
    /// Known records asked for.
    pub wanted: usize,
    /// Records looked at (in the seeded order) to find them.
    pub examined: usize,
    /// Records traced (known facts).
    pub kept: usize,
    /// Records whose subject could not be located in the tokenised prompt.
    pub unusable: usize,
    /// Standard deviation of the noise.
    pub noise_std: f64,
    /// The settings.
    pub settings: TraceSettings,
    /// Mean p(clean) over the traced records.
    pub mean_p_clean: f64,
    /// Mean p(corrupted).
    pub mean_p_corrupted: f64,
    /// Averages per kind.
    pub kinds: Vec<KindAverage>,
    /// Every record's trace (ids in `ids`, same order).
    pub traces: Vec<PromptTrace>,
    /// Dataset ids of the traced records.
    pub ids: Vec<String>,
    /// Seconds in all (filtering included).
    pub seconds: f64,
}

impl SampleReport {
    /// The averages of `kind`, if traced.
    pub fn kind(&self, kind: Kind) -> Option<&KindAverage> {
        self.kinds.iter().find(|k| k.kind == kind)
    }
}

/// Records whose known-ness is checked in one packed clean pass.
const FILTER_CHUNK: usize = 32;

/// Progress of a sample trace: records examined and kept so far.
#[derive(Debug, Clone, Copy)]
pub struct SampleProgress {
    /// Records looked at.
    pub examined: usize,
    /// Known records traced.
    pub kept: usize,
}

/// The noise seed of the `index`-th record of an order seeded with `seed` (SplitMix64 of the pair).
pub fn record_seed(seed: u64, index: usize) -> u64 {
    let mut z = seed.wrapping_add((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Traces the first `wanted` records of `ordered` (already in their seeded order) that the model knows, with noise
/// of standard deviation `noise_std` seeded per record from `seed` and its index in the order, and averages them.
pub fn trace_sample(
    model: &LoadedModel,
    ordered: &[EditRequest],
    wanted: usize,
    seed: u64,
    settings: &TraceSettings,
    noise_std: f64,
    progress: &mut dyn FnMut(SampleProgress),
) -> Result<SampleReport> {
    let started = std::time::Instant::now();
    let (mut examined, mut unusable_at) = (0, Vec::new());
    let (mut traces, mut ids) = (Vec::new(), Vec::new());
    // Known facts are found a chunk of records at a time (one packed clean pass per chunk), then traced in order.
    'chunks: for (chunk_index, chunk) in ordered.chunks(FILTER_CHUNK).enumerate() {
        let mut candidates = Vec::new();
        for (offset, request) in chunk.iter().enumerate() {
            let index = chunk_index * FILTER_CHUNK + offset;
            match (request.ground_truth.as_deref(), TracePrompt::new(model, &request.prompt, &request.subject)) {
                (Some(truth), Ok(prompt)) => candidates.push((index, request, prompt, target_token(model, truth)?)),
                _ => unusable_at.push(index),
            }
        }
        let prompts: Vec<&[u32]> = candidates.iter().map(|(_, _, prompt, _)| prompt.ids.as_slice()).collect();
        let tops = top_tokens(model, &prompts)?;
        let last_in_chunk = chunk_index * FILTER_CHUNK + chunk.len();
        for ((index, request, prompt, target), top) in candidates.iter().zip(tops) {
            if top != *target {
                continue;
            }
            let noise = Noise::gaussian(model, prompt, settings.noise_samples, noise_std, record_seed(seed, *index))?;
            traces.push(trace_prompt(model, prompt, *target, settings, &noise)?);
            ids.push(request.id.clone());
            examined = index + 1;
            progress(SampleProgress { examined, kept: traces.len() });
            if traces.len() == wanted {
                break 'chunks;
            }
        }
        examined = last_in_chunk;
        progress(SampleProgress { examined, kept: traces.len() });
    }
    // Records after the last traced one in its chunk were looked at but do not count as examined.
    let unusable = unusable_at.iter().filter(|&&index| index < examined).count();
    if traces.is_empty() {
        return Err(Error::invalid(
            "(trace)",
            "sample",
            format!("none of the {examined} records examined is known to {} (top-1 = the true target)", model.id),
        ));
    }
    let layers = model.dims().layers;
    let categories = Category::averaged(settings.positions);
    let kinds = settings
        .kinds
        .iter()
        .map(|&kind| average_kind(&traces, kind, settings.window(kind), layers, categories))
        .collect();
    let mean = |f: &dyn Fn(&PromptTrace) -> f64| traces.iter().map(f).sum::<f64>() / traces.len() as f64;
    Ok(SampleReport {
        model: model.id.clone(),
        layers,
        wanted,
        examined,
        kept: traces.len(),
        unusable,
        noise_std,
        settings: settings.clone(),
        mean_p_clean: mean(&|t| t.p_clean),
        mean_p_corrupted: mean(&|t| t.p_corrupted),
        kinds,
        traces,
        ids,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Per category, the mean over records of each record's mean effect over its positions in the category.
fn average_kind(
    traces: &[PromptTrace],
    kind: Kind,
    window: usize,
    layers: usize,
    categories: &[Category],
) -> KindAverage {
    let mut curves = Vec::new();
    for &category in categories {
        let mut total = vec![0.0; layers];
        let mut records = 0;
        for trace in traces {
            let per_position: Vec<Vec<f64>> = trace
                .positions
                .iter()
                .filter(|&&p| category.contains(&trace.prompt, p))
                .filter_map(|&p| trace.effects(kind, p))
                .collect();
            if per_position.is_empty() {
                continue;
            }
            records += 1;
            for (layer, sum) in total.iter_mut().enumerate() {
                *sum += per_position.iter().map(|e| e[layer]).sum::<f64>() / per_position.len() as f64;
            }
        }
        if records > 0 {
            let effect = total.into_iter().map(|s| s / records as f64).collect();
            curves.push(CategoryCurve { category, records, effect });
        }
    }
    KindAverage { kind, window, curves }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(subject: std::ops::Range<usize>, tokens: usize) -> TracePrompt {
        TracePrompt {
            template: String::new(),
            subject: String::new(),
            ids: vec![0; tokens],
            subject_first: subject.start,
            subject_end: subject.end,
        }
    }

    fn categories_of(prompt: &TracePrompt, position: usize) -> Vec<Category> {
        Category::ALL.into_iter().filter(|c| c.contains(prompt, position)).collect()
    }

    #[test]
    fn token_categories_are_the_papers() {
        use Category::*;
        let p = prompt(1..4, 8); // BOS, three subject tokens, four more
        let expected: [&[Category]; 8] = [
            &[],
            &[FirstSubject],
            &[MiddleSubject],
            &[LastSubject],
            &[FirstSubsequent],
            &[FurtherTokens],
            &[FurtherTokens],
            &[LastToken],
        ];
        for (position, expected) in expected.iter().enumerate() {
            assert_eq!(categories_of(&p, position), *expected, "position {position}");
        }
        // A one-token subject right before the last token: first and last subject; first subsequent and last.
        let short = prompt(2..3, 4);
        assert_eq!(categories_of(&short, 2), vec![FirstSubject, LastSubject]);
        assert_eq!(categories_of(&short, 3), vec![FirstSubsequent, LastToken]);
        assert_eq!(Category::averaged(Positions::Key), &[LastSubject, LastToken]);
    }

    #[test]
    fn record_seeds_differ_and_repeat() {
        assert_eq!(record_seed(0, 5), record_seed(0, 5));
        assert_ne!(record_seed(0, 5), record_seed(0, 6));
        assert_ne!(record_seed(0, 5), record_seed(1, 5));
    }
}

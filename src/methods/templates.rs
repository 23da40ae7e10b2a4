//! Context templates: short generated prefixes that ROME and MEMIT put before a prompt, so that keys and target
//! vectors are averaged over contexts instead of fitted to one string.
//!
//! Two styles are supported. `easyedit` (the default) starts generation from each of "The", "Therefore",
//! "Because", "I", "You" (n/5 samples per word) and removes braces from the text; `kmeng01` starts every sample
//! from the end-of-text token, as the original ROME code does. Each generated text `x` becomes the template
//! `"x. {}"`; the list starts with the bare `"{}"`. Sampling is top-k (k = 5) with candle-transformers'
//! `LogitsProcessor` and a fixed seed, so the same seed gives the same templates. `length` counts the tokens of the
//! whole generated text, start word included (the references' `max_out_len`).

use candle_transformers::generation::{LogitsProcessor, Sampling};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::model::generation::extend_each;

/// Where generation starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateStyle {
    /// From "The", "Therefore", "Because", "I", "You".
    #[default]
    Easyedit,
    /// From the end-of-text token.
    Kmeng01,
}

/// How many templates of which length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateParams {
    /// Style.
    #[serde(default)]
    pub style: TemplateStyle,
    /// `[length, count]` pairs, e.g. `[[5, 10], [10, 10]]`.
    pub lengths: Vec<[usize; 2]>,
    /// Sampling seed.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Top-k of the sampler.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

fn default_seed() -> u64 {
    0
}
fn default_top_k() -> usize {
    5
}

/// Templates generated on first use and kept: the references generate them once, from the model as it is at the first
/// edit, and reuse them for every later edit of a run.
pub struct TemplateCache {
    params: TemplateParams,
    templates: std::sync::Mutex<Option<Vec<String>>>,
}

impl TemplateCache {
    /// A cache for templates made with `params`.
    pub fn new(params: TemplateParams) -> Self {
        TemplateCache { params, templates: std::sync::Mutex::new(None) }
    }

    /// The templates, generating them with `model` the first time.
    pub fn get(&self, model: &LoadedModel) -> Result<Vec<String>> {
        let mut slot = self.templates.lock().map_err(|_| Error::invalid("(templates)", "cache", "lock poisoned"))?;
        if slot.is_none() {
            *slot = Some(context_templates(model, &self.params)?);
        }
        Ok(slot.clone().unwrap_or_default())
    }
}

/// The start words of the `easyedit` style.
pub const START_WORDS: [&str; 5] = ["The", "Therefore", "Because", "I", "You"];

/// Generates `["{}", "x₁. {}", …]`.
pub fn context_templates(model: &LoadedModel, params: &TemplateParams) -> Result<Vec<String>> {
    let mut sampler = LogitsProcessor::from_sampling(params.seed, Sampling::TopK { k: params.top_k, temperature: 1.0 });
    let mut templates = vec!["{}".to_string()];
    for &[length, count] in &params.lengths {
        let starts: Vec<Vec<u32>> = match params.style {
            TemplateStyle::Easyedit => {
                let per_word = count / START_WORDS.len();
                let words = START_WORDS.iter().map(|w| model.encode(w)).collect::<Result<Vec<_>>>()?;
                words.into_iter().flat_map(|w| std::iter::repeat_n(w, per_word)).collect()
            }
            TemplateStyle::Kmeng01 => vec![vec![end_of_text(model)?]; count],
        };
        for text in generate(model, starts, length, &mut sampler)? {
            let text = match params.style {
                TemplateStyle::Easyedit => text.replace(['{', '}'], ""),
                TemplateStyle::Kmeng01 => text.replace("\n\n", " "),
            };
            templates.push(format!("{}. {{}}", text.trim_end()));
        }
    }
    if std::env::var_os("EDITGUARD_TRACE").is_some() {
        eprintln!("context templates: {templates:?}");
    }
    Ok(templates)
}

fn end_of_text(model: &LoadedModel) -> Result<u32> {
    ["<|endoftext|>", "</s>", "<|im_end|>"]
        .iter()
        .find_map(|t| model.tokenizer.token_to_id(t))
        .ok_or_else(|| Error::Tokenizer("no end-of-text token for the kmeng01 template style".into()))
}

/// Continues every row until it holds `length` tokens (at least one new token), all rows in one batch per step
/// (decoding with a key/value cache), and decodes the results without special tokens.
fn generate(
    model: &LoadedModel,
    rows: Vec<Vec<u32>>,
    length: usize,
    sampler: &mut LogitsProcessor,
) -> Result<Vec<String>> {
    let targets: Vec<usize> = rows.iter().map(|r| length.max(r.len() + 1)).collect();
    let rows = extend_each(model, &rows, &targets, &mut |logits| Ok(sampler.sample(logits)?))?;
    rows.iter()
        .map(|row| {
            let skip = usize::from(model.tokenizer.id_to_token(row[0]).is_some_and(|t| t.starts_with("<|")));
            model.tokenizer.decode(&row[skip..], true).map_err(|e| Error::Tokenizer(e.to_string()))
        })
        .collect()
}

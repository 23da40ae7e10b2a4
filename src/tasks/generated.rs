//! Tasks scored on greedily generated text: each item's prompt is continued greedily
//! ([`crate::model::generate_greedy`]) and the continuation is scored against the item's references by the task's
//! metric ([`super::text_metrics`]). Per-item scores are averaged, except entity F1, which is micro-averaged over
//! the counts of all items (as CoNLL's evaluation).

use super::text_metrics::{
    entity_counts, first_word, gsm8k_answer, listed_entities, lm_eval_exact_match, micro_f1, rouge_mean, squad_best_f1,
};
use super::{Metric, Scored};
use crate::error::{Error, Result};
use crate::model::{GenerationRequest, LoadedModel, generate_greedy};

/// One item of a generation task.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationItem {
    /// Prompt, token cap and stop strings.
    pub request: GenerationRequest,
    /// The reference answers (for unanswerable SQuAD questions: none; for entity lists: every gold entity).
    pub references: Vec<String>,
    /// For label answers: every label the prompt allows (the random floor is one over their number).
    pub labels: Vec<String>,
}

impl GenerationItem {
    /// An item with free-text references.
    pub fn new(prompt: String, max_new_tokens: usize, stop: &[&str], references: Vec<String>) -> Self {
        let stop = stop.iter().map(|s| s.to_string()).collect();
        GenerationItem { request: GenerationRequest { prompt, max_new_tokens, stop }, references, labels: Vec::new() }
    }

    /// An item answered by one word among `labels`, generated in at most `max_new_tokens` tokens.
    pub fn label(prompt: String, max_new_tokens: usize, labels: &[&str], gold: usize) -> Self {
        let labels: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
        GenerationItem {
            request: GenerationRequest { prompt, max_new_tokens, stop: Vec::new() },
            references: vec![labels[gold].clone()],
            labels,
        }
    }
}

/// What one item contributes to the task score.
enum ItemScore {
    Value(f64),
    Counts([usize; 3]),
}

fn score_item(metric: Metric, text: &str, item: &GenerationItem) -> Result<ItemScore> {
    let value = |ok: bool| ItemScore::Value(f64::from(u8::from(ok)));
    Ok(match metric {
        Metric::ExactMatch => value(lm_eval_exact_match(text, &item.references)),
        Metric::F1 => ItemScore::Value(squad_best_f1(text, &item.references)),
        Metric::SolveRate => {
            let gold = item.references.first().and_then(|r| gsm8k_answer(r));
            value(gold.is_some() && gsm8k_answer(text) == gold)
        }
        Metric::Rouge => ItemScore::Value(item.references.first().map_or(0.0, |r| rouge_mean(text, r))),
        Metric::EntityF1 => ItemScore::Counts(entity_counts(&listed_entities(text), &item.references)),
        Metric::LabelWord => {
            let word = first_word(text);
            value(item.references.first().is_some_and(|gold| word == gold.to_lowercase()))
        }
        other => {
            return Err(Error::invalid(
                "(task table)",
                "metric",
                format!("`{}` is not a generation metric", other.name()),
            ));
        }
    })
}

/// How many times the scoring token budget a generation chunk may hold (prompts plus new tokens).
const GENERATION_BUDGET_FACTOR: usize = 4;

/// Generates a continuation for every item and scores them under `metric`.
pub fn score(model: &LoadedModel, items: &[GenerationItem], metric: Metric, token_budget: usize) -> Result<Scored> {
    let requests: Vec<GenerationRequest> = items.iter().map(|i| i.request.clone()).collect();
    // A decoding step reads every weight once whatever the batch, so larger chunks than for scoring pay off.
    let generations = generate_greedy(model, &requests, token_budget * GENERATION_BUDGET_FACTOR)?;
    let (mut sum, mut counts) = (0.0, [0usize; 3]);
    for (item, generation) in items.iter().zip(&generations) {
        match score_item(metric, &generation.text, item)? {
            ItemScore::Value(v) => sum += v,
            ItemScore::Counts(c) => counts.iter_mut().zip(c).for_each(|(total, n)| *total += n),
        }
    }
    let score = if metric == Metric::EntityF1 { micro_f1(counts) } else { sum / items.len() as f64 };
    let floor = items.iter().map(|i| if i.labels.is_empty() { 0.0 } else { 1.0 / i.labels.len() as f64 }).sum::<f64>()
        / items.len() as f64;
    Ok(Scored { score, accuracies: None, floor })
}

//! SQuAD 2.0 (Rajpurkar et al. 2018): reading comprehension where some questions have no answer in the passage; the
//! shipped dev subset holds the first two articles (706 questions, 320 unanswerable).
//!
//! Prompt (lm-evaluation-harness `squadv2`): `"Title: {title}\n\nBackground: {context}\n\nQuestion: {question}\n\n
//! Answer:"`, greedy until a newline (capped at 32 tokens; lm-eval's default cap is 256). Metric: SQuAD F1, the best
//! over the reference answers; an unanswerable question's only reference is the empty answer, so it scores 1 exactly
//! when the model generates nothing before the newline — as the official script with its default no-answer threshold
//! (lm-eval also scores `" unanswerable"` for the threshold-searched `best_f1`, which editguard does not report).
//! Data: `squad2/dev-v2.0.json` (official format).

use std::path::Path;

use serde::Deserialize;

use super::{GenerationItem, Metric, Task, TaskEntry, TaskItems, read_data_file};
use crate::error::{Error, Result};

/// The task table row.
pub const SQUAD2: TaskEntry = TaskEntry {
    name: "squad2",
    metric: Metric::F1,
    prompt: "lm-eval: \"Title: …\\n\\nBackground: {context}\\n\\nQuestion: {question}\\n\\nAnswer:\", greedy until \\n",
    build: || Box::new(Squad2),
};

struct Squad2;

#[derive(Deserialize)]
struct File {
    data: Vec<Article>,
}

#[derive(Deserialize)]
struct Article {
    title: String,
    paragraphs: Vec<Paragraph>,
}

#[derive(Deserialize)]
struct Paragraph {
    context: String,
    qas: Vec<Question>,
}

#[derive(Deserialize)]
struct Question {
    question: String,
    answers: Vec<Answer>,
}

#[derive(Deserialize)]
struct Answer {
    text: String,
}

impl Task for Squad2 {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let (path, text) = read_data_file(data_dir, "squad2/dev-v2.0.json")?;
        let file: File = serde_json::from_str(&text).map_err(|e| Error::Dataset {
            name: path.display().to_string(),
            message: format!("expected the official SQuAD v2.0 JSON: {e}"),
        })?;
        let mut items = Vec::new();
        for article in &file.data {
            let title = article.title.replace('_', " ");
            for paragraph in &article.paragraphs {
                for qa in &paragraph.qas {
                    let prompt = format!(
                        "Title: {title}\n\nBackground: {}\n\nQuestion: {}\n\nAnswer:",
                        paragraph.context, qa.question
                    );
                    let references = qa.answers.iter().map(|a| a.text.clone()).collect();
                    items.push(GenerationItem::new(prompt, 32, &["\n"], references));
                }
            }
        }
        Ok(TaskItems::Generation(items))
    }
}

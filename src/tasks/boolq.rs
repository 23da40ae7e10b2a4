//! BoolQ (SuperGLUE): yes/no questions about a passage; the 3,270 validation items.
//!
//! Two prompt styles. `boolq` (lm-evaluation-harness `super_glue/boolq`): `"{passage}\nQuestion: {question}?\nAnswer:"`,
//! choices `no`, `yes` by loglikelihood. The data file (`boolq/boolq.jsonl`, llm-foundry's form) holds `query =
//! "Passage: {passage}\nQuestion: {question}?"`, `choices` and `gold`; editguard appends `"\nAnswer:"`, so the prompt
//! differs from lm-eval's by the leading `"Passage: "`. `boolq-gu` (Gu et al. 2024, `test-ClosedDomainQA.py`):
//! `"Please answer the given question based on the passage. The answer should be exact 'yes' or 'no'. passage:
//! {passage} question: {question}. answer:"`, one greedy token whose word must be the label (Gu's pre-edit script
//! wants exactly `" yes"`/`" no"`, the post-edit one a substring; the first word is between the two).

use std::path::Path;

use serde::Deserialize;

use super::{ChoiceItem, GenerationItem, Metric, PromptStyle, Task, TaskEntry, TaskItems, bad_record, read_jsonl};
use crate::error::Result;

/// The lm-eval row.
pub const BOOLQ: TaskEntry = TaskEntry {
    name: "boolq",
    metric: Metric::Acc,
    prompt: "lm-eval: \"Passage: {passage}\\nQuestion: {question}?\\nAnswer:\" + \" no|yes\"",
    build: || Box::new(Boolq { style: PromptStyle::LmEval }),
};

/// The Gu et al. row.
pub const BOOLQ_GU: TaskEntry = TaskEntry {
    name: "boolq-gu",
    metric: Metric::LabelWord,
    prompt: "Gu et al.: \"Please answer the given question based on the passage. … passage: {passage} question: \
             {question}. answer:\", 1 token",
    build: || Box::new(Boolq { style: PromptStyle::Gu }),
};

struct Boolq {
    style: PromptStyle,
}

#[derive(Deserialize)]
struct Record {
    query: String,
    choices: Vec<String>,
    gold: usize,
}

impl Task for Boolq {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let (path, records) = read_jsonl::<Record>(data_dir, "boolq/boolq.jsonl")?;
        let records = records.into_iter().map(|(line, record)| {
            if record.gold >= record.choices.len() {
                return Err(bad_record(&path, line, "gold is not an index of choices"));
            }
            Ok((line, record))
        });
        Ok(match self.style {
            PromptStyle::LmEval => TaskItems::Choice(
                records
                    .map(|r| {
                        let (_, record) = r?;
                        Ok(ChoiceItem {
                            context: format!("{}\nAnswer:", record.query.trim_end()),
                            choices: record.choices,
                            gold: record.gold,
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            PromptStyle::Gu => TaskItems::Generation(
                records
                    .map(|r| {
                        let (line, record) = r?;
                        let (passage, question) = record
                            .query
                            .strip_prefix("Passage: ")
                            .and_then(|q| q.split_once("\nQuestion: "))
                            .ok_or_else(|| bad_record(&path, line, "expected `Passage: …\\nQuestion: …` in query"))?;
                        let question = question.trim().trim_end_matches('?');
                        let prompt = format!(
                            "Please answer the given question based on the passage. The answer should be exact 'yes' \
                             or 'no'. passage: {} question: {question}. answer:",
                            passage.trim()
                        );
                        let labels: Vec<&str> = record.choices.iter().map(String::as_str).collect();
                        Ok(GenerationItem::label(prompt, 1, &labels, record.gold))
                    })
                    .collect::<Result<_>>()?,
            ),
        })
    }
}

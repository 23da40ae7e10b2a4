//! BoolQ (SuperGLUE): yes/no questions about a passage; the 3,270 validation items.
//!
//! Prompt (lm-evaluation-harness `super_glue/boolq`): `"{passage}\nQuestion: {question}?\nAnswer:"`, choices `no`,
//! `yes`. The data file (`boolq/boolq.jsonl`, llm-foundry's form) holds `query = "Passage: {passage}\nQuestion:
//! {question}?"`, `choices` and `gold`; editguard appends `"\nAnswer:"`, so the prompt differs from lm-eval's by the
//! leading `"Passage: "`.

use std::path::Path;

use serde::Deserialize;

use super::{ChoiceItem, Metric, Task, TaskEntry, bad_record, read_data_file};
use crate::error::Result;

/// The task table row.
pub const BOOLQ: TaskEntry = TaskEntry {
    name: "boolq",
    metric: Metric::Acc,
    prompt: "lm-eval: \"Passage: {passage}\\nQuestion: {question}?\\nAnswer:\" + \" no|yes\"",
    build: || Box::new(Boolq),
};

struct Boolq;

#[derive(Deserialize)]
struct Record {
    query: String,
    choices: Vec<String>,
    gold: usize,
}

impl Task for Boolq {
    fn items(&self, data_dir: Option<&Path>) -> Result<Vec<ChoiceItem>> {
        let (path, text) = read_data_file(data_dir, "boolq/boolq.jsonl")?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let record: Record = serde_json::from_str(line).map_err(|e| bad_record(&path, i + 1, e.to_string()))?;
                if record.gold >= record.choices.len() {
                    return Err(bad_record(&path, i + 1, "gold is not an index of choices"));
                }
                Ok(ChoiceItem {
                    context: format!("{}\nAnswer:", record.query.trim_end()),
                    choices: record.choices,
                    gold: record.gold,
                })
            })
            .collect()
    }
}

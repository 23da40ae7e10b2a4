//! NQ-open (Lee et al. 2019): open-domain questions from Natural Questions with short answers; the 3,610 dev items.
//!
//! Prompt (lm-evaluation-harness `nq_open.yaml`): `"Answer these questions:\n\nQ: {question}?\nA:"`, greedy until a
//! newline, `.` or `,`; exact match after lm-eval's normalisation against any of the answers. lm-eval caps generation at
//! its default of 256 tokens; editguard caps it at 32 (the answers are a few words; a continuation that runs longer
//! without a stop cannot match). Gu et al.'s NQ prompt needs GenRead background passages, which the offline data does
//! not have, so only this style exists. Data: `nq_open/NQ-open.dev.jsonl` (`{question, answer: [..]}`).

use std::path::Path;

use serde::Deserialize;

use super::{GenerationItem, Metric, Task, TaskEntry, TaskItems, bad_record, read_jsonl};
use crate::error::Result;

/// The task table row.
pub const NQ_OPEN: TaskEntry = TaskEntry {
    name: "nq-open",
    metric: Metric::ExactMatch,
    prompt: "lm-eval: \"Answer these questions:\\n\\nQ: {question}?\\nA:\", greedy until \\n . , (≤32 tokens)",
    build: || Box::new(NqOpen),
};

struct NqOpen;

#[derive(Deserialize)]
struct Record {
    question: String,
    answer: Vec<String>,
}

impl Task for NqOpen {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let (path, records) = read_jsonl::<Record>(data_dir, "nq_open/NQ-open.dev.jsonl")?;
        let items = records
            .into_iter()
            .map(|(line, record)| {
                if record.answer.is_empty() {
                    return Err(bad_record(&path, line, "expected at least one answer"));
                }
                let prompt = format!("Answer these questions:\n\nQ: {}?\nA:", record.question.trim());
                Ok(GenerationItem::new(prompt, 32, &["\n", ".", ","], record.answer))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TaskItems::Generation(items))
    }
}

//! GSM8K (Cobbe et al. 2021): grade-school maths word problems; solve rate on the test problems.
//!
//! Prompt (lm-evaluation-harness `gsm8k.yaml`, 5-shot): five solved problems `"Question: {q}\nAnswer: {solution}"`
//! joined by blank lines, then `"Question: {q}\nAnswer:"`; greedy until `"Question:"` or a blank line, at most 256 new
//! tokens; strict match: the first `#### <number>` of the generation equals the reference's. Deviations: lm-eval draws
//! the shots at random from the train split, which the offline data does not have, so the shots are the first five
//! test problems, and those five are not scored (1,314 items); the blank-line stop ends a solution the shots'
//! format has finished, saving the rest of the 256 tokens. Gu et al.'s GSM8K prompt puts the gold rationale in the
//! prompt (only the final number is left to copy), so it is not offered. Data: `gsm8k/test.jsonl`
//! (`{question, answer: "… #### 18"}`).

use std::path::Path;

use serde::Deserialize;

use super::text_metrics::gsm8k_answer;
use super::{GenerationItem, Metric, Task, TaskEntry, TaskItems, bad_record, read_jsonl};
use crate::error::Result;

/// The task table row.
pub const GSM8K: TaskEntry = TaskEntry {
    name: "gsm8k",
    metric: Metric::SolveRate,
    prompt: "lm-eval, 5-shot: \"Question: {q}\\nAnswer: {solution}\" ×5 + \"Question: {q}\\nAnswer:\", strict #### match",
    build: || Box::new(Gsm8k),
};

/// Solved problems shown before each question.
const SHOTS: usize = 5;

struct Gsm8k;

#[derive(Deserialize)]
struct Record {
    question: String,
    answer: String,
}

impl Task for Gsm8k {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let (path, records) = read_jsonl::<Record>(data_dir, "gsm8k/test.jsonl")?;
        let records = records
            .into_iter()
            .map(|(line, record)| {
                if gsm8k_answer(&record.answer).is_none() {
                    return Err(bad_record(&path, line, "expected the answer to end in `#### <number>`"));
                }
                Ok(record)
            })
            .collect::<Result<Vec<_>>>()?;
        let shots: String = records
            .iter()
            .take(SHOTS)
            .map(|r| format!("Question: {}\nAnswer: {}\n\n", r.question.trim(), r.answer.trim()))
            .collect();
        let items = records
            .iter()
            .skip(SHOTS)
            .map(|r| {
                let prompt = format!("{shots}Question: {}\nAnswer:", r.question.trim());
                GenerationItem::new(prompt, 256, &["Question:", "\n\n"], vec![r.answer.clone()])
            })
            .collect();
        Ok(TaskItems::Generation(items))
    }
}

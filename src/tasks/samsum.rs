//! SAMSum (Gliwa et al. 2019): abstractive summaries of messenger dialogues; the 819 test dialogues.
//!
//! Prompt (Gu et al. 2024, `test-summarization.py`): `"{dialogue}\nTL;DR:"`, 25 greedy new tokens; the score is the
//! mean of the ROUGE-1, ROUGE-2 and ROUGE-L F-scores against the reference summary. lm-evaluation-harness has no
//! SAMSum task, so Gu's style is the only one. Gu's script cuts a fixed 13 characters off every generation (the
//! length of `<|endoftext|>`); editguard instead stops at the end-of-text token. Data: `samsum/test.jsonl`
//! (`{context: dialogue, response: summary}`).

use std::path::Path;

use serde::Deserialize;

use super::{GenerationItem, Metric, Task, TaskEntry, TaskItems, bad_record, read_jsonl};
use crate::error::Result;

/// The task table row.
pub const SAMSUM: TaskEntry = TaskEntry {
    name: "samsum",
    metric: Metric::Rouge,
    prompt: "Gu et al.: \"{dialogue}\\nTL;DR:\", 25 new tokens, mean ROUGE-1/2/L F",
    build: || Box::new(Samsum),
};

struct Samsum;

#[derive(Deserialize)]
struct Record {
    context: String,
    response: String,
}

impl Task for Samsum {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let (path, records) = read_jsonl::<Record>(data_dir, "samsum/test.jsonl")?;
        let items = records
            .into_iter()
            .map(|(line, record)| {
                if record.response.trim().is_empty() {
                    return Err(bad_record(&path, line, "empty reference summary"));
                }
                let dialogue = record.context.replace("\r\n", "\n");
                Ok(GenerationItem::new(format!("{}\nTL;DR:", dialogue.trim()), 25, &[], vec![record.response]))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TaskItems::Generation(items))
    }
}

//! LAMBADA (Paperno et al. 2016, OpenAI's preprocessed test set): predict a passage's last word; 5,153 passages.
//!
//! As lm-evaluation-harness's `lambada_openai`: the context is the passage without its last word, the target is
//! `" " + last word`, and an item counts when greedy decoding reproduces every token of the target (the target's
//! tokens are all arg-max predictions). Data: `lambada/lambada_openai.jsonl` (`{context, continuation}`).

use std::path::Path;

use serde::Deserialize;

use super::{ChoiceItem, Metric, Task, TaskEntry, TaskItems, bad_record, read_jsonl};
use crate::error::Result;

/// The task table row.
pub const LAMBADA: TaskEntry = TaskEntry {
    name: "lambada",
    metric: Metric::Greedy,
    prompt: "lm-eval: \"{passage without its last word}\" + \" {last word}\", greedy",
    build: || Box::new(Lambada),
};

struct Lambada;

#[derive(Deserialize)]
struct Record {
    context: String,
    continuation: String,
}

impl Task for Lambada {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let (path, records) = read_jsonl::<Record>(data_dir, "lambada/lambada_openai.jsonl")?;
        records
            .into_iter()
            .map(|(line, record)| {
                if record.continuation.trim().is_empty() {
                    return Err(bad_record(&path, line, "empty continuation"));
                }
                Ok(ChoiceItem {
                    context: record.context.trim_end().to_string(),
                    choices: vec![record.continuation.trim().to_string()],
                    gold: 0,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(TaskItems::Choice)
    }
}

//! PIQA (Bisk et al. 2020): physical commonsense, two solutions per goal; the 1,838 dev items.
//!
//! Prompt (lm-evaluation-harness `piqa.yaml`): `"Question: {goal}\nAnswer:"`, choices `sol1`, `sol2`. Data:
//! `piqa/dev.jsonl` (`{id, goal, sol1, sol2}`) and `piqa/dev-labels.lst` (one 0/1 label per line).

use std::path::Path;

use serde::Deserialize;

use super::{ChoiceItem, Metric, Task, TaskEntry, TaskItems, bad_record, binary_label, read_data_file};
use crate::error::Result;

/// The task table row.
pub const PIQA: TaskEntry = TaskEntry {
    name: "piqa",
    metric: Metric::Acc,
    prompt: "lm-eval: \"Question: {goal}\\nAnswer:\" + \" {solution}\"",
    build: || Box::new(Piqa),
};

struct Piqa;

#[derive(Deserialize)]
struct Record {
    goal: String,
    sol1: String,
    sol2: String,
}

impl Task for Piqa {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let (path, text) = read_data_file(data_dir, "piqa/dev.jsonl")?;
        let (labels_path, labels) = read_data_file(data_dir, "piqa/dev-labels.lst")?;
        let labels: Vec<&str> = labels.lines().filter(|l| !l.trim().is_empty()).collect();
        let records: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if labels.len() != records.len() {
            return Err(bad_record(
                &labels_path,
                labels.len(),
                format!("{} labels for {} records in {}", labels.len(), records.len(), path.display()),
            ));
        }
        records
            .iter()
            .zip(labels)
            .enumerate()
            .map(|(i, (line, label))| {
                let record: Record = serde_json::from_str(line).map_err(|e| bad_record(&path, i + 1, e.to_string()))?;
                let gold = binary_label(&labels_path, i + 1, label)?;
                Ok(ChoiceItem {
                    context: format!("Question: {}\nAnswer:", record.goal),
                    choices: vec![record.sol1, record.sol2],
                    gold,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(TaskItems::Choice)
    }
}

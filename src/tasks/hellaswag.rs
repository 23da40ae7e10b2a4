//! HellaSwag (Zellers et al. 2019): commonsense sentence completion, four endings; the 10,042 validation items.
//!
//! Prompt (lm-evaluation-harness `hellaswag.yaml`): the preprocessed `"{activity_label}: {ctx_a} {Ctx_b}"` as
//! context, the preprocessed endings as choices; `acc_norm` (per-character normalisation) is the usual headline.
//! Data: `hellaswag/hellaswag_val_full.txt.bz2`, llama.cpp's preprocessing of the same validation set: six lines per
//! item — context, gold index (0-3), four endings — already in lm-eval's preprocessed form.

use std::io::Read;
use std::path::Path;

use super::{ChoiceItem, Metric, Task, TaskEntry, TaskItems, bad_record};
use crate::error::{Error, Result};

/// The task table row.
pub const HELLASWAG: TaskEntry = TaskEntry {
    name: "hellaswag",
    metric: Metric::AccNorm,
    prompt: "lm-eval: \"{activity}: {context}\" + \" {ending}\" (preprocessed as lm-eval)",
    build: || Box::new(Hellaswag),
};

struct Hellaswag;

impl Task for Hellaswag {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let path = crate::data::data_file(data_dir, "hellaswag/hellaswag_val_full.txt.bz2")?;
        let file = std::fs::File::open(&path).map_err(|e| crate::data::unreadable(&path, e))?;
        let mut text = String::new();
        bzip2::read::BzDecoder::new(file).read_to_string(&mut text).map_err(|e| Error::Dataset {
            name: path.display().to_string(),
            message: format!("bad bzip2 text: {e}"),
        })?;
        let lines: Vec<&str> = text.lines().collect();
        if !lines.len().is_multiple_of(6) {
            return Err(bad_record(&path, lines.len(), "expected six lines per item"));
        }
        lines
            .chunks(6)
            .enumerate()
            .map(|(i, item)| {
                let gold: usize = item[1]
                    .trim()
                    .parse()
                    .ok()
                    .filter(|g| *g < 4)
                    .ok_or_else(|| bad_record(&path, i * 6 + 2, "expected a gold index 0-3"))?;
                Ok(ChoiceItem {
                    context: item[0].trim().to_string(),
                    choices: item[2..].iter().map(|e| e.trim().to_string()).collect(),
                    gold,
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(TaskItems::Choice)
    }
}

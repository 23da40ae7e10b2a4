//! MuTual (Cui et al. 2020): choose the right next utterance of a dialogue; the 886 dev items.
//!
//! Prompt (lm-evaluation-harness `mutual.yaml`): the detokenised dialogue as context, each detokenised option as the
//! continuation; the metric is r@1 (accuracy). Data: `mutual/dev/dev_*.txt`, one JSON object per file
//! (`{answers: "A"-"D", options, article, id}`), read in the order of their numbers.

use std::path::Path;

use serde::Deserialize;

use super::{ChoiceItem, Metric, Task, TaskEntry, bad_record};
use crate::error::{Error, Result};

/// The task table row.
pub const MUTUAL: TaskEntry = TaskEntry {
    name: "mutual",
    metric: Metric::RecallAt1,
    prompt: "lm-eval: \"{dialogue}\" + \" {option}\" (detokenised as lm-eval)",
    build: || Box::new(Mutual),
};

struct Mutual;

#[derive(Deserialize)]
struct Record {
    answers: String,
    options: Vec<String>,
    article: String,
}

/// lm-eval's detokenisation of MuTual's tokenised text.
pub fn detokenize(text: &str) -> String {
    let mut text = text.to_string();
    for (from, to) in [
        (" '", "'"),
        (" \n", "\n"),
        ("\n ", "\n"),
        (" n't", "n't"),
        ("`` ", "\""),
        ("''", "\""),
        (" :", ":"),
        (" ;", ";"),
        (" !", "!"),
        (" ?", "?"),
        (" ,", ","),
        (" .", "."),
    ] {
        text = text.replace(from, to);
    }
    text
}

impl Task for Mutual {
    fn items(&self, data_dir: Option<&Path>) -> Result<Vec<ChoiceItem>> {
        let dir = crate::data::data_dir(data_dir)?.join("mutual/dev");
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut files: Vec<(usize, std::path::PathBuf)> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let number = p.file_stem()?.to_str()?.strip_prefix("dev_")?.parse().ok()?;
                Some((number, p))
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|(_, path)| {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let record: Record = serde_json::from_str(&text).map_err(|e| bad_record(&path, 1, e.to_string()))?;
                let gold = ["A", "B", "C", "D"]
                    .iter()
                    .position(|l| *l == record.answers.trim())
                    .filter(|g| *g < record.options.len())
                    .ok_or_else(|| bad_record(&path, 1, format!("answer `{}` is not A-D", record.answers)))?;
                Ok(ChoiceItem {
                    context: detokenize(&record.article),
                    choices: record.options.iter().map(|o| detokenize(o)).collect(),
                    gold,
                })
            })
            .collect()
    }
}

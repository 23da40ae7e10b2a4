//! MuTual (Cui et al. 2020): choose the right next utterance of a dialogue; the 886 dev items.
//!
//! Two prompt styles. `mutual` (lm-evaluation-harness `mutual.yaml`): the detokenised dialogue as context, each
//! detokenised option as the continuation; the metric is r@1 (accuracy). `mutual-gu` (Gu et al. 2024,
//! `test-dialogue.py`, their typo "Chioces" kept): `"Q: {dialogue} Which choice is correct? Answer Chioces: (A){a}(B){b}
//! (C){c}(D){d} A: Among A through D, the answer is"` on the raw text, one greedy token whose word must be the letter
//! (Gu test letter containment, which counts e.g. " Among" as A). Data: `mutual/dev/dev_*.txt`, one JSON object per file
//! (`{answers: "A"-"D", options, article, id}`), read in the order of their numbers.

use std::path::Path;

use serde::Deserialize;

use super::{ChoiceItem, GenerationItem, Metric, PromptStyle, Task, TaskEntry, TaskItems, bad_record};
use crate::error::{Error, Result};

/// The task table row.
pub const MUTUAL: TaskEntry = TaskEntry {
    name: "mutual",
    metric: Metric::RecallAt1,
    prompt: "lm-eval: \"{dialogue}\" + \" {option}\" (detokenised as lm-eval)",
    build: || Box::new(Mutual { style: PromptStyle::LmEval }),
};

/// The Gu et al. row.
pub const MUTUAL_GU: TaskEntry = TaskEntry {
    name: "mutual-gu",
    metric: Metric::LabelWord,
    prompt: "Gu et al.: \"Q: {dialogue} Which choice is correct? Answer Chioces: (A)…(D)… A: Among A through D, the \
             answer is\", 1 token",
    build: || Box::new(Mutual { style: PromptStyle::Gu }),
};

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

struct Mutual {
    style: PromptStyle,
}

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
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
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
        let records = files
            .into_iter()
            .map(|(_, path)| {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
                let record: Record = serde_json::from_str(&text).map_err(|e| bad_record(&path, 1, e.to_string()))?;
                let gold = LETTERS
                    .iter()
                    .position(|l| *l == record.answers.trim())
                    .filter(|g| *g < record.options.len())
                    .ok_or_else(|| bad_record(&path, 1, format!("answer `{}` is not A-D", record.answers)))?;
                if record.options.len() != 4 {
                    return Err(bad_record(&path, 1, format!("expected 4 options, found {}", record.options.len())));
                }
                Ok((record, gold))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(match self.style {
            PromptStyle::LmEval => TaskItems::Choice(
                records
                    .into_iter()
                    .map(|(record, gold)| ChoiceItem {
                        context: detokenize(&record.article),
                        choices: record.options.iter().map(|o| detokenize(o)).collect(),
                        gold,
                    })
                    .collect(),
            ),
            PromptStyle::Gu => TaskItems::Generation(
                records
                    .into_iter()
                    .map(|(record, gold)| {
                        let o = &record.options;
                        let prompt = format!(
                            "Q: {} Which choice is correct? Answer Chioces: (A){}(B){}(C){}(D){} A: Among A through D, \
                             the answer is",
                            record.article, o[0], o[1], o[2], o[3]
                        );
                        GenerationItem::label(prompt, 1, &LETTERS, gold)
                    })
                    .collect(),
            ),
        })
    }
}

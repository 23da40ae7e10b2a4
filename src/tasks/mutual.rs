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
use crate::error::Result;

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
        // dev_1.txt, dev_2.txt, … up to the first number that is missing (a Hub data root cannot be listed).
        let mut files = Vec::new();
        while let Ok(path) = crate::data::data_file(data_dir, &format!("mutual/dev/dev_{}.txt", files.len() + 1)) {
            if !path.is_file() {
                break;
            }
            files.push(path);
        }
        if files.is_empty() {
            let expected = crate::data::data_file(data_dir, "mutual/dev/dev_1.txt")?;
            return Err(crate::data::unreadable(&expected, "no MuTual dev files (dev_1.txt, dev_2.txt, …)"));
        }
        let records = files
            .into_iter()
            .map(|path| {
                let text = crate::data::read_text(&path)?;
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

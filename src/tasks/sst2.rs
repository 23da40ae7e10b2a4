//! SST-2 (GLUE): binary sentiment of movie-review snippets; the 872 validation sentences.
//!
//! Prompt (lm-evaluation-harness `glue/sst2`): `"{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:"`,
//! choices `negative`, `positive` (label 1 = positive). Data: `sst2/test.tsv` (`sentence<TAB>label`, with a header).

use std::path::Path;

use super::{ChoiceItem, Metric, Task, TaskEntry, bad_record, binary_label, read_data_file};
use crate::error::Result;

/// The task table row.
pub const SST2: TaskEntry = TaskEntry {
    name: "sst2",
    metric: Metric::Acc,
    prompt: "lm-eval: \"{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:\" + \" negative|positive\"",
    build: || Box::new(Sst2),
};

struct Sst2;

impl Task for Sst2 {
    fn items(&self, data_dir: Option<&Path>) -> Result<Vec<ChoiceItem>> {
        let (path, text) = read_data_file(data_dir, "sst2/test.tsv")?;
        text.lines()
            .enumerate()
            .skip(1)
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let (sentence, label) =
                    line.rsplit_once('\t').ok_or_else(|| bad_record(&path, i + 1, "expected `sentence<TAB>label`"))?;
                let gold = binary_label(&path, i + 1, label)?;
                Ok(ChoiceItem {
                    context: format!("{}\nQuestion: Is this sentence positive or negative?\nAnswer:", sentence.trim()),
                    choices: vec!["negative".into(), "positive".into()],
                    gold,
                })
            })
            .collect()
    }
}

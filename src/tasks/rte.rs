//! RTE (GLUE): textual entailment; the 277 validation pairs.
//!
//! Prompt (lm-evaluation-harness `glue/rte`): `"{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:"`, choices
//! `True`, `False` (label 0 = entailment → True, 1 = not_entailment → False). Data: `rte/dev.tsv`
//! (`sentence1<TAB>sentence2<TAB>label<TAB>idx`, with a header).

use std::path::Path;

use super::{ChoiceItem, Metric, Task, TaskEntry, bad_record, binary_label, read_data_file};
use crate::error::Result;

/// The task table row.
pub const RTE: TaskEntry = TaskEntry {
    name: "rte",
    metric: Metric::Acc,
    prompt: "lm-eval: \"{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:\" + \" True|False\"",
    build: || Box::new(Rte),
};

struct Rte;

impl Task for Rte {
    fn items(&self, data_dir: Option<&Path>) -> Result<Vec<ChoiceItem>> {
        let (path, text) = read_data_file(data_dir, "rte/dev.tsv")?;
        text.lines()
            .enumerate()
            .skip(1)
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let fields: Vec<&str> = line.split('\t').collect();
                let [premise, hypothesis, label, ..] = fields.as_slice() else {
                    return Err(bad_record(&path, i + 1, "expected `sentence1<TAB>sentence2<TAB>label<TAB>idx`"));
                };
                let gold = binary_label(&path, i + 1, label)?;
                Ok(ChoiceItem {
                    context: format!("{}\nQuestion: {} True or False?\nAnswer:", premise.trim(), hypothesis.trim()),
                    choices: vec!["True".into(), "False".into()],
                    gold,
                })
            })
            .collect()
    }
}

//! RTE (GLUE): textual entailment; the 277 validation pairs.
//!
//! Two prompt styles. `rte` (lm-evaluation-harness `glue/rte`): `"{sentence1}\nQuestion: {sentence2} True or
//! False?\nAnswer:"`, choices `True`, `False` by loglikelihood. `rte-gu` (Gu et al. 2024, `test-NLI.py`):
//! `"{sentence1} entails the {sentence2}. True or False? answer:"`, one greedy token whose word must be `true` or
//! `false` (Gu ran the GLUE train split; editguard the validation split). Label 0 = entailment → True, 1 =
//! not_entailment → False. Data: `rte/dev.tsv` (`sentence1<TAB>sentence2<TAB>label<TAB>idx`, with a header).

use std::path::Path;

use super::{
    ChoiceItem, GenerationItem, Metric, PromptStyle, Task, TaskEntry, TaskItems, bad_record, binary_label,
    read_data_file,
};
use crate::error::Result;

/// The lm-eval row.
pub const RTE: TaskEntry = TaskEntry {
    name: "rte",
    metric: Metric::Acc,
    prompt: "lm-eval: \"{sentence1}\\nQuestion: {sentence2} True or False?\\nAnswer:\" + \" True|False\"",
    build: || Box::new(Rte { style: PromptStyle::LmEval }),
};

/// The Gu et al. row.
pub const RTE_GU: TaskEntry = TaskEntry {
    name: "rte-gu",
    metric: Metric::LabelWord,
    prompt: "Gu et al.: \"{sentence1} entails the {sentence2}. True or False? answer:\", 1 token",
    build: || Box::new(Rte { style: PromptStyle::Gu }),
};

struct Rte {
    style: PromptStyle,
}

impl Task for Rte {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let (path, text) = read_data_file(data_dir, "rte/dev.tsv")?;
        let records = text
            .lines()
            .enumerate()
            .skip(1)
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let fields: Vec<&str> = line.split('\t').collect();
                let [premise, hypothesis, label, ..] = fields.as_slice() else {
                    return Err(bad_record(&path, i + 1, "expected `sentence1<TAB>sentence2<TAB>label<TAB>idx`"));
                };
                Ok((premise.trim().to_string(), hypothesis.trim().to_string(), binary_label(&path, i + 1, label)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(match self.style {
            PromptStyle::LmEval => TaskItems::Choice(
                records
                    .into_iter()
                    .map(|(premise, hypothesis, gold)| ChoiceItem {
                        context: format!("{premise}\nQuestion: {hypothesis} True or False?\nAnswer:"),
                        choices: vec!["True".into(), "False".into()],
                        gold,
                    })
                    .collect(),
            ),
            PromptStyle::Gu => TaskItems::Generation(
                records
                    .into_iter()
                    .map(|(premise, hypothesis, gold)| {
                        let prompt = format!("{premise} entails the {hypothesis}. True or False? answer:");
                        GenerationItem::label(prompt, 1, &["true", "false"], gold)
                    })
                    .collect(),
            ),
        })
    }
}

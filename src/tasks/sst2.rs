//! SST-2 (GLUE): binary sentiment of movie-review snippets; the 872 validation sentences.
//!
//! Two prompt styles. `sst2` (lm-evaluation-harness `glue/sst2`): `"{sentence}\nQuestion: Is this sentence positive or
//! negative?\nAnswer:"`, choices `negative`, `positive` by loglikelihood. `sst2-gu` (Gu et al. 2024,
//! `test-SentimentAnalysis.py`, string as in their code): `"For each snippet of text,label the sentiment of the text
//! as positive or negative.The answer should be exact 'positive' or 'negative'. text: {sentence} answer:"`, one greedy
//! token whose word must be the label. Data: `sst2/test.tsv` (`sentence<TAB>label`, with a header; 1 = positive).

use std::path::Path;

use super::{
    ChoiceItem, GenerationItem, Metric, PromptStyle, Task, TaskEntry, TaskItems, bad_record, binary_label,
    read_data_file,
};
use crate::error::Result;

/// The lm-eval row.
pub const SST2: TaskEntry = TaskEntry {
    name: "sst2",
    metric: Metric::Acc,
    prompt: "lm-eval: \"{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:\" + \" negative|positive\"",
    build: || Box::new(Sst2 { style: PromptStyle::LmEval }),
};

/// The Gu et al. row.
pub const SST2_GU: TaskEntry = TaskEntry {
    name: "sst2-gu",
    metric: Metric::LabelWord,
    prompt: "Gu et al.: \"For each snippet of text,label the sentiment … text: {sentence} answer:\", 1 token",
    build: || Box::new(Sst2 { style: PromptStyle::Gu }),
};

const LABELS: [&str; 2] = ["negative", "positive"];

struct Sst2 {
    style: PromptStyle,
}

impl Task for Sst2 {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let (path, text) = read_data_file(data_dir, "sst2/test.tsv")?;
        let records = text
            .lines()
            .enumerate()
            .skip(1)
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                let (sentence, label) =
                    line.rsplit_once('\t').ok_or_else(|| bad_record(&path, i + 1, "expected `sentence<TAB>label`"))?;
                Ok((sentence.trim().to_string(), binary_label(&path, i + 1, label)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(match self.style {
            PromptStyle::LmEval => TaskItems::Choice(
                records
                    .into_iter()
                    .map(|(sentence, gold)| ChoiceItem {
                        context: format!("{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:"),
                        choices: LABELS.map(String::from).to_vec(),
                        gold,
                    })
                    .collect(),
            ),
            PromptStyle::Gu => TaskItems::Generation(
                records
                    .into_iter()
                    .map(|(sentence, gold)| {
                        let prompt = format!(
                            "For each snippet of text,label the sentiment of the text as positive or negative.The \
                             answer should be exact 'positive' or 'negative'. text: {sentence} answer:"
                        );
                        GenerationItem::label(prompt, 1, &LABELS, gold)
                    })
                    .collect(),
            ),
        })
    }
}

//! MMLU (Hendrycks et al. 2021), four subjects: formal_logic, public_relations, college_physics, global_facts (438
//! test questions), zero-shot and five-shot.
//!
//! Prompt (lm-evaluation-harness `mmlu/default`): `"The following are multiple choice questions (with answers) about
//! {subject}.\n\n"`, then for 5-shot the first five dev questions of the subject each followed by `" {letter}\n\n"`,
//! then `"{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"`; choices `A`-`D`. Data: `mmlu/test/<subject>_test.csv`
//! and `mmlu/dev/<subject>_dev.csv` (`question,choice0..3,answer` with a header, answer 0-3).

use std::path::{Path, PathBuf};

use super::{ChoiceItem, Metric, Task, TaskEntry, TaskItems, bad_record};
use crate::error::Result;

/// The subjects editguard ships.
pub const SUBJECTS: [&str; 4] = ["formal_logic", "public_relations", "college_physics", "global_facts"];

/// The zero-shot row.
pub const MMLU_0_SHOT: TaskEntry = TaskEntry {
    name: "mmlu",
    metric: Metric::Acc,
    prompt: "lm-eval, zero-shot: subject header + \"{question}\\nA. …\\nD. …\\nAnswer:\" + \" A|B|C|D\"",
    build: || Box::new(Mmlu { shots: 0 }),
};

/// The five-shot row.
pub const MMLU_5_SHOT: TaskEntry = TaskEntry {
    name: "mmlu-5shot",
    metric: Metric::Acc,
    prompt: "lm-eval, 5-shot: subject header + the first five dev questions with answers + the question",
    build: || Box::new(Mmlu { shots: 5 }),
};

struct Mmlu {
    shots: usize,
}

struct Question {
    text: String,
    choices: [String; 4],
    answer: usize,
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

impl Question {
    fn prompt(&self) -> String {
        let mut text = format!("{}\n", self.text.trim());
        for (letter, choice) in LETTERS.iter().zip(&self.choices) {
            text.push_str(&format!("{letter}. {choice}\n"));
        }
        text.push_str("Answer:");
        text
    }
}

fn read_questions(path: &PathBuf) -> Result<Vec<Question>> {
    let mut reader =
        csv::ReaderBuilder::new().has_headers(true).from_path(path).map_err(|e| crate::data::unreadable(path, e))?;
    let mut questions = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| bad_record(path, i + 2, e.to_string()))?;
        if record.len() != 6 {
            return Err(bad_record(path, i + 2, format!("expected 6 fields, found {}", record.len())));
        }
        let answer: usize = record[5]
            .trim()
            .parse()
            .ok()
            .filter(|a| *a < 4)
            .ok_or_else(|| bad_record(path, i + 2, "expected an answer 0-3"))?;
        questions.push(Question {
            text: record[0].to_string(),
            choices: [1, 2, 3, 4].map(|c| record[c].to_string()),
            answer,
        });
    }
    Ok(questions)
}

impl Task for Mmlu {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let file = |relative: String| crate::data::data_file(data_dir, &format!("mmlu/{relative}"));
        let mut items = Vec::new();
        for subject in SUBJECTS {
            let mut header = format!(
                "The following are multiple choice questions (with answers) about {}.\n\n",
                subject.replace('_', " ")
            );
            if self.shots > 0 {
                let dev = read_questions(&file(format!("dev/{subject}_dev.csv"))?)?;
                for shot in dev.iter().take(self.shots) {
                    header.push_str(&format!("{} {}\n\n", shot.prompt(), LETTERS[shot.answer]));
                }
            }
            for question in read_questions(&file(format!("test/{subject}_test.csv"))?)? {
                items.push(ChoiceItem {
                    context: format!("{header}{}", question.prompt()),
                    choices: LETTERS.iter().map(|l| l.to_string()).collect(),
                    gold: question.answer,
                });
            }
        }
        Ok(TaskItems::Choice(items))
    }
}

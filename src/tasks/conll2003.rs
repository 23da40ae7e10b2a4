//! CoNLL-2003 (Tjong Kim Sang & De Meulder 2003): named entities in Reuters news; the 3,453 test sentences, each asked
//! once per entity type (person, location, organisation, miscellaneous): 13,812 items.
//!
//! Prompt (Gu et al. 2024, `test-NER.py`): `"Please identify {Person|Location|Organization|Miscellaneous} Entity from
//! the given text. Text: {sentence} Entity:"`, 10 greedy new tokens. The sentence is the tokens joined by spaces, with
//! `,` and `.` attached to the word before (as Gu). Gu score a substring recall of the gold entities; editguard
//! scores what the issue asks for, entity-level F1: the generation's first line split on `,`/`;` is the predicted
//! entity set, compared case-insensitively with the gold entities of that type, micro-averaged over all items.
//! lm-evaluation-harness has no CoNLL task. Data: `conll2003/test.txt` (`token POS chunk NER` per line, IOB tags,
//! sentences separated by blank lines, `-DOCSTART-` lines between documents).

use std::path::Path;

use super::{GenerationItem, Metric, Task, TaskEntry, TaskItems, bad_record, read_data_file};
use crate::error::Result;

/// The task table row.
pub const CONLL2003: TaskEntry = TaskEntry {
    name: "conll2003",
    metric: Metric::EntityF1,
    prompt: "Gu et al.: \"Please identify {Type} Entity from the given text. Text: {sentence} Entity:\", 10 tokens",
    build: || Box::new(Conll2003),
};

/// The entity types: tag and the word Gu's prompt uses.
const TYPES: [(&str, &str); 4] =
    [("PER", "Person"), ("LOC", "Location"), ("ORG", "Organization"), ("MISC", "Miscellaneous")];

struct Conll2003;

/// A sentence's text and its gold entities as `(type tag, text)`.
struct Sentence {
    text: String,
    entities: Vec<(String, String)>,
}

fn join_tokens(tokens: &[&str]) -> String {
    let mut text = String::new();
    for token in tokens {
        if !text.is_empty() && *token != "," && *token != "." {
            text.push(' ');
        }
        text.push_str(token);
    }
    text
}

/// Entities from IOB tags: a span starts at `B-X`, or at `I-X` after a token not of type X.
fn entities(tokens: &[&str], tags: &[&str]) -> Vec<(String, String)> {
    let mut found: Vec<(String, Vec<&str>)> = Vec::new();
    let mut open: Option<&str> = None;
    for (token, tag) in tokens.iter().zip(tags) {
        match tag.split_once('-') {
            Some((prefix, kind)) if prefix == "I" && open == Some(kind) => {
                if let Some(last) = found.last_mut() {
                    last.1.push(token);
                }
            }
            Some((_, kind)) => {
                found.push((kind.to_string(), vec![token]));
                open = Some(kind);
            }
            None => open = None,
        }
    }
    found.into_iter().map(|(kind, words)| (kind, join_tokens(&words))).collect()
}

fn sentences(path: &Path, text: &str) -> Result<Vec<Sentence>> {
    let mut result = Vec::new();
    let (mut tokens, mut tags): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
    let mut flush = |tokens: &mut Vec<&str>, tags: &mut Vec<&str>| {
        if !tokens.is_empty() {
            result.push(Sentence { text: join_tokens(tokens), entities: entities(tokens, tags) });
        }
        tokens.clear();
        tags.clear();
    };
    for (i, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [] => flush(&mut tokens, &mut tags),
            ["-DOCSTART-", ..] => flush(&mut tokens, &mut tags),
            [token, _, _, tag] => {
                tokens.push(token);
                tags.push(tag);
            }
            _ => return Err(bad_record(path, i + 1, "expected `token POS chunk NER`")),
        }
    }
    flush(&mut tokens, &mut tags);
    Ok(result)
}

impl Task for Conll2003 {
    fn items(&self, data_dir: Option<&Path>) -> Result<TaskItems> {
        let (path, text) = read_data_file(data_dir, "conll2003/test.txt")?;
        let mut items = Vec::new();
        for sentence in sentences(&path, &text)? {
            for (tag, word) in TYPES {
                let prompt =
                    format!("Please identify {word} Entity from the given text. Text: {} Entity:", sentence.text);
                let gold = sentence.entities.iter().filter(|(kind, _)| kind == tag).map(|(_, e)| e.clone()).collect();
                items.push(GenerationItem::new(prompt, 10, &[], gold));
            }
        }
        Ok(TaskItems::Generation(items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iob_spans_become_entities() {
        let tokens = ["United", "Arab", "Emirates", "beat", "Japan", "and", "China", "."];
        let tags = ["B-LOC", "I-LOC", "I-LOC", "O", "I-LOC", "O", "B-PER", "O"];
        let found = entities(&tokens, &tags);
        let expected = [("LOC", "United Arab Emirates"), ("LOC", "Japan"), ("PER", "China")];
        assert_eq!(found, expected.map(|(k, e)| (k.to_string(), e.to_string())).to_vec());
        assert_eq!(join_tokens(&tokens), "United Arab Emirates beat Japan and China.");
    }
}

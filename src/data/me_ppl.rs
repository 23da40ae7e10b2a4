//! ME-PPL, the perplexity corpus of the Butterfly-effect paper (Yang et al. 2024).
//!
//! Three sizes ship in `ME-PPL/`: `ME-PPL_50.json` (50 sentences), `ME-PPL_1k.json` and `ME-PPL.json` (10,000). Each
//! is a JSON list of `{"Corpus": source, "Text": sentence}`; texts start with a space and are scored exactly as
//! stored. Any file of the same shape (or a plain list of strings) can be scored too.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// A named corpus, or a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Corpus {
    /// `ME-PPL_50.json`.
    MePpl50,
    /// `ME-PPL_1k.json`.
    MePpl1k,
    /// `ME-PPL.json` (10,000 sentences).
    MePpl10k,
    /// A JSON file of the same shape, or `hf://owner/repo/file` on the Hub.
    File(String),
}

impl Corpus {
    /// Parses `me-ppl-50`, `me-ppl-1k`, `me-ppl-10k` or a path / `hf://` address.
    pub fn parse(name: &str) -> Corpus {
        match name.to_ascii_lowercase().as_str() {
            "me-ppl-50" | "me-ppl_50" => Corpus::MePpl50,
            "me-ppl-1k" | "me-ppl_1k" => Corpus::MePpl1k,
            "me-ppl-10k" | "me-ppl" | "me-ppl_10k" => Corpus::MePpl10k,
            _ => Corpus::File(name.to_string()),
        }
    }

    /// A short name for reports and cache keys.
    pub fn name(&self) -> String {
        match self {
            Corpus::MePpl50 => "ME-PPL_50".into(),
            Corpus::MePpl1k => "ME-PPL_1k".into(),
            Corpus::MePpl10k => "ME-PPL".into(),
            Corpus::File(path) => path.clone(),
        }
    }

    /// Where the corpus file is.
    pub fn locate(&self, data_dir: Option<&Path>) -> Result<PathBuf> {
        let file = match self {
            Corpus::MePpl50 => "ME-PPL_50.json",
            Corpus::MePpl1k => "ME-PPL_1k.json",
            Corpus::MePpl10k => "ME-PPL.json",
            Corpus::File(path) if path.starts_with("hf://") => {
                return super::hub_dataset_file(path);
            }
            Corpus::File(path) => return Ok(PathBuf::from(path)),
        };
        super::data_file(data_dir, &format!("ME-PPL/{file}"))
    }

    /// Reads the sentences.
    pub fn load(&self, data_dir: Option<&Path>) -> Result<Vec<String>> {
        read_sentences(&self.locate(data_dir)?)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Record {
    Full {
        #[serde(rename = "Text")]
        text: String,
    },
    Plain(String),
}

/// Reads a JSON list of `{"Text": ...}` records (or of strings).
pub fn read_sentences(path: &Path) -> Result<Vec<String>> {
    let text = super::read_text(path)?;
    let records: Vec<Record> = serde_json::from_str(&text).map_err(|e| {
        Error::invalid(
            path.display().to_string(),
            "[*].Text",
            format!("expected a JSON list of {{\"Text\": string}}: {e}"),
        )
    })?;
    Ok(records
        .into_iter()
        .map(|r| match r {
            Record::Full { text } | Record::Plain(text) => text,
        })
        .collect())
}

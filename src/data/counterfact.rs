//! COUNTERFACT (Meng et al. 2022) and zsRE (Levy et al. 2017, MEND/ROME split) as edit requests.
//!
//! `counterfact/counterfact-edit.json` holds the EasyEdit form of COUNTERFACT: one record per case with
//! `prompt` (full text), `subject`, `target_new`, `ground_truth`, `rephrase_prompt`, `locality_prompt` and
//! `locality_ground_truth` (`counterfact-train.json`, the other half of COUNTERFACT, has the same form).
//! `zsre/zsre_mend_train-1k.json` holds `{subject, src, rephrase, alt, answers, loc,
//! loc_ans}`. Both become [`EditRequest`]s; records whose prompt does not contain the subject are skipped and
//! counted. Subsets are chosen by id or by a seeded sample, so the same seed always picks the same cases.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::index::sample;
use serde::Deserialize;

use crate::data::request::{EditRequest, LocalityProbe, template_of};
use crate::error::{Error, Result};

/// The edit datasets editguard knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditDataset {
    /// COUNTERFACT (EasyEdit form), the 10,000-record edit split.
    CounterFact,
    /// COUNTERFACT's other 10,000 records (EasyEdit's train split; several of the Butterfly paper's HardCF cases).
    CounterFactTrain,
    /// zsRE (MEND train split, first 1,000 records).
    Zsre,
}

impl EditDataset {
    /// Parses `counterfact`, `counterfact-train` or `zsre`.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "counterfact" | "cf" => Ok(EditDataset::CounterFact),
            "counterfact-train" => Ok(EditDataset::CounterFactTrain),
            "zsre" => Ok(EditDataset::Zsre),
            other => Err(Error::Dataset {
                name: other.to_string(),
                message: "unknown edit dataset; expected `counterfact`, `counterfact-train` or `zsre`".into(),
            }),
        }
    }

    fn relative_path(self) -> &'static str {
        match self {
            EditDataset::CounterFact => "counterfact/counterfact-edit.json",
            EditDataset::CounterFactTrain => "counterfact/counterfact-train.json",
            EditDataset::Zsre => "zsre/zsre_mend_train-1k.json",
        }
    }

    /// The dataset file under the data directory.
    pub fn locate(self, data_dir: Option<&Path>) -> Result<PathBuf> {
        super::data_file(data_dir, self.relative_path())
    }

    /// All usable records as requests, in file order.
    pub fn load(self, data_dir: Option<&Path>) -> Result<Vec<EditRequest>> {
        let path = self.locate(data_dir)?;
        let text = super::read_text(&path)?;
        let origin = path.display().to_string();
        match self {
            EditDataset::CounterFact | EditDataset::CounterFactTrain => {
                let records: Vec<CounterFactRecord> = parse(&text, &origin)?;
                Ok(records.into_iter().filter_map(CounterFactRecord::into_request).collect())
            }
            EditDataset::Zsre => {
                let records: Vec<ZsreRecord> = parse(&text, &origin)?;
                Ok(records.into_iter().enumerate().filter_map(|(i, r)| r.into_request(i)).collect())
            }
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        Error::invalid(format!("{origin}:{}", e.inner().line()), e.path().to_string(), e.inner().to_string())
    })
}

#[derive(Deserialize)]
struct CounterFactRecord {
    case_id: u64,
    prompt: String,
    subject: String,
    target_new: String,
    ground_truth: String,
    #[serde(default)]
    rephrase_prompt: Option<String>,
    #[serde(default)]
    locality_prompt: Option<String>,
    #[serde(default)]
    locality_ground_truth: Option<String>,
}

impl CounterFactRecord {
    fn into_request(self) -> Option<EditRequest> {
        let prompt = template_of(&self.prompt, &self.subject)?;
        let locality = match (self.locality_prompt, self.locality_ground_truth) {
            (Some(prompt), Some(answer)) => vec![LocalityProbe { prompt, answer }],
            _ => Vec::new(),
        };
        Some(EditRequest {
            id: self.case_id.to_string(),
            prompt,
            subject: self.subject,
            target_new: self.target_new.trim().to_string(),
            ground_truth: Some(self.ground_truth.trim().to_string()),
            rephrase_prompts: self.rephrase_prompt.into_iter().collect(),
            locality,
        })
    }
}

#[derive(Deserialize)]
struct ZsreRecord {
    subject: String,
    src: String,
    #[serde(default)]
    rephrase: Option<String>,
    alt: String,
    #[serde(default)]
    answers: Vec<String>,
    #[serde(default)]
    loc: Option<String>,
    #[serde(default)]
    loc_ans: Option<String>,
}

impl ZsreRecord {
    fn into_request(self, index: usize) -> Option<EditRequest> {
        let prompt = template_of(&self.src, &self.subject)?;
        let locality = match (self.loc, self.loc_ans) {
            (Some(prompt), Some(answer)) => vec![LocalityProbe { prompt, answer }],
            _ => Vec::new(),
        };
        Some(EditRequest {
            id: format!("zsre-{index}"),
            prompt,
            subject: self.subject,
            target_new: self.alt.trim().to_string(),
            ground_truth: self.answers.first().map(|a| a.trim().to_string()),
            rephrase_prompts: self.rephrase.into_iter().collect(),
            locality,
        })
    }
}

/// The requests with the given ids, in the order asked; an unknown id is an error naming it.
pub fn select_ids(requests: &[EditRequest], ids: &[String], dataset: &str) -> Result<Vec<EditRequest>> {
    ids.iter()
        .map(|id| {
            requests.iter().find(|r| &r.id == id).cloned().ok_or_else(|| Error::Dataset {
                name: dataset.to_string(),
                message: format!("no usable record with id `{id}`"),
            })
        })
        .collect()
}

/// `n` requests chosen uniformly without replacement with a seeded generator, in dataset order.
pub fn seeded_sample(requests: &[EditRequest], n: usize, seed: u64) -> Vec<EditRequest> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut picked: Vec<usize> = sample(&mut rng, requests.len(), n.min(requests.len())).into_vec();
    picked.sort_unstable();
    picked.into_iter().map(|i| requests[i].clone()).collect()
}

/// All requests in a seeded random order (a Fisher–Yates shuffle). Unlike [`seeded_sample`], the first `n` of the
/// order are the same whatever `n` is later asked for, so a mine can be extended by asking for more records.
pub fn seeded_order(requests: &[EditRequest], seed: u64) -> Vec<EditRequest> {
    use rand::seq::SliceRandom;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut order = requests.to_vec();
    order.shuffle(&mut rng);
    order
}

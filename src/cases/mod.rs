//! Edit suites: the TOML files under `cases/`, one suite per file, named by the file's stem.
//!
//! A suite says what to edit (inline cases written by hand, or COUNTERFACT/zsRE records chosen by id or by a seeded
//! sample), how (the setting: `single`, `sequential`, `batch` or `batch-sequential`, with the number of edits, the
//! batch size and how often to check), with which methods on which models, in which tier (`default` runs under
//! plain `cargo test`, `heavy` only with `--ignored` or `EDITGUARD_TIER=heavy`), which thresholds to override and
//! which outcomes are expected (`hold`, `collapse` for a known-bad combination, `ineffective` for an edit known not to
//! take). Everything is validated when the suite is read, against the model registry and the method table, and a
//! bad file is reported with its path, line and the dotted field, e.g.
//! `cases/hardedit.toml:12: methods[1]: unknown method `rom`; expected one of rome, r-rome, …`.
//!
//! Listing a suite's tests needs nothing but this file: single-setting suites over a dataset therefore name their
//! records (`ids`); a seeded `sample` is for the multi-edit settings, which are one test per suite.

pub mod tiers;
pub mod write;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::data::counterfact::{EditDataset, seeded_sample, select_ids};
use crate::data::request::{EditRequest, LocalityProbe};
use crate::error::{Error, Result};
use crate::methods::{METHODS, method_entry, unknown_method};
use crate::registry::{Registry, line_of, parse_toml};
use crate::thresholds::ThresholdOverrides;
use tiers::TierRule;

/// How the edits of a suite are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Setting {
    /// Each case on its own, from the original weights: one test per case.
    #[default]
    Single,
    /// The suite's edits one after another, kept: one test per suite.
    Sequential,
    /// Batches of edits in one operation each, every batch from the original weights: one test per suite.
    Batch,
    /// Batches one after another, kept: one test per suite.
    BatchSequential,
}

impl Setting {
    /// The name used in test names and files.
    pub fn name(self) -> &'static str {
        match self {
            Setting::Single => "single",
            Setting::Sequential => "sequential",
            Setting::Batch => "batch",
            Setting::BatchSequential => "batch-sequential",
        }
    }

    /// True when edits accumulate.
    pub fn keeps_edits(self) -> bool {
        matches!(self, Setting::Sequential | Setting::BatchSequential)
    }

    /// True when the method must edit several requests in one operation.
    pub fn batches(self) -> bool {
        matches!(self, Setting::Batch | Setting::BatchSequential)
    }
}

/// Which tier a suite belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// Runs under plain `cargo test`.
    #[default]
    Default,
    /// Runs with `--ignored` / `--include-ignored` or `EDITGUARD_TIER=heavy`.
    Heavy,
}

/// The outcome a test expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The edit takes and the model keeps its perplexity and task scores.
    #[default]
    Hold,
    /// A known-bad combination: the test passes only if editguard detects the collapse.
    Collapse,
    /// A combination known not to take: the test passes only if the edit does not take and nothing collapses.
    Ineffective,
    /// General abilities fall without a collapse (Gu et al.'s finding): the test passes only if at least one asserted
    /// task score falls more than `task_tolerance` below its baseline and perplexity stays under the collapse bound.
    /// Whether the edit takes is left to the snapshot.
    Degrade,
}

impl Outcome {
    /// The name used in files and messages.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Hold => "hold",
            Outcome::Collapse => "collapse",
            Outcome::Ineffective => "ineffective",
            Outcome::Degrade => "degrade",
        }
    }
}

/// A case written inline in a suite file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InlineCase {
    /// The case's name in test names: lower-case letters, digits, `-`, `_` and `.`.
    pub name: Spanned<String>,
    /// The prompt: a full text containing the subject, or a template with `{}` for it.
    pub prompt: String,
    /// The subject.
    pub subject: String,
    /// The new target.
    pub target_new: String,
    /// The current answer.
    #[serde(default)]
    pub ground_truth: Option<String>,
    /// Paraphrases of the prompt.
    #[serde(default)]
    pub rephrase: Vec<String>,
    /// Prompts that must keep their answers.
    #[serde(default)]
    pub locality: Vec<LocalityProbe>,
    /// Where the case comes from (paper, table, dataset record).
    #[serde(default)]
    pub source: Option<String>,
    /// The tier of this case's tests, over the suite's (single-setting suites only): a heavy suite can run a few of
    /// its cases in the default tier.
    #[serde(default)]
    pub tier: Option<Spanned<Tier>>,
}

/// Records of an edit dataset.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSelection {
    /// `counterfact`, `counterfact-train` or `zsre`.
    pub name: String,
    /// Record ids, in order.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Or: a seeded sample of this many records.
    #[serde(default)]
    pub sample: Option<usize>,
    /// The sampling seed.
    #[serde(default)]
    pub seed: u64,
}

/// An expected outcome for some of a suite's tests.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// What is expected.
    pub outcome: Outcome,
    /// The methods it applies to.
    pub methods: Vec<Spanned<String>>,
    /// The models it applies to (all of the suite's when empty).
    #[serde(default)]
    pub models: Vec<Spanned<String>>,
    /// The cases it applies to (all when empty; single-setting suites only).
    #[serde(default)]
    pub cases: Vec<Spanned<String>>,
    /// Why: the measurement or the paper this rests on.
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    description: String,
    #[serde(default)]
    setting: Setting,
    methods: Vec<Spanned<String>>,
    #[serde(default)]
    models: Vec<Spanned<String>>,
    #[serde(default)]
    tier: Tier,
    #[serde(default)]
    tiers: Vec<TierRule>,
    #[serde(default = "default_corpus")]
    corpus: String,
    #[serde(default)]
    edits: Option<Spanned<usize>>,
    #[serde(default)]
    batch_size: Option<Spanned<usize>>,
    #[serde(default)]
    check_every: Option<Spanned<usize>>,
    #[serde(default)]
    stop_at_collapse: Option<Spanned<bool>>,
    #[serde(default)]
    thresholds: ThresholdOverrides,
    #[serde(default)]
    tasks: Vec<Spanned<String>>,
    #[serde(default)]
    task_items: Option<Spanned<usize>>,
    #[serde(default)]
    task_seed: u64,
    #[serde(default)]
    cases: Vec<InlineCase>,
    #[serde(default)]
    dataset: Option<Spanned<DatasetSelection>>,
    #[serde(default)]
    expect: Vec<Expectation>,
}

/// Items per task when a suite names tasks but no `task_items`.
pub const DEFAULT_TASK_ITEMS: usize = 100;

fn default_corpus() -> String {
    "me-ppl-50".to_string()
}

/// A validated suite.
#[derive(Debug, Clone)]
pub struct Suite {
    /// The file stem.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// What the suite is about.
    pub description: String,
    /// How edits are applied.
    pub setting: Setting,
    /// Method names (rows of the method table).
    pub methods: Vec<String>,
    /// Model ids (registry entries).
    pub models: Vec<String>,
    /// Tier.
    pub tier: Tier,
    /// `[[tiers]]`: selected tests in another tier (see [`tiers`]).
    pub tier_rules: Vec<TierRule>,
    /// The perplexity corpus (`me-ppl-50`, `me-ppl-1k`, …).
    pub corpus: String,
    /// Number of edits (multi-edit settings).
    pub edits: usize,
    /// Requests per operation.
    pub batch_size: usize,
    /// Check after every this many operations (edits or batches).
    pub check_every: usize,
    /// Stop a kept run at its first collapse (the default); `false` keeps editing and measuring to draw the whole
    /// perplexity curve (the collapse still decides the verdict).
    pub stop_at_collapse: bool,
    /// Threshold overrides.
    pub thresholds: ThresholdOverrides,
    /// Downstream tasks asserted (names of the task table).
    pub tasks: Vec<String>,
    /// Items per task: a seeded sample of this many (all when larger than the task).
    pub task_items: usize,
    /// The seed of the task samples.
    pub task_seed: u64,
    /// Inline cases.
    pub cases: Vec<InlineCase>,
    /// Dataset records.
    pub dataset: Option<DatasetSelection>,
    /// Expected outcomes.
    pub expectations: Vec<Expectation>,
}

/// Reads every `*.toml` under `dir`, sorted by name; a directory without suites is an error.
pub fn load_dir(dir: &Path, registry: &Registry) -> Result<Vec<Suite>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(Error::invalid(dir.display().to_string(), "(directory)", "no suite files (*.toml) here"));
    }
    paths.iter().map(|p| Suite::load(p, registry)).collect()
}

impl Suite {
    /// Reads and validates one suite file.
    pub fn load(path: &Path, registry: &Registry) -> Result<Suite> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Suite::parse(&text, path, registry)
    }

    /// Parses and validates suite text; `path` names it (its stem is the suite's name).
    pub fn parse(text: &str, path: &Path, registry: &Registry) -> Result<Suite> {
        let origin = path.display().to_string();
        let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let file: SuiteFile = parse_toml(text, &origin)?;
        let at = |span: std::ops::Range<usize>| format!("{origin}:{}", line_of(text, span.start));
        check_name(&name, &origin, "(file name)")?;
        file.thresholds.check(&origin, "thresholds")?;
        if file.methods.is_empty() {
            return Err(Error::invalid(&origin, "methods", "expected at least one method"));
        }
        let models: Vec<Spanned<String>> = if file.models.is_empty() {
            vec![Spanned::new(0..0, registry.default_model.clone())]
        } else {
            file.models.clone()
        };
        for (i, model) in models.iter().enumerate() {
            registry
                .get(model.get_ref())
                .map_err(|e| Error::invalid(at(model.span()), format!("models[{i}]"), e.to_string()))?;
        }
        for (i, method) in file.methods.iter().enumerate() {
            let entry = method_entry(method.get_ref()).map_err(|_| {
                Error::invalid(at(method.span()), format!("methods[{i}]"), unknown_method(method.get_ref()))
            })?;
            if file.setting.batches() && !entry.batch {
                let batchers: Vec<&str> = METHODS.iter().filter(|m| m.batch).map(|m| m.name).collect();
                return Err(Error::invalid(
                    at(method.span()),
                    format!("methods[{i}]"),
                    format!(
                        "`{}` edits one request at a time; a `{}` suite needs a batch method ({})",
                        entry.name,
                        file.setting.name(),
                        batchers.join(", ")
                    ),
                ));
            }
            for model in &models {
                if !registry.get(model.get_ref())?.methods.contains_key(entry.name) {
                    return Err(Error::invalid(
                        at(method.span()),
                        format!("methods[{i}]"),
                        format!(
                            "model `{}` has no hyper-parameters for `{}` in {}",
                            model.get_ref(),
                            entry.name,
                            registry.origin
                        ),
                    ));
                }
            }
        }
        for (i, task) in file.tasks.iter().enumerate() {
            if let Err(e) = crate::tasks::task_entry(task.get_ref()) {
                return Err(Error::invalid(at(task.span()), format!("tasks[{i}]"), e.to_string()));
            }
        }
        let task_items = match &file.task_items {
            Some(n) if *n.get_ref() == 0 => {
                return Err(Error::invalid(at(n.span()), "task_items", "expected at least 1 item per task"));
            }
            Some(n) if file.tasks.is_empty() => {
                return Err(Error::invalid(at(n.span()), "task_items", "the suite names no `tasks`"));
            }
            Some(n) => *n.get_ref(),
            None => DEFAULT_TASK_ITEMS,
        };
        let (cases, dataset) = check_sources(&file, text, &origin)?;
        let available = match &dataset {
            Some(d) => d.sample.unwrap_or(d.ids.len()),
            None => cases.len(),
        };
        let edits = match &file.edits {
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > available => {
                return Err(Error::invalid(
                    at(n.span()),
                    "edits",
                    format!("expected between 1 and {available} (the cases the suite names)"),
                ));
            }
            Some(n) if file.setting == Setting::Single => {
                return Err(Error::invalid(
                    at(n.span()),
                    "edits",
                    "single-setting suites run every case on its own; remove `edits`",
                ));
            }
            Some(n) => *n.get_ref(),
            None => available,
        };
        let batch_size = match (&file.batch_size, file.setting) {
            (Some(b), Setting::Single | Setting::Sequential) => {
                return Err(Error::invalid(
                    at(b.span()),
                    "batch_size",
                    "only batch and batch-sequential suites have batches",
                ));
            }
            (Some(b), _) if *b.get_ref() == 0 || *b.get_ref() > edits => {
                return Err(Error::invalid(
                    at(b.span()),
                    "batch_size",
                    format!("expected between 1 and {edits} (edits)"),
                ));
            }
            (Some(b), _) => *b.get_ref(),
            (None, Setting::BatchSequential) => {
                return Err(Error::invalid(&origin, "batch_size", "batch-sequential suites need a batch size"));
            }
            (None, Setting::Batch) => edits,
            (None, _) => 1,
        };
        let check_every = match &file.check_every {
            Some(k) if *k.get_ref() == 0 => {
                return Err(Error::invalid(at(k.span()), "check_every", "expected at least 1"));
            }
            Some(k) if !file.setting.keeps_edits() => {
                return Err(Error::invalid(
                    at(k.span()),
                    "check_every",
                    "only sequential settings check along the way",
                ));
            }
            Some(k) => *k.get_ref(),
            None => 1,
        };
        let stop_at_collapse = match &file.stop_at_collapse {
            Some(flag) if !file.setting.keeps_edits() => {
                return Err(Error::invalid(
                    at(flag.span()),
                    "stop_at_collapse",
                    "only sequential settings keep editing after a checkpoint",
                ));
            }
            Some(flag) => *flag.get_ref(),
            None => true,
        };
        let suite = Suite {
            name,
            path: path.to_path_buf(),
            description: file.description,
            setting: file.setting,
            methods: file.methods.iter().map(|m| m.get_ref().clone()).collect(),
            models: models.iter().map(|m| m.get_ref().clone()).collect(),
            tier: file.tier,
            tier_rules: file.tiers,
            corpus: file.corpus,
            edits,
            batch_size,
            check_every,
            stop_at_collapse,
            thresholds: file.thresholds,
            tasks: file.tasks.iter().map(|t| t.get_ref().clone()).collect(),
            task_items,
            task_seed: file.task_seed,
            cases,
            dataset,
            expectations: file.expect,
        };
        suite.check_expectations(text)?;
        let single = suite.setting == Setting::Single;
        let known = (suite.methods.as_slice(), suite.models.as_slice(), suite.case_names());
        tiers::check(
            &suite.tier_rules,
            (known.0, known.1, &known.2),
            single,
            (&suite.path.display().to_string(), text),
        )?;
        Ok(suite)
    }

    fn check_expectations(&self, text: &str) -> Result<()> {
        let origin = self.path.display().to_string();
        let at = |span: std::ops::Range<usize>| format!("{origin}:{}", line_of(text, span.start));
        let case_names = self.case_names();
        for (i, expectation) in self.expectations.iter().enumerate() {
            if expectation.methods.is_empty() {
                return Err(Error::invalid(&origin, format!("expect[{i}].methods"), "expected at least one method"));
            }
            if expectation.reason.trim().is_empty() {
                return Err(Error::invalid(&origin, format!("expect[{i}].reason"), "say why this outcome is expected"));
            }
            let lists = [
                ("methods", &expectation.methods, &self.methods),
                ("models", &expectation.models, &self.models),
                ("cases", &expectation.cases, &case_names),
            ];
            for (field, named, known) in lists {
                for (j, name) in named.iter().enumerate() {
                    if !known.contains(name.get_ref()) {
                        return Err(Error::invalid(
                            at(name.span()),
                            format!("expect[{i}].{field}[{j}]"),
                            format!("`{}` is not one of this suite's {field} ({})", name.get_ref(), known.join(", ")),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The names of the suite's cases: inline names, or dataset record ids (empty for a sampled selection).
    pub fn case_names(&self) -> Vec<String> {
        match &self.dataset {
            Some(d) => d.ids.clone(),
            None => self.cases.iter().map(|c| c.name.get_ref().clone()).collect(),
        }
    }

    /// The last component of each test name: one per case for single suites, `n<edits>` (and `-b<batch>` for
    /// batch settings) otherwise.
    pub fn trial_cases(&self) -> Vec<String> {
        match self.setting {
            Setting::Single => self.case_names(),
            Setting::Sequential => vec![format!("n{}", self.edits)],
            Setting::Batch | Setting::BatchSequential => vec![format!("n{}-b{}", self.edits, self.batch_size)],
        }
    }

    /// The tier of a test of this suite: the last `[[tiers]]` entry selecting it, else the case's own tier when it
    /// names one, else the suite's.
    pub fn tier_of(&self, method: &str, model: &str, case: &str) -> Tier {
        let fallback = self
            .cases
            .iter()
            .find(|c| c.name.get_ref() == case)
            .and_then(|c| c.tier.as_ref().map(|t| *t.get_ref()))
            .unwrap_or(self.tier);
        tiers::tier_of(&self.tier_rules, (method, model, case), self.setting == Setting::Single, fallback)
    }

    /// The expected outcome of (method, model, case) with its reason; `hold` when no expectation matches.
    pub fn expected(&self, method: &str, model: &str, case: &str) -> (Outcome, Option<&str>) {
        let matches =
            |names: &[Spanned<String>], value: &str| names.is_empty() || names.iter().any(|n| n.get_ref() == value);
        self.expectations
            .iter()
            .find(|e| {
                e.methods.iter().any(|m| m.get_ref() == method)
                    && matches(&e.models, model)
                    && (self.setting != Setting::Single || matches(&e.cases, case))
            })
            .map(|e| (e.outcome, Some(e.reason.as_str())))
            .unwrap_or((Outcome::Hold, None))
    }

    /// The requests of one test: the named case for single suites, the suite's first `edits` requests otherwise.
    pub fn requests(&self, data_dir: Option<&Path>, case: Option<&str>) -> Result<Vec<EditRequest>> {
        let origin = self.path.display().to_string();
        let all = match &self.dataset {
            Some(selection) => {
                let dataset = EditDataset::parse(&selection.name)?;
                let records = dataset.load(data_dir)?;
                match selection.sample {
                    Some(n) => seeded_sample(&records, n, selection.seed),
                    None => select_ids(&records, &selection.ids, &selection.name)?,
                }
            }
            None => self.cases.iter().map(|c| c.to_request(&origin)).collect::<Result<Vec<_>>>()?,
        };
        match case {
            Some(name) if self.setting == Setting::Single => {
                let found = all.into_iter().find(|r| r.id == name);
                found.map(|r| vec![r]).ok_or_else(|| {
                    Error::invalid(&origin, "cases", format!("no case `{name}` in suite `{}`", self.name))
                })
            }
            _ => Ok(all.into_iter().take(self.edits).collect()),
        }
    }
}

impl InlineCase {
    /// The case as an edit request (its id is the case name).
    pub fn to_request(&self, origin: &str) -> Result<EditRequest> {
        let name = self.name.get_ref().clone();
        let mut request = if self.prompt.contains("{}") {
            EditRequest {
                id: name,
                prompt: self.prompt.clone(),
                subject: self.subject.clone(),
                target_new: self.target_new.trim().to_string(),
                ground_truth: None,
                rephrase_prompts: Vec::new(),
                locality: Vec::new(),
            }
        } else {
            EditRequest::from_text(name, &self.prompt, &self.subject, &self.target_new)
                .map_err(|e| Error::invalid(origin, format!("cases.{}.subject", self.name.get_ref()), e.to_string()))?
        };
        request.ground_truth = self.ground_truth.as_ref().map(|g| g.trim().to_string());
        request.rephrase_prompts = self.rephrase.clone();
        request.locality = self.locality.clone();
        request.validate(&format!("{origin}: cases.{}", self.name.get_ref()))?;
        Ok(request)
    }
}

fn check_sources(file: &SuiteFile, text: &str, origin: &str) -> Result<(Vec<InlineCase>, Option<DatasetSelection>)> {
    let at = |span: std::ops::Range<usize>| format!("{origin}:{}", line_of(text, span.start));
    match (&file.dataset, file.cases.is_empty()) {
        (Some(_), false) => Err(Error::invalid(origin, "dataset", "give either [[cases]] or [dataset], not both")),
        (None, true) => Err(Error::invalid(origin, "cases", "expected [[cases]] tables or a [dataset] selection")),
        (None, false) => {
            let mut seen = std::collections::BTreeSet::new();
            for (i, case) in file.cases.iter().enumerate() {
                let name = case.name.get_ref();
                check_name(name, &at(case.name.span()), &format!("cases[{i}].name"))?;
                if !seen.insert(name.clone()) {
                    return Err(Error::invalid(
                        at(case.name.span()),
                        format!("cases[{i}].name"),
                        format!("duplicate case `{name}`"),
                    ));
                }
                case.to_request(&at(case.name.span()))?;
                if let (Some(tier), false) = (&case.tier, file.setting == Setting::Single) {
                    return Err(Error::invalid(
                        at(tier.span()),
                        format!("cases[{i}].tier"),
                        "only single-setting suites run a case on its own, in a tier of its own; \
                         a multi-edit suite has one tier",
                    ));
                }
            }
            Ok((file.cases.clone(), None))
        }
        (Some(selection), true) => {
            let span = selection.span();
            let selection = selection.get_ref().clone();
            EditDataset::parse(&selection.name)
                .map_err(|e| Error::invalid(at(span.clone()), "dataset.name", e.to_string()))?;
            match (selection.ids.is_empty(), selection.sample) {
                (false, Some(_)) => Err(Error::invalid(at(span), "dataset", "give either `ids` or `sample`, not both")),
                (true, None) => Err(Error::invalid(at(span), "dataset", "expected `ids = [...]` or `sample = N`")),
                (true, Some(0)) => Err(Error::invalid(at(span), "dataset.sample", "expected at least 1")),
                (true, Some(_)) if file.setting == Setting::Single => Err(Error::invalid(
                    at(span),
                    "dataset.sample",
                    "single-setting suites list their records with `ids` (one test per record, listed without reading \
                     the dataset); `sample` is for sequential and batch suites",
                )),
                _ => {
                    for (i, id) in selection.ids.iter().enumerate() {
                        check_name(id, &at(span.clone()), &format!("dataset.ids[{i}]"))?;
                    }
                    Ok((Vec::new(), Some(selection)))
                }
            }
        }
    }
}

fn check_name(name: &str, origin: &str, field: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            origin,
            field,
            format!("`{name}` is not a usable test-name part; use lower-case letters, digits, `-`, `_` and `.`"),
        ))
    }
}

#[cfg(test)]
mod tests;

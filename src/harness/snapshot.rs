//! Baselines as insta snapshots under `snapshots/`.
//!
//! Each test's metrics (the unedited model's for a baseline test, the edited model's for an edit test) are an insta
//! JSON snapshot with an explicit name (the test name with `::` as `__`), metrics rounded by a redaction, and the
//! model revision, weights fingerprint, device, dtype, seeds and hyper-parameters in the snapshot's `info`. A
//! snapshot matches when its structure and strings are equal and every number is within a relative tolerance of the
//! accepted one (an insta [`Comparator`]), not byte for byte. insta's own rules decide what is written: nothing under
//! `CI=true`, a `.snap.new` beside the accepted file otherwise, which `cargo insta review` accepts or rejects; an
//! accepted `.snap` is never overwritten silently.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use insta::internals::SnapshotContents;
use insta::{Comparator, Snapshot};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{Error, Result};

/// Decimals kept by the rounding redaction.
const ROUNDED_DECIMALS: usize = 4;

/// The `snapshots/` directory.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    /// Where `.snap` files live.
    pub dir: PathBuf,
}

/// Numbers within `relative` (plus the rounding step) of each other match; everything else must be equal.
#[derive(Debug, Clone, Copy)]
pub struct ApproxComparator {
    /// Relative tolerance.
    pub relative: f64,
}

impl Comparator for ApproxComparator {
    fn matches(&self, reference: &Snapshot, test: &Snapshot) -> bool {
        match (json_of(reference.contents()), json_of(test.contents())) {
            (Some(a), Some(b)) => approx_equal(&a, &b, self.relative),
            _ => false,
        }
    }

    fn dyn_clone(&self) -> Box<dyn Comparator> {
        Box::new(*self)
    }
}

fn json_of(contents: &SnapshotContents) -> Option<Value> {
    serde_json::from_str(&contents.as_text()?.to_string()).ok()
}

/// Structural equality with numbers compared up to `relative` (and the rounding step of the redaction).
pub fn approx_equal(a: &Value, b: &Value, relative: f64) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            let step = 10f64.powi(-(ROUNDED_DECIMALS as i32));
            (x - y).abs() <= relative * x.abs().max(y.abs()) + step
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| approx_equal(x, y, relative))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| approx_equal(v, w, relative)))
        }
        _ => a == b,
    }
}

impl SnapshotStore {
    /// The accepted snapshot file of `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.snap"))
    }

    /// The accepted value of snapshot `name`, if there is one.
    pub fn accepted<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>> {
        let path = self.path(name);
        if !path.is_file() {
            return Ok(None);
        }
        let bad = |message: String| Error::invalid(path.display().to_string(), "(snapshot)", message);
        let snapshot = Snapshot::from_file(&path).map_err(|e| bad(format!("not an insta snapshot: {e}")))?;
        let text = snapshot.contents().as_text().map(|t| t.to_string()).ok_or_else(|| bad("binary snapshot".into()))?;
        serde_json::from_str(&text).map(Some).map_err(|e| bad(format!("unexpected contents: {e}")))
    }

    /// Asserts `value` against snapshot `name` within `relative`; on failure returns a message saying what to do.
    /// `test` is the test's name, for the command that creates a missing snapshot.
    pub fn check<T: Serialize, I: Serialize>(
        &self,
        name: &str,
        test: &str,
        value: &T,
        info: &I,
        relative: f64,
    ) -> std::result::Result<(), String> {
        let existed = self.path(name).is_file();
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path(&self.dir);
        settings.set_prepend_module_to_snapshot(false);
        settings.set_omit_expression(true);
        settings.set_info(info);
        settings.set_comparator(Box::new(ApproxComparator { relative }));
        // A redaction applies to the first node its selector matches and does not descend, so each depth the
        // records use (top-level numbers, numbers in maps, numbers in lists of maps) gets its own selector.
        for selector in [".*", ".*.*", ".*[].*"] {
            settings.add_redaction(selector, insta::rounded_redaction(ROUNDED_DECIMALS));
        }
        let outcome =
            settings.bind(|| std::panic::catch_unwind(AssertUnwindSafe(|| insta::assert_json_snapshot!(name, value))));
        if outcome.is_ok() {
            return Ok(());
        }
        let ci = is_ci();
        let written = if ci {
            "nothing was written (CI)".to_string()
        } else {
            format!("the new values are in {}.new", display(&self.path(name)))
        };
        let create = format!("INSTA_UPDATE=always cargo test --release --test harness -- --exact '{test}'");
        Err(if existed {
            format!(
                "metrics moved beyond the accepted snapshot {} (relative tolerance {relative}); {written}. If the change \
                 is intended, accept it with `cargo insta review` (or rerun with `{create}`)",
                display(&self.path(name))
            )
        } else {
            format!(
                "no accepted snapshot {}; {written}. Create it with `{create}`, or accept the .snap.new with \
                 `cargo insta review`",
                display(&self.path(name))
            )
        })
    }
}

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn display(path: &Path) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    path.strip_prefix(&cwd).unwrap_or(path).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_match_within_tolerance_structure_exactly() {
        let a = json!({"ppl": 167.29, "outcome": "held", "checkpoints": [{"edits": 1, "ppl": 169.0}]});
        let b = json!({"ppl": 167.30, "outcome": "held", "checkpoints": [{"edits": 1, "ppl": 169.1}]});
        assert!(approx_equal(&a, &b, 1e-3));
        assert!(!approx_equal(&a, &b, 1e-6));
        let c =
            json!({"ppl": 167.29, "outcome": "collapsed at edit 1 of 1", "checkpoints": [{"edits": 1, "ppl": 169.0}]});
        assert!(!approx_equal(&a, &c, 1.0));
        let d = json!({"ppl": 167.29, "outcome": "held", "checkpoints": []});
        assert!(!approx_equal(&a, &d, 1.0));
        assert!(!approx_equal(&json!({"x": null}), &json!({"x": 1.0}), 1.0));
    }
}

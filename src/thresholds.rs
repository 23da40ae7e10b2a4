//! Verdict thresholds: when an edited model counts as collapsed, degraded or not edited, and how far a metric may
//! move from its accepted snapshot.
//!
//! Thresholds come in three layers, each overriding the one before field by field: the `[thresholds]` table at the
//! top of `models.toml` (defaults for every model), a model's `[models.<id>.thresholds]`, and a suite's
//! `[thresholds]` table in `cases/<suite>.toml`. After layering every field must have a value; the top-level table
//! is where the defaults and the reasons for them are written down.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::registry::Registry;

/// One layer of thresholds: any field may be left to the layer below.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdOverrides {
    /// Collapse when the mean per-sentence ME-PPL perplexity exceeds this value.
    pub collapse_ppl: Option<f64>,
    /// Collapse when the mean perplexity exceeds this multiple of the unedited model's.
    pub collapse_ratio: Option<f64>,
    /// An edit "does not take" when the share of requests preferring the new target falls below this.
    pub min_efficacy: Option<f64>,
    /// Degradation when a task score falls more than this (absolute) below the unedited score.
    pub task_tolerance: Option<f64>,
    /// Relative tolerance of unedited metrics against their accepted snapshot.
    pub baseline_tolerance: Option<f64>,
    /// Relative tolerance of post-edit metrics against their accepted snapshot.
    pub drift_tolerance: Option<f64>,
}

/// A complete set of thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// See [`ThresholdOverrides::collapse_ppl`].
    pub collapse_ppl: f64,
    /// See [`ThresholdOverrides::collapse_ratio`].
    pub collapse_ratio: f64,
    /// See [`ThresholdOverrides::min_efficacy`].
    pub min_efficacy: f64,
    /// See [`ThresholdOverrides::task_tolerance`].
    pub task_tolerance: f64,
    /// See [`ThresholdOverrides::baseline_tolerance`].
    pub baseline_tolerance: f64,
    /// See [`ThresholdOverrides::drift_tolerance`].
    pub drift_tolerance: f64,
}

impl Thresholds {
    /// The shipped defaults of models.toml, for unit tests that need a complete set.
    #[cfg(test)]
    pub(crate) fn shipped_defaults() -> Thresholds {
        Thresholds {
            collapse_ppl: 1000.0,
            collapse_ratio: 2.0,
            min_efficacy: 0.5,
            task_tolerance: 0.05,
            baseline_tolerance: 1e-4,
            drift_tolerance: 0.02,
        }
    }
}

impl ThresholdOverrides {
    /// Parses one layer from a TOML table; `origin` and `table` name it in errors.
    pub fn from_table(table: &toml::Table, origin: &str, table_path: &str) -> Result<Self> {
        let value = toml::Value::Table(table.clone());
        let layer: ThresholdOverrides = serde_path_to_error::deserialize(value)
            .map_err(|e| Error::invalid(origin, format!("{table_path}.{}", e.path()), e.inner().to_string()))?;
        layer.check(origin, table_path)?;
        Ok(layer)
    }

    /// `self` over `base`: fields set here win.
    pub fn over(&self, base: &ThresholdOverrides) -> ThresholdOverrides {
        ThresholdOverrides {
            collapse_ppl: self.collapse_ppl.or(base.collapse_ppl),
            collapse_ratio: self.collapse_ratio.or(base.collapse_ratio),
            min_efficacy: self.min_efficacy.or(base.min_efficacy),
            task_tolerance: self.task_tolerance.or(base.task_tolerance),
            baseline_tolerance: self.baseline_tolerance.or(base.baseline_tolerance),
            drift_tolerance: self.drift_tolerance.or(base.drift_tolerance),
        }
    }

    fn fields(&self) -> [(&'static str, Option<f64>); 6] {
        [
            ("collapse_ppl", self.collapse_ppl),
            ("collapse_ratio", self.collapse_ratio),
            ("min_efficacy", self.min_efficacy),
            ("task_tolerance", self.task_tolerance),
            ("baseline_tolerance", self.baseline_tolerance),
            ("drift_tolerance", self.drift_tolerance),
        ]
    }

    /// Every value set must be finite and positive (`min_efficacy` and the tolerances may be 0; efficacy ≤ 1).
    pub fn check(&self, origin: &str, table_path: &str) -> Result<()> {
        for (name, value) in self.fields() {
            let Some(value) = value else { continue };
            let zero_ok = !name.starts_with("collapse_");
            let ok = value.is_finite() && (value > 0.0 || (zero_ok && value == 0.0));
            if !ok {
                let expected = if zero_ok { "a finite number ≥ 0" } else { "a finite number > 0" };
                return Err(Error::invalid(
                    origin,
                    format!("{table_path}.{name}"),
                    format!("expected {expected}, found {value}"),
                ));
            }
            if name == "min_efficacy" && value > 1.0 {
                return Err(Error::invalid(
                    origin,
                    format!("{table_path}.{name}"),
                    format!("expected a share between 0 and 1, found {value}"),
                ));
            }
            if name == "collapse_ratio" && value <= 1.0 {
                return Err(Error::invalid(
                    origin,
                    format!("{table_path}.{name}"),
                    format!("expected a ratio above 1 (1 would flag the unedited model), found {value}"),
                ));
            }
        }
        Ok(())
    }

    /// The complete thresholds, or an error naming the first field no layer set.
    pub fn complete(&self, origin: &str) -> Result<Thresholds> {
        for (name, value) in self.fields() {
            if value.is_none() {
                return Err(Error::invalid(
                    origin,
                    format!("thresholds.{name}"),
                    "no default: set it in the top-level [thresholds] table of models.toml",
                ));
            }
        }
        Ok(Thresholds {
            collapse_ppl: self.collapse_ppl.unwrap_or_default(),
            collapse_ratio: self.collapse_ratio.unwrap_or_default(),
            min_efficacy: self.min_efficacy.unwrap_or_default(),
            task_tolerance: self.task_tolerance.unwrap_or_default(),
            baseline_tolerance: self.baseline_tolerance.unwrap_or_default(),
            drift_tolerance: self.drift_tolerance.unwrap_or_default(),
        })
    }
}

/// The thresholds for `model_id` under a suite's overrides: registry defaults, then the model's table, then the suite.
pub fn resolve(registry: &Registry, model_id: &str, suite: &ThresholdOverrides) -> Result<Thresholds> {
    let model = model_layer(registry, model_id)?;
    suite.over(&model).complete(&registry.origin)
}

/// Checks the registry's `[thresholds]` and every model's own table (names, types, ranges).
pub fn check_registry(registry: &Registry) -> Result<()> {
    for id in registry.models.keys() {
        model_layer(registry, id)?;
    }
    Ok(())
}

/// The registry's defaults with `model_id`'s own table over them.
pub fn model_layer(registry: &Registry, model_id: &str) -> Result<ThresholdOverrides> {
    let defaults = ThresholdOverrides::from_table(&registry.thresholds, &registry.origin, "thresholds")?;
    let entry = registry.get(model_id)?;
    let own =
        ThresholdOverrides::from_table(&entry.thresholds, &registry.origin, &format!("models.{model_id}.thresholds"))?;
    Ok(own.over(&defaults))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(text: &str) -> Result<ThresholdOverrides> {
        ThresholdOverrides::from_table(&text.parse::<toml::Table>().unwrap(), "models.toml", "thresholds")
    }

    #[test]
    fn layers_override_field_by_field() {
        let base = layer("collapse_ppl = 1000.0\ncollapse_ratio = 3.0\nmin_efficacy = 0.5\ntask_tolerance = 0.05\nbaseline_tolerance = 1e-4\ndrift_tolerance = 0.02").unwrap();
        let top = layer("collapse_ratio = 2.0").unwrap();
        let t = top.over(&base).complete("models.toml").unwrap();
        assert_eq!(t.collapse_ratio, 2.0);
        assert_eq!(t.collapse_ppl, 1000.0);
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = layer("collapse_ratio = 0.5").unwrap_err().to_string();
        assert!(e.contains("thresholds.collapse_ratio") && e.contains("above 1"), "{e}");
        let e = layer("colapse_ppl = 10.0").unwrap_err().to_string();
        assert!(e.contains("colapse_ppl"), "{e}");
        let e = layer("min_efficacy = 2.0").unwrap_err().to_string();
        assert!(e.contains("min_efficacy"), "{e}");
        let e = ThresholdOverrides::default().complete("models.toml").unwrap_err().to_string();
        assert!(e.contains("thresholds.collapse_ppl"), "{e}");
    }
}

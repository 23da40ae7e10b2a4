//! `[[tiers]]`: moving selected tests of a suite into another tier.
//!
//! A suite has one tier, and a case of a single-setting suite may name its own. `[[tiers]]` entries select tests the
//! way `[[expect]]` entries do — by methods, models and (single suites) cases, each list empty for "all" — and give
//! them a tier: e.g. a larger model's tests of a default-tier suite run in the heavy tier, except one case with the
//! fast methods. The last entry that matches a test decides; without a match the case's or the suite's tier holds.

use serde::Deserialize;
use toml::Spanned;

use super::Tier;
use crate::error::{Error, Result};
use crate::registry::line_of;

/// One `[[tiers]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierRule {
    /// The tier of the tests it selects.
    pub tier: Tier,
    /// The methods it applies to (all when empty).
    #[serde(default)]
    pub methods: Vec<Spanned<String>>,
    /// The models it applies to (all when empty).
    #[serde(default)]
    pub models: Vec<Spanned<String>>,
    /// The cases it applies to (all when empty; single-setting suites only).
    #[serde(default)]
    pub cases: Vec<Spanned<String>>,
}

impl TierRule {
    /// Whether the rule selects the test of `method` on `model` for `case` (cases count in single suites only).
    pub fn selects(&self, method: &str, model: &str, case: &str, single: bool) -> bool {
        let matches =
            |names: &[Spanned<String>], value: &str| names.is_empty() || names.iter().any(|n| n.get_ref() == value);
        matches(&self.methods, method) && matches(&self.models, model) && (!single || matches(&self.cases, case))
    }
}

/// The tier of one test: the last matching rule's, else `fallback` (the case's or the suite's tier).
pub fn tier_of(rules: &[TierRule], (method, model, case): (&str, &str, &str), single: bool, fallback: Tier) -> Tier {
    rules.iter().rev().find(|r| r.selects(method, model, case, single)).map(|r| r.tier).unwrap_or(fallback)
}

/// Refuses selectors naming a method, model or case the suite does not have, naming file, line and field.
pub fn check(
    rules: &[TierRule],
    (methods, models, cases): (&[String], &[String], &[String]),
    single: bool,
    (origin, text): (&str, &str),
) -> Result<()> {
    for (i, rule) in rules.iter().enumerate() {
        if !single && !rule.cases.is_empty() {
            return Err(Error::invalid(
                origin,
                format!("tiers[{i}].cases"),
                "only single-setting suites select cases; a multi-edit suite's test covers all of them",
            ));
        }
        for (field, named, known) in
            [("methods", &rule.methods, methods), ("models", &rule.models, models), ("cases", &rule.cases, cases)]
        {
            for (j, name) in named.iter().enumerate() {
                if !known.contains(name.get_ref()) {
                    return Err(Error::invalid(
                        format!("{origin}:{}", line_of(text, name.span().start)),
                        format!("tiers[{i}].{field}[{j}]"),
                        format!("`{}` is not one of this suite's {field} ({})", name.get_ref(), known.join(", ")),
                    ));
                }
            }
        }
    }
    Ok(())
}

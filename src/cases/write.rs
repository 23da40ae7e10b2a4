//! Writing suites: edit requests as `[[cases]]` tables, readable test-name parts, quoted TOML strings.
//!
//! `editguard mine` writes its collapses and `editguard shrink` its reproducers through these, so every generated
//! suite lays a case out the same way a person would write it (full prompt text, paraphrases and locality probes
//! carried over) and reads back as the same request.

use std::fmt::Write as _;

use crate::cases::Outcome;
use crate::methods::EditRequest;

/// `text` as a TOML string literal.
pub fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// A test-name part for a dataset record: `cf-<id>-<subject>-<target>` (`cft-` for COUNTERFACT's train split), in
/// lower-case ASCII letters and digits joined by `-`.
pub fn case_name(dataset: &str, id: &str, subject: &str, target: &str) -> String {
    let slug = |text: &str, limit: usize| {
        let mut out = String::new();
        for c in text.chars().flat_map(|c| c.to_lowercase()) {
            if c.is_ascii_alphanumeric() {
                out.push(c);
            } else if !out.ends_with('-') && !out.is_empty() {
                out.push('-');
            }
        }
        let mut out: String = out.chars().take(limit).collect();
        while out.ends_with('-') {
            out.pop();
        }
        out
    };
    let prefix = match dataset {
        "counterfact" => "cf".to_string(),
        "counterfact-train" => "cft".to_string(),
        other => slug(other, 8),
    };
    [prefix, slug(id, 16), slug(subject, 24), slug(target, 16)]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// One `[[expect]]` table: `outcome` for `method` (on `case`, when given), with the measured `reason`.
pub fn expect_block(outcome: Outcome, method: &str, case: Option<&str>, reason: &str) -> String {
    let mut text = String::from("\n[[expect]]\n");
    let _ = writeln!(text, "outcome = {}", quoted(outcome.name()));
    let _ = writeln!(text, "methods = [{}]", quoted(method));
    if let Some(case) = case {
        let _ = writeln!(text, "cases = [{}]", quoted(case));
    }
    let _ = writeln!(text, "reason = {}", quoted(reason));
    text
}

/// One `[[cases]]` table for `request` under `name`, with `source` (and, when given, a per-case `tier`).
pub fn inline_case(name: &str, request: &EditRequest, source: &str, tier: Option<&str>) -> String {
    let mut text = String::from("\n[[cases]]\n");
    let full = request.prompt_text();
    let _ = writeln!(text, "name = {}", quoted(name));
    // A prompt that itself contains `{}` must stay a template, or it would be read as one.
    let prompt = if full.contains("{}") { &request.prompt } else { &full };
    let _ = writeln!(text, "prompt = {}", quoted(prompt));
    let _ = writeln!(text, "subject = {}", quoted(&request.subject));
    let _ = writeln!(text, "target_new = {}", quoted(&request.target_new));
    if let Some(truth) = &request.ground_truth {
        let _ = writeln!(text, "ground_truth = {}", quoted(truth));
    }
    if !request.rephrase_prompts.is_empty() {
        let list: Vec<String> = request.rephrase_prompts.iter().map(|p| quoted(p)).collect();
        let _ = writeln!(text, "rephrase = [{}]", list.join(", "));
    }
    if !request.locality.is_empty() {
        let list: Vec<String> = request
            .locality
            .iter()
            .map(|p| format!("{{ prompt = {}, answer = {} }}", quoted(&p.prompt), quoted(&p.answer)))
            .collect();
        let _ = writeln!(text, "locality = [{}]", list.join(", "));
    }
    let _ = writeln!(text, "source = {}", quoted(source));
    if let Some(tier) = tier {
        let _ = writeln!(text, "tier = {}", quoted(tier));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names_are_readable_test_name_parts() {
        assert_eq!(case_name("counterfact", "12714", "Canada", "FIFA"), "cf-12714-canada-fifa");
        assert_eq!(
            case_name("counterfact-train", "7", "Danielle Darrieux", "English"),
            "cft-7-danielle-darrieux-english"
        );
        assert_eq!(case_name("counterfact", "3", "Ōsaka (city)", "Île-de-France!"), "cf-3-saka-city-le-de-france");
        assert_eq!(case_name("zsre", "zsre-3", "東京", "x"), "zsre-zsre-3-x");
    }

    #[test]
    fn an_inline_case_reads_back_as_the_same_request() {
        let mut request = EditRequest::from_text(
            "7",
            "The mother tongue of \"Danielle\" Darrieux is",
            "\"Danielle\" Darrieux",
            "English",
        )
        .unwrap();
        request.ground_truth = Some("French".into());
        request.rephrase_prompts = vec!["Where \"Danielle\" Darrieux is from, people speak".into()];
        request.locality =
            vec![crate::methods::LocalityProbe { prompt: "Paris is in".into(), answer: "France".into() }];
        let text = format!("description = \"x\"\nmethods = [\"rome\"]\n{}", inline_case("d", &request, "here", None));
        #[derive(serde::Deserialize)]
        struct File {
            cases: Vec<crate::cases::InlineCase>,
        }
        let file: File = toml::from_str(&text).unwrap();
        let mut back = file.cases[0].to_request("test").unwrap();
        back.id = request.id.clone();
        assert_eq!(back, request);
    }
}

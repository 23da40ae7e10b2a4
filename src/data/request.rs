//! Edit requests: what to change in a model, in the COUNTERFACT / zsRE shape.
//!
//! A request names a prompt template with `{}` standing for the subject ("The mother tongue of {} is"), the subject
//! ("Danielle Darrieux"), the new target ("English") and optionally the old one ("French"), plus the probes the edit
//! quality metrics use: rephrased prompts (generalisation) and locality prompts with their expected answers.
//! Targets are stored without a leading space; methods and metrics add the space when they score a continuation.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A prompt that should keep its answer after the edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalityProbe {
    /// The full prompt text.
    pub prompt: String,
    /// The answer the unedited model is expected to keep.
    pub answer: String,
}

/// One fact to rewrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EditRequest {
    /// A stable name (dataset case id or a suite's own name).
    pub id: String,
    /// Prompt template with exactly one `{}` for the subject.
    pub prompt: String,
    /// The subject.
    pub subject: String,
    /// The new target, without a leading space.
    pub target_new: String,
    /// The current (true) target, when known.
    #[serde(default)]
    pub ground_truth: Option<String>,
    /// Paraphrases of the full prompt (generalisation probes).
    #[serde(default)]
    pub rephrase_prompts: Vec<String>,
    /// Unrelated prompts that must keep their answers.
    #[serde(default)]
    pub locality: Vec<LocalityProbe>,
}

impl EditRequest {
    /// Builds a request from a full prompt text that contains the subject; the first occurrence becomes `{}`.
    pub fn from_text(id: impl Into<String>, text: &str, subject: &str, target_new: &str) -> Result<Self> {
        let id = id.into();
        let template = template_of(text, subject).ok_or_else(|| {
            Error::invalid(format!("request {id}"), "subject", format!("`{subject}` does not occur in `{text}`"))
        })?;
        Ok(EditRequest {
            id,
            prompt: template,
            subject: subject.to_string(),
            target_new: target_new.trim().to_string(),
            ground_truth: None,
            rephrase_prompts: Vec::new(),
            locality: Vec::new(),
        })
    }

    /// The prompt with the subject filled in.
    pub fn prompt_text(&self) -> String {
        self.prompt.replacen("{}", &self.subject, 1)
    }

    /// Checks the template holds exactly one `{}` and the targets are non-empty.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let field = |name: &str| format!("{}.{name}", self.id);
        if self.prompt.matches("{}").count() != 1 {
            return Err(Error::invalid(
                origin,
                field("prompt"),
                format!("expected exactly one `{{}}` in `{}`", self.prompt),
            ));
        }
        if self.subject.trim().is_empty() {
            return Err(Error::invalid(origin, field("subject"), "expected a non-empty subject"));
        }
        if self.target_new.trim().is_empty() {
            return Err(Error::invalid(origin, field("target_new"), "expected a non-empty target"));
        }
        Ok(())
    }
}

/// `text` with the first occurrence of `subject` replaced by `{}` (braces in the text are kept as they are).
pub fn template_of(text: &str, subject: &str) -> Option<String> {
    if subject.is_empty() {
        return None;
    }
    let at = text.find(subject)?;
    Some(format!("{}{{}}{}", &text[..at], &text[at + subject.len()..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_round_trips_through_prompt_text() {
        let r =
            EditRequest::from_text("0", "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " English")
                .unwrap();
        assert_eq!(r.prompt, "The mother tongue of {} is");
        assert_eq!(r.prompt_text(), "The mother tongue of Danielle Darrieux is");
        assert_eq!(r.target_new, "English");
        r.validate("test").unwrap();
    }

    #[test]
    fn missing_subject_is_an_error_naming_the_request() {
        let err = EditRequest::from_text("case-7", "Paris is in", "Berlin", "Germany").unwrap_err().to_string();
        assert!(err.contains("request case-7") && err.contains("Berlin"), "{err}");
    }
}

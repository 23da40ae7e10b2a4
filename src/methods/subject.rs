//! Prompts with a known subject position: the token ids of a filled-in template and the index of the subject's last
//! token ("subject_last", the fact-token strategy of ROME and MEMIT).
//!
//! The index is `len(tokens(prefix + subject)) − 1`, computed on the text before the `{}` with the subject appended,
//! as EasyEdit does; the full prompt must start with those tokens, which is checked — except for the subject's last
//! token, which may merge with the text after it (Gemma's tokenizer reads `F.C.,` as `F`, `.`, `C`, `.,`): then the
//! index points at the merged token, as the references' index does (they never check).

use crate::error::{Error, Result};
use crate::model::LoadedModel;

/// A tokenised prompt and the position of its subject's last token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPrompt {
    /// Token ids of the filled-in prompt (no special tokens).
    pub ids: Vec<u32>,
    /// Index of the subject's last token in `ids`.
    pub subject_last: usize,
}

impl SubjectPrompt {
    /// Tokenises `template` (one `{}`) with `subject` filled in.
    pub fn new(model: &LoadedModel, template: &str, subject: &str) -> Result<Self> {
        let (prefix, _) = template.split_once("{}").ok_or_else(|| {
            Error::invalid("(edit request)", "prompt", format!("template `{template}` has no `{{}}` for the subject"))
        })?;
        let text = template.replacen("{}", subject, 1);
        let ids = model.encode(&text)?;
        let head = model.encode(&format!("{prefix}{subject}"))?;
        let before_last = head.len().saturating_sub(1);
        if head.is_empty() || ids.len() < head.len() || ids[..before_last] != head[..before_last] {
            return Err(Error::invalid(
                "(edit request)",
                "subject",
                format!("the tokens of `{prefix}{subject}` are not a prefix of the tokens of `{text}`"),
            ));
        }
        Ok(SubjectPrompt { subject_last: head.len() - 1, ids })
    }
}

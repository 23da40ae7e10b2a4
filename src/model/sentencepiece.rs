//! Gemma's SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`), rebuilt from GGUF metadata as a BPE.
//!
//! A Gemma GGUF file stores the SentencePiece vocabulary (`tokenizer.ggml.tokens`, with scores and token types) but no
//! merges. Its vocabulary is already in merge order, so the merges are implied by it: every way of cutting a token
//! into two pieces that are tokens themselves is a merge, ranked by the position of the whole token. The scores are no
//! use for ranking, because every control and user-defined token (runs of spaces, tabs and newlines among them)
//! carries the placeholder score -1000, and ranking by score would merge `▁` + `▁b` where SentencePiece keeps a run of
//! spaces whole. `document` writes the Hugging Face `tokenizer.json` document transformers 5 builds from the same
//! metadata (`GemmaTokenizer` with merges derived from the vocabulary order):
//!
//! - normaliser: every space becomes `▁` (no space is put in front of the text);
//! - pre-tokeniser: a split on spaces that, after normalisation, leaves the text whole;
//! - model: BPE over the whole vocabulary with byte fallback (`<0x0A>`), the unknown token fused;
//! - added tokens: the control tokens and the BOS, EOS, unknown and padding tokens, all special and matched in the
//!   raw text; user-defined tokens stay ordinary vocabulary entries reached through the merges;
//! - decoder: `▁` back to a space, byte tokens back to bytes.
//!
//! The file writes a run of spaces as spaces; it is respelled as a run of `▁` before the merges are derived, so that
//! `▁▁` is reachable from `▁`. Other SentencePiece vocabularies (Llama 2, Mistral) need another document and are
//! refused rather than guessed.

use std::collections::{BTreeSet, HashSet};

use serde_json::{Map, Value as Json, json};

use super::gguf::GgufFile;
use super::tokenizer::{TOKEN_TYPE_CONTROL, strings};
use crate::error::{Error, Result};

/// The SentencePiece word-boundary mark that stands for a space.
const SPACE_MARK: char = '\u{2581}';

/// `general.architecture` values whose `llama` vocabulary is Gemma's.
const GEMMA_ARCHITECTURES: &[&str] = &["gemma", "gemma2", "gemma3"];

/// Metadata keys naming the special tokens transformers registers whatever their token type.
const NAMED_TOKEN_KEYS: &[&str] = &[
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
];

/// A Gemma vocabulary as the document needs it.
struct Vocabulary {
    /// Tokens by id, runs of spaces respelled as runs of `▁`.
    tokens: Vec<String>,
    /// llama.cpp token types by id (1 normal, 3 control, 4 user-defined, 6 byte).
    types: Vec<i32>,
    /// Ids the metadata names as BOS, EOS, unknown or padding token.
    named: Vec<usize>,
    /// The unknown token's id, if the metadata names one.
    unknown: Option<usize>,
}

/// The `tokenizer.json` document of the `llama` (SentencePiece) vocabulary of a Gemma GGUF file.
pub(super) fn document(file: &GgufFile) -> Result<Json> {
    let path = file.path().display().to_string();
    let raw = strings(file.array("tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens", &path)?;
    let architecture = file.string("general.architecture").unwrap_or_default();
    if !GEMMA_ARCHITECTURES.contains(&architecture.as_str()) && !raw.iter().any(|token| is_space_run(token)) {
        return Err(Error::model_file(
            &path,
            format!(
                "tokenizer.ggml.model `llama` with general.architecture `{architecture}`: only Gemma's SentencePiece \
                 vocabulary ({}) is rebuilt from GGUF; give the model's tokenizer.json instead",
                GEMMA_ARCHITECTURES.join(", ")
            ),
        ));
    }
    if file.metadata().contains_key("tokenizer.ggml.merges") {
        return Err(Error::model_file(
            &path,
            "metadata `tokenizer.ggml.merges`: a Gemma vocabulary with stored merges is not supported (the merges are \
             derived from the vocabulary order); give the model's tokenizer.json instead",
        ));
    }
    if let Some(value) = file.metadata().get("tokenizer.ggml.add_space_prefix") {
        let add = value
            .to_bool()
            .map_err(|e| Error::model_file(&path, format!("metadata `tokenizer.ggml.add_space_prefix`: {e}")))?;
        if add {
            return Err(Error::model_file(
                &path,
                "metadata `tokenizer.ggml.add_space_prefix` is true, but Gemma's tokenizer puts no space in front of \
                 the text; this combination is not supported",
            ));
        }
    }
    let types = token_types(file, raw.len(), &path)?;
    let mut named = Vec::new();
    for key in NAMED_TOKEN_KEYS {
        if let Some(id) = token_id(file, key, raw.len(), &path)? {
            named.push(id);
        }
    }
    let unknown = token_id(file, "tokenizer.ggml.unknown_token_id", raw.len(), &path)?;
    let vocabulary = Vocabulary { tokens: respelled(raw), types, named, unknown };
    gemma_document(&vocabulary, &path)
}

/// True for a token that is a run of whitespace holding a space, which the GGUF file writes with spaces where the
/// vocabulary has `▁` (transformers' rule: a space in it and nothing but whitespace).
fn is_space_run(token: &str) -> bool {
    token.contains(' ') && token.chars().all(char::is_whitespace)
}

/// The tokens as the vocabulary spells them: each run of spaces becomes as many `▁`.
fn respelled(tokens: Vec<String>) -> Vec<String> {
    tokens
        .into_iter()
        .map(|token| if is_space_run(&token) { SPACE_MARK.to_string().repeat(token.chars().count()) } else { token })
        .collect()
}

/// The token types (`tokenizer.ggml.token_type`); all normal when the file has none.
fn token_types(file: &GgufFile, count: usize, path: &str) -> Result<Vec<i32>> {
    const KEY: &str = "tokenizer.ggml.token_type";
    if !file.metadata().contains_key(KEY) {
        return Ok(vec![1; count]);
    }
    let values = file.array(KEY)?;
    if values.len() != count {
        return Err(Error::model_file(
            path,
            format!("metadata `{KEY}` has {} entries for {count} tokens", values.len()),
        ));
    }
    values
        .iter()
        .enumerate()
        .map(|(id, value)| {
            value.to_i32().map_err(|e| Error::model_file(path, format!("metadata `{KEY}`, token {id}: {e}")))
        })
        .collect()
}

/// A token id stated by metadata `key`, checked against the vocabulary size; None when the key is absent.
fn token_id(file: &GgufFile, key: &str, vocabulary: usize, path: &str) -> Result<Option<usize>> {
    if !file.metadata().contains_key(key) {
        return Ok(None);
    }
    let id = file.usize(key)?;
    if id >= vocabulary {
        return Err(Error::model_file(
            path,
            format!("metadata `{key}` = {id} is outside the vocabulary of {vocabulary} tokens"),
        ));
    }
    Ok(Some(id))
}

/// The merges a merge-ordered vocabulary implies, highest priority first.
///
/// Tokens are visited in id order; each cut of a token into two pieces that are both tokens is a merge, the cut with
/// the longest left piece first. This is the order transformers' `generate_merges` produces when the rank of a token
/// is minus its position (it sorts by rank, then by the lengths of the left and right piece, descending). One hash
/// lookup per cut keeps it linear in the total length of the vocabulary: ~515,000 merges for Gemma-3's 262,144 tokens.
fn merges_by_position(tokens: &[String]) -> Vec<(&str, &str)> {
    let known: HashSet<&str> = tokens.iter().map(String::as_str).collect();
    let mut merges = Vec::with_capacity(2 * tokens.len());
    for token in tokens {
        for (cut, _) in token.char_indices().rev() {
            if cut == 0 {
                continue;
            }
            let (left, right) = token.split_at(cut);
            if known.contains(left) && known.contains(right) {
                merges.push((left, right));
            }
        }
    }
    merges
}

/// The document for a respelled Gemma vocabulary (see the module documentation).
fn gemma_document(vocabulary: &Vocabulary, path: &str) -> Result<Json> {
    let tokens = &vocabulary.tokens;
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        if vocab.insert(token.clone(), json!(id)).is_some() {
            return Err(Error::model_file(
                path,
                format!("metadata `tokenizer.ggml.tokens`: token {id} ({token:?}) occurs twice in the vocabulary"),
            ));
        }
    }
    let merges: Vec<Json> = merges_by_position(tokens).into_iter().map(|(left, right)| json!([left, right])).collect();

    let special: BTreeSet<usize> = vocabulary
        .types
        .iter()
        .enumerate()
        .filter(|(_, kind)| **kind == TOKEN_TYPE_CONTROL)
        .map(|(id, _)| id)
        .chain(vocabulary.named.iter().copied())
        .collect();
    let added: Vec<Json> = special
        .into_iter()
        .map(|id| {
            json!({"id": id, "content": tokens[id], "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let unknown = vocabulary.unknown.map(|id| tokens[id].clone());

    let mut document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK.to_string()},
        "pre_tokenizer": {
            "type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false
        },
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE_MARK.to_string()}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": unknown, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": null, "merges": null,
        }
    });
    // Moved in rather than written inside `json!`, which would copy half a million merges.
    document["model"]["vocab"] = Json::Object(vocab);
    document["model"]["merges"] = Json::Array(merges);
    Ok(document)
}

#[cfg(test)]
mod tests {
    use tokenizers::Tokenizer;

    use super::*;

    fn owned(tokens: &[&str]) -> Vec<String> {
        tokens.iter().map(|token| token.to_string()).collect()
    }

    #[test]
    fn merges_follow_the_vocabulary_order_longest_left_piece_first() {
        let tokens = owned(&["<unk>", "a", "b", "c", "ab", "bc", "abc"]);
        assert_eq!(merges_by_position(&tokens), vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }

    #[test]
    fn runs_of_spaces_are_respelled() {
        let tokens = respelled(owned(&["  ", "\n\n", "a b", "\u{2581}x"]));
        assert_eq!(tokens, owned(&["\u{2581}\u{2581}", "\n\n", "a b", "\u{2581}x"]));
    }

    /// A miniature Gemma vocabulary: control tokens, a user-defined run of two spaces, one byte token.
    fn miniature() -> Tokenizer {
        let raw = owned(&["<pad>", "<eos>", "<bos>", "<unk>", "  ", "a", "b", "\u{2581}", "\u{2581}b", "ab", "<0x21>"]);
        let vocabulary = Vocabulary {
            tokens: respelled(raw),
            types: vec![3, 3, 3, 3, 4, 1, 1, 1, 1, 1, 6],
            named: vec![2, 1, 3, 0],
            unknown: Some(3),
        };
        let document = gemma_document(&vocabulary, "(test)").unwrap();
        serde_json::to_string(&document).unwrap().parse::<Tokenizer>().unwrap()
    }

    fn ids(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        tokenizer.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn miniature_vocabulary_tokenises_like_sentencepiece() {
        let tokenizer = miniature();
        // A run of spaces stays whole: `▁▁` (id 4) is merged before `▁b`.
        assert_eq!(ids(&tokenizer, "a  b"), vec![5, 4, 6]);
        assert_eq!(ids(&tokenizer, "ab b"), vec![9, 8]);
        // Byte fallback, and the unknown token for a byte the vocabulary lacks.
        assert_eq!(ids(&tokenizer, "!"), vec![10]);
        assert_eq!(ids(&tokenizer, "?"), vec![3]);
        // Control tokens in the text are special tokens.
        assert_eq!(ids(&tokenizer, "<bos>a"), vec![2, 5]);
        assert_eq!(tokenizer.decode(&[5, 4, 6, 10], false).unwrap(), "a  b!");
    }
}

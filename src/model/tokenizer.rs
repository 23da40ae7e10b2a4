//! Tokenizers: read from `tokenizer.json`, or rebuilt from a GGUF file's metadata.
//!
//! A GGUF file carries its byte-level BPE vocabulary (`tokenizer.ggml.tokens`), merges (`tokenizer.ggml.merges`),
//! token types and the name of its pre-tokenizer (`tokenizer.ggml.pre`). [`from_gguf`] writes the equivalent
//! Hugging Face `tokenizer.json` document and hands it to the tokenizers crate, so a GGUF file alone is enough to
//! tokenise exactly as the original checkpoint did. Unknown pre-tokenizer names are refused rather than guessed.
//! Gemma's SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`, no merges stored) is rebuilt as a byte-fallback
//! BPE by [`sentencepiece`](super::sentencepiece). [`gguf_bos`] says which BOS token, if any, the file asks to put
//! before every sequence.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{Value as Json, json};
use tokenizers::Tokenizer;

use super::gguf::GgufFile;
use super::sentencepiece;
use crate::error::{Error, Result};

/// Reads a `tokenizer.json`.
pub fn from_file(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| Error::model_file(path.display().to_string(), e.to_string()))
}

/// The Hugging Face pre-tokenizer matching a llama.cpp `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: &str, path: &str) -> Result<Json> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Ok(match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true)
        ]}),
        "gpt-2" | "gpt2" | "default" => byte_level(true),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]}),
        other => {
            return Err(Error::model_file(
                path,
                format!("tokenizer.ggml.pre `{other}` is not supported (known: smollm, gpt-2, default, llama-bpe)"),
            ));
        }
    })
}

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp `llama_token_type`).
pub(super) const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Rebuilds the tokenizer stored in a GGUF file's metadata: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) or
/// Gemma's SentencePiece vocabulary (`"llama"`).
pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let path = file.path().display().to_string();
    let model = file.string("tokenizer.ggml.model")?;
    let document = match model.as_str() {
        "gpt2" => byte_level_document(file, &path)?,
        "llama" => sentencepiece::document(file)?,
        other => {
            return Err(Error::model_file(
                &path,
                format!(
                    "tokenizer.ggml.model `{other}`: only byte-level BPE (`gpt2`) and Gemma's SentencePiece (`llama`) \
                     tokenizers are rebuilt from GGUF"
                ),
            ));
        }
    };
    let text = serde_json::to_string(&document).map_err(|e| Error::Tokenizer(e.to_string()))?;
    text.parse::<Tokenizer>().map_err(|e| Error::model_file(&path, format!("rebuilding the tokenizer: {e}")))
}

/// The `tokenizer.json` document of a byte-level BPE (`gpt2`) vocabulary.
fn byte_level_document(file: &GgufFile, path: &str) -> Result<Json> {
    let pre = file.string("tokenizer.ggml.pre").unwrap_or_else(|_| "default".to_string());
    let tokens = strings(file.array("tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens", path)?;
    let merges = strings(file.array("tokenizer.ggml.merges")?, "tokenizer.ggml.merges", path)?;
    let types: Vec<i32> = match file.array("tokenizer.ggml.token_type") {
        Ok(values) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        Err(_) => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, Json> =
        tokens.iter().enumerate().map(|(id, token)| (token.clone(), json!(id))).collect();
    check_merges(&merges, &vocab, path)?;
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(id, _)| matches!(types.get(*id), Some(&TOKEN_TYPE_CONTROL) | Some(&TOKEN_TYPE_USER_DEFINED)))
        .map(|(id, token)| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[id] == TOKEN_TYPE_CONTROL})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(&pre, path)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    }))
}

/// Checks that every merge `a b` joins two tokens of the vocabulary into a third. The tokenizers crate assumes it
/// and slices out of bounds when a merged token is longer than every token (found by the `gguf` fuzz target).
fn check_merges(merges: &[String], vocab: &serde_json::Map<String, Json>, path: &str) -> Result<()> {
    for (index, merge) in merges.iter().enumerate() {
        let bad =
            |why: &str| Error::model_file(path, format!("metadata `tokenizer.ggml.merges`[{index}] `{merge}`: {why}"));
        let (left, right) = merge.split_once(' ').ok_or_else(|| bad("expected two tokens separated by a space"))?;
        if right.contains(' ') {
            return Err(bad("expected two tokens separated by a space"));
        }
        for part in [left, right, &format!("{left}{right}")] {
            if !vocab.contains_key(part) {
                return Err(bad(&format!("`{part}` is not in the vocabulary")));
            }
        }
    }
    Ok(())
}

/// The strings of a metadata array, or an error naming the file and key.
pub(super) fn strings(values: &[Value], key: &str, path: &str) -> Result<Vec<String>> {
    values
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| Error::model_file(path, format!("metadata `{key}`: {e}"))))
        .collect()
}

/// The BOS token id to put before every sequence, when the GGUF file asks for one.
///
/// `tokenizer.ggml.add_bos_token` says whether to (when absent, llama.cpp's default: yes for SentencePiece (`llama`)
/// vocabularies, no for others) and `tokenizer.ggml.bos_token_id` which token. None when the file asks for no BOS.
pub fn gguf_bos(file: &GgufFile) -> Result<Option<u32>> {
    const ADD: &str = "tokenizer.ggml.add_bos_token";
    let path = file.path().display().to_string();
    let add = match file.metadata().get(ADD) {
        Some(value) => value.to_bool().map_err(|e| Error::model_file(&path, format!("metadata `{ADD}`: {e}")))?,
        None => file.string("tokenizer.ggml.model").is_ok_and(|model| model == "llama"),
    };
    if !add {
        return Ok(None);
    }
    // Asked for, the BOS id must be there: a missing key is the file's error, not "no BOS".
    file.value("tokenizer.ggml.bos_token_id")?;
    gguf_bos_token(file)
}

/// Token ids of `text` without special tokens (no BOS).
pub fn encode_plain(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer.encode(text, false)?.get_ids().to_vec())
}

/// The BOS token a GGUF file names (`tokenizer.ggml.bos_token_id`), whether or not it asks for it to be added.
pub fn gguf_bos_token(file: &GgufFile) -> Result<Option<u32>> {
    const ID: &str = "tokenizer.ggml.bos_token_id";
    if !file.metadata().contains_key(ID) {
        return Ok(None);
    }
    let path = file.path().display().to_string();
    let id = file.usize(ID)?;
    let vocabulary = file.array("tokenizer.ggml.tokens")?.len();
    if id >= vocabulary {
        return Err(Error::model_file(
            &path,
            format!("metadata `{ID}` = {id} is outside the vocabulary of {vocabulary} tokens"),
        ));
    }
    let id = u32::try_from(id).map_err(|_| Error::model_file(&path, format!("metadata `{ID}` = {id} is too large")))?;
    Ok(Some(id))
}

/// The BOS token of a `tokenizer.json` tokenizer: the single token its post-processor puts before an empty text,
/// if it does (Llama's `<s>`, Gemma's `<bos>`).
pub fn bos_of(tokenizer: &Tokenizer) -> Option<u32> {
    let ids = tokenizer.encode("", true).ok()?.get_ids().to_vec();
    match ids.as_slice() {
        [id] => Some(*id),
        _ => None,
    }
}

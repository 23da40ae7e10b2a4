//! Tokenizers: read from `tokenizer.json`, or rebuilt from a GGUF file's metadata.
//!
//! A GGUF file carries its byte-level BPE vocabulary (`tokenizer.ggml.tokens`), merges (`tokenizer.ggml.merges`),
//! token types and the name of its pre-tokenizer (`tokenizer.ggml.pre`). [`from_gguf`] writes the equivalent
//! Hugging Face `tokenizer.json` document and hands it to the tokenizers crate, so a GGUF file alone is enough to
//! tokenise exactly as the original checkpoint did. Unknown pre-tokenizer names are refused rather than guessed.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{Value as Json, json};
use tokenizers::Tokenizer;

use super::gguf::GgufFile;
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
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Rebuilds the tokenizer stored in a GGUF file's metadata.
pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer> {
    let path = file.path().display().to_string();
    let model = file.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::model_file(
            &path,
            format!("tokenizer.ggml.model `{model}`: only byte-level BPE (`gpt2`) tokenizers are rebuilt from GGUF"),
        ));
    }
    let pre = file.string("tokenizer.ggml.pre").unwrap_or_else(|_| "default".to_string());
    let tokens = strings(file.array("tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens", &path)?;
    let merges = strings(file.array("tokenizer.ggml.merges")?, "tokenizer.ggml.merges", &path)?;
    let types: Vec<i32> = match file.array("tokenizer.ggml.token_type") {
        Ok(values) => values.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        Err(_) => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, Json> =
        tokens.iter().enumerate().map(|(id, token)| (token.clone(), json!(id))).collect();
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(id, _)| matches!(types.get(*id), Some(&TOKEN_TYPE_CONTROL) | Some(&TOKEN_TYPE_USER_DEFINED)))
        .map(|(id, token)| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[id] == TOKEN_TYPE_CONTROL})
        })
        .collect();
    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(&pre, &path)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        }
    });
    let text = serde_json::to_string(&document).map_err(|e| Error::Tokenizer(e.to_string()))?;
    text.parse::<Tokenizer>().map_err(|e| Error::model_file(&path, format!("rebuilding the tokenizer: {e}")))
}

fn strings(values: &[Value], key: &str, path: &str) -> Result<Vec<String>> {
    values
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| Error::model_file(path, format!("metadata `{key}`: {e}"))))
        .collect()
}

/// Token ids of `text` without special tokens (no BOS), the convention of the perplexity metric.
pub fn encode_plain(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer.encode(text, false)?.get_ids().to_vec())
}

//! The trained-editor cache: one safetensors file per (model weights, hyper-parameters, training data, seed).
//!
//! The key is a JSON text naming the model id and weights fingerprint, MEND's hyper-parameters (seed included), the
//! edited weights, the sha256 of the training data file and the version of the kernels' arithmetic
//! ([`crate::model::kernels::NUMERICS`]: training is deterministic but not bit-stable across summation orders); the file lives at
//! `<cache>/mend/<model>-<sha256(key)[..16]>.safetensors` and records the key, the training report and a sha256 of
//! its tensor data in its metadata. A file is used only when it parses, its key is the key asked for, its data
//! hashes to the recorded digest and every tensor has the shape the editor expects; anything else is rebuilt (and
//! said so), never used. Training happens once under a file lock, so parallel test processes wait for one editor
//! instead of each training their own, and the file is written to a temporary name and renamed into place.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use sha2::Digest;

use super::MendParams;
use super::editor::Editor;
use super::train::{TrainProgress, TrainingReport, editor_shape, train};
use crate::cache::{CacheLock, cache_root, hex, sha256_hex};
use crate::error::{Error, Result};
use crate::methods::EditEnv;
use crate::model::{LoadedModel, WeightId};

/// Format tag of the key (bumped when the file layout changes).
const FORMAT: &str = "editguard-mend-editor/1";

#[derive(Serialize)]
struct Key<'a> {
    format: &'static str,
    numerics: &'static str,
    model: &'a str,
    fingerprint: &'a str,
    params: &'a MendParams,
    weights: Vec<String>,
    training_data_sha256: String,
}

/// The cache key of an editor and the file it lives in.
pub fn key_and_path(
    model: &LoadedModel,
    params: &MendParams,
    weights: &[WeightId],
    env: &EditEnv,
) -> Result<(String, PathBuf)> {
    let data = crate::data::counterfact::EditDataset::CounterFactTrain.locate(env.data_dir.as_deref())?;
    let key = Key {
        format: FORMAT,
        numerics: crate::model::kernels::NUMERICS,
        model: &model.id,
        fingerprint: &model.fingerprint,
        params,
        weights: weights.iter().map(|w| format!("{w:?}")).collect(),
        training_data_sha256: crate::cache::sha256_file(&data)?,
    };
    let text = serde_json::to_string(&key).map_err(|e| Error::invalid("(mend)", "key", e.to_string()))?;
    let digest = sha256_hex(text.as_bytes());
    let stem: String = model.id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    Ok((text, cache_root().join("mend").join(format!("{stem}-{}.safetensors", &digest[..16]))))
}

fn data_digest(tensors: &HashMap<String, Tensor>) -> Result<String> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut hasher = sha2::Sha256::new();
    for name in names {
        hasher.update(name.as_bytes());
        hasher.update(bytes_of(&tensors[name])?);
    }
    Ok(hex(&hasher.finalize()))
}

fn bytes_of(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::F64 => t.flatten_all()?.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

/// Writes an editor with its key and training report.
pub fn write(path: &std::path::Path, key: &str, editor: &Editor, report: &TrainingReport) -> Result<()> {
    let tensors = editor.named_tensors()?;
    let bad = |e: &dyn std::fmt::Display| Error::invalid(path.display().to_string(), "(editor)", e.to_string());
    let metadata: HashMap<String, String> = [
        ("key".to_string(), key.to_string()),
        ("report".to_string(), serde_json::to_string(report).map_err(|e| bad(&e))?),
        ("data_sha256".to_string(), data_digest(&tensors)?),
    ]
    .into();
    let mut owned = Vec::new();
    for (name, t) in &tensors {
        let dtype = if t.dtype() == DType::F64 { safetensors::Dtype::F64 } else { safetensors::Dtype::F32 };
        owned.push((name.clone(), dtype, t.dims().to_vec(), bytes_of(t)?));
    }
    let views = owned
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| bad(&e))
        })
        .collect::<Result<Vec<_>>>()?;
    let serialized = safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| bad(&e))?;
    crate::cache::write_atomic(path, &serialized)
}

/// Reads an editor for `key` into a fresh editor of `shape`; Err says why the file cannot be used.
pub fn read(
    path: &std::path::Path,
    key: &str,
    model: &LoadedModel,
    params: &MendParams,
    weights: &[WeightId],
    device: &Device,
) -> std::result::Result<(Editor, TrainingReport), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("unreadable: {e}"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| format!("not safetensors: {e}"))?;
    let metadata = header.metadata().as_ref().ok_or("no metadata")?;
    if metadata.get("key").map(String::as_str) != Some(key) {
        return Err("it was written for another key (model, hyper-parameters, data or seed)".into());
    }
    let report: TrainingReport = serde_json::from_str(metadata.get("report").ok_or("no training report")?)
        .map_err(|e| format!("unreadable training report: {e}"))?;
    let tensors =
        candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| format!("unreadable tensors: {e}"))?;
    let digest = data_digest(&tensors).map_err(|e| e.to_string())?;
    if metadata.get("data_sha256") != Some(&digest) {
        return Err(format!("its data hashes to {digest}, not the recorded {:?}", metadata.get("data_sha256")));
    }
    let shape = editor_shape(model, params, weights).map_err(|e| e.to_string())?;
    let editor = Editor::new(&shape, device).map_err(|e| e.to_string())?;
    editor.load_tensors(&tensors, &path.display().to_string()).map_err(|e| e.to_string())?;
    Ok((editor, report))
}

/// Where an editor came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provenance {
    /// Read from the cache.
    Cached,
    /// Trained now (and written to the cache).
    Trained,
}

/// The cached editor for `model`, or one trained now (under the cache lock) and cached. Training says so on
/// stderr, with one line per validation.
pub fn load_or_train(
    model: &mut LoadedModel,
    params: &MendParams,
    weights: &[WeightId],
    origin: &str,
    env: &EditEnv,
    progress: &mut dyn FnMut(&TrainProgress),
) -> Result<(Editor, TrainingReport, Provenance)> {
    let (key, path) = key_and_path(model, params, weights, env)?;
    let device = model.device.clone();
    let attempt = |model: &LoadedModel| read(&path, &key, model, params, weights, &device);
    if let Ok((editor, report)) = attempt(model) {
        return Ok((editor, report, Provenance::Cached));
    }
    let _lock = CacheLock::acquire(&path)?;
    match attempt(model) {
        Ok((editor, report)) => return Ok((editor, report, Provenance::Cached)),
        Err(reason) if path.exists() => eprintln!("mend: not using {}: {reason}; training anew", path.display()),
        Err(_) => {}
    }
    if !model.is_pristine() {
        return Err(Error::invalid(
            origin,
            "mend",
            format!(
                "no trained MEND editor for {} is cached and the model is already edited; the editor must be trained \
                 on the unedited model: run `editguard train mend --model {}` first",
                model.id, model.id
            ),
        ));
    }
    eprintln!(
        "mend: no trained editor for {} in the cache; training one ({} steps at most) into {}",
        model.id,
        params.max_iters,
        path.display()
    );
    let mut last_reported = 0;
    let (editor, report) = train(model, params, weights, env.data_dir.as_deref(), &mut |p| {
        if let Some(point) = p.last.as_ref().filter(|point| point.step > last_reported) {
            last_reported = point.step;
            eprintln!(
                "mend: step {}/{}: val edit loss {:.3}, loc {:.4}, accuracy {:.2}, efficacy {:.2}",
                point.step, p.total, point.val_edit, point.val_loc, point.val_accuracy, point.val_efficacy
            );
        }
        progress(p);
    })?;
    write(&path, &key, &editor, &report)?;
    eprintln!("mend: trained in {:.0} s ({} steps), cached", report.seconds, report.steps);
    Ok((editor, report, Provenance::Trained))
}

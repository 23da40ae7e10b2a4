//! Second-moment statistics `C = E[k kᵀ]` of MLP keys (inputs of the down-projection), per layer.
//!
//! ROME (with `mom2_adjustment`) and MEMIT whiten keys with the uncentred second moment of the keys the layer sees
//! on ordinary text. The reference collects it over Wikipedia; offline, editguard collects it over ME-PPL (10k)
//! minus the sentences of ME-PPL_1k, so the statistics never see the evaluation text. Products are accumulated in
//! f64. Results are cached on disk under a key of (model fingerprint, layer, corpus, N, dtype): written to a
//! temporary file and renamed into place under a file lock, because nextest runs many test processes at once. A
//! cache file that does not parse, or whose recorded key or token count disagrees, is rebuilt, never used.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::cache::{CacheLock, cache_root, ensure_dir, sha256_hex};
use crate::data::me_ppl::Corpus;
use crate::error::{Error, Result};
use crate::model::{Hook, HookPoint, LoadedModel, Packing, Path};

/// Which text the statistics are collected over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsCorpus {
    /// Sentences, in a fixed order.
    pub sentences: Vec<String>,
    /// A name for the cache key, e.g. `ME-PPL-minus-1k`.
    pub name: String,
}

impl StatsCorpus {
    /// The default: ME-PPL (10k) without the sentences of ME-PPL_1k, first `n` of them (all when `n` is 0).
    pub fn default_for(data_dir: Option<&std::path::Path>, n: usize) -> Result<Self> {
        let evaluation: std::collections::HashSet<String> = Corpus::MePpl1k.load(data_dir)?.into_iter().collect();
        let mut sentences: Vec<String> =
            Corpus::MePpl10k.load(data_dir)?.into_iter().filter(|s| !evaluation.contains(s)).collect();
        if n > 0 {
            sentences.truncate(n);
        }
        Ok(StatsCorpus { name: format!("ME-PPL-minus-1k-n{}", sentences.len()), sentences })
    }
}

/// `E[k kᵀ]` of one layer's MLP keys, `(intermediate, intermediate)` in f64, with the token count behind it.
#[derive(Debug, Clone)]
pub struct SecondMoment {
    /// Layer index.
    pub layer: usize,
    /// Tokens averaged over.
    pub tokens: u64,
    /// The matrix, f64.
    pub matrix: Tensor,
}

/// Accumulates `Σ k kᵀ` (f64) at the MLP keys of several layers.
struct MomentAccumulator {
    sums: std::sync::Mutex<HashMap<usize, Tensor>>,
}

impl Hook for MomentAccumulator {
    fn visit(&self, layer: usize, point: HookPoint, x: Tensor, _packing: &Packing) -> Result<Tensor> {
        if point == HookPoint::MlpKey {
            let mut sums = self.sums.lock().map_err(|_| Error::invalid("(stats)", "lock", "poisoned"))?;
            if let Some(sum) = sums.get_mut(&layer) {
                let keys = x.to_dtype(DType::F64)?;
                *sum = (&*sum + keys.t()?.matmul(&keys)?)?;
            }
        }
        Ok(x)
    }
}

/// Computes the second moments of `layers` over `corpus` (no cache).
pub fn compute(
    model: &LoadedModel,
    layers: &[usize],
    corpus: &StatsCorpus,
    token_budget: usize,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<SecondMoment>> {
    let width = model.dims().intermediate;
    let last =
        *layers.iter().max().ok_or_else(|| Error::invalid("(stats)", "layers", "expected at least one layer"))?;
    let sums = layers.iter().map(|&l| Ok((l, Tensor::zeros((width, width), DType::F64, &model.device)?)));
    let accumulator = MomentAccumulator { sums: std::sync::Mutex::new(sums.collect::<Result<_>>()?) };
    let max_tokens = model.dims().max_positions;
    let sequences: Vec<Vec<u32>> = corpus
        .sentences
        .iter()
        .map(|s| model.encode(s).map(|ids| ids.into_iter().take(max_tokens).collect::<Vec<_>>()))
        .filter(|r| r.as_ref().map(|ids| !ids.is_empty()).unwrap_or(true))
        .collect::<Result<_>>()?;
    let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
    let tokens: u64 = lengths.iter().map(|&l| l as u64).sum();
    if let Some(bar) = progress {
        bar.set_length(tokens);
    }
    for chunk in crate::model::packing::length_sorted_chunks(&lengths, token_budget) {
        let rows: Vec<&[u32]> = chunk.iter().map(|&i| sequences[i].as_slice()).collect();
        let batch = model.batch(&rows)?;
        let embedded = model.embed(&batch)?;
        model.run_layers(embedded, &batch, 0..last + 1, &accumulator, Path::Fast)?;
        if let Some(bar) = progress {
            bar.inc(rows.iter().map(|r| r.len() as u64).sum());
        }
    }
    let sums = accumulator.sums.into_inner().map_err(|_| Error::invalid("(stats)", "lock", "poisoned"))?;
    layers
        .iter()
        .map(|&layer| {
            let matrix = (&sums[&layer] / tokens.max(1) as f64)?;
            Ok(SecondMoment { layer, tokens, matrix })
        })
        .collect()
}

/// The cache key of one layer's statistics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsKey {
    /// Model id and weights fingerprint.
    pub model: String,
    /// Layer.
    pub layer: usize,
    /// Corpus name (includes N).
    pub corpus: String,
    /// Accumulation dtype.
    pub dtype: &'static str,
}

impl StatsKey {
    fn file_name(&self) -> String {
        let sanitise = |s: &str| {
            s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect::<String>()
        };
        format!("{}.layer{}.{}.{}.safetensors", sanitise(&self.model), self.layer, sanitise(&self.corpus), self.dtype)
    }

    fn describe(&self) -> String {
        format!("{}|{}|{}|{}", self.model, self.layer, self.corpus, self.dtype)
    }
}

/// Where statistics are cached: `<cache>/stats` by default.
#[derive(Debug, Clone)]
pub struct StatsCache {
    /// The directory.
    pub root: PathBuf,
}

impl Default for StatsCache {
    fn default() -> Self {
        StatsCache { root: cache_root().join("stats") }
    }
}

impl StatsCache {
    /// Where the cached file of `key` lives.
    pub fn path(&self, key: &StatsKey) -> PathBuf {
        self.root.join(key.file_name())
    }
}

/// Reads a cached second moment; `None` if absent, unreadable, truncated, recorded under another key, or if its
/// values no longer hash to the sha256 recorded with them (then a warning names the file and both digests, and the
/// caller computes the statistics again).
pub fn read_cached(cache: &StatsCache, key: &StatsKey, device: &Device) -> Option<SecondMoment> {
    let path = cache.path(key);
    let bytes = std::fs::read(&path).ok()?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    let metadata = metadata.metadata().as_ref()?;
    if metadata.get("key")? != &key.describe() {
        return None;
    }
    let tokens: u64 = metadata.get("tokens")?.parse().ok()?;
    let recorded = metadata.get("sha256")?;
    let view = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let actual = sha256_hex(view.tensor("mom2").ok()?.data());
    if &actual != recorded {
        eprintln!(
            "warning: {}: the statistics' values have sha256 {actual}, the file records {recorded}: corrupt, computing \
             them again",
            path.display()
        );
        return None;
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).ok()?;
    let matrix = tensors.get("mom2")?.clone();
    let expected = matrix.dim(0).ok()?;
    (matrix.dims() == [expected, expected] && tokens > 0).then_some(SecondMoment { layer: key.layer, tokens, matrix })
}

/// Writes a second moment atomically.
pub fn write_cached(cache: &StatsCache, key: &StatsKey, moment: &SecondMoment) -> Result<()> {
    let path = cache.path(key);
    ensure_dir(path.parent().unwrap_or(std::path::Path::new(".")))?;
    let data = moment.matrix.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let metadata: HashMap<String, String> = [
        ("key".to_string(), key.describe()),
        ("tokens".to_string(), moment.tokens.to_string()),
        ("sha256".to_string(), sha256_hex(&bytes)),
    ]
    .into();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F64, moment.matrix.dims().to_vec(), &bytes)
        .map_err(|e| Error::invalid(path.display().to_string(), "mom2", e.to_string()))?;
    let serialized = safetensors::tensor::serialize([("mom2", view)], Some(metadata))
        .map_err(|e| Error::invalid(path.display().to_string(), "mom2", e.to_string()))?;
    crate::cache::write_atomic(&path, &serialized)
}

/// Where a call to [`second_moments`] found each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provenance {
    /// Read from the cache.
    Cached,
    /// Computed now (and written to the cache).
    Computed,
}

/// Cached second moments of `layers` in the default cache (see [`second_moments_in`]).
pub fn second_moments(
    model: &LoadedModel,
    layers: &[usize],
    corpus: &StatsCorpus,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<SecondMoment>> {
    Ok(second_moments_in(&StatsCache::default(), model, layers, corpus, progress)?
        .into_iter()
        .map(|(m, _)| m)
        .collect())
}

/// Second moments of `layers`: read from `cache`, or computed (once, under a lock) and written atomically.
pub fn second_moments_in(
    cache: &StatsCache,
    model: &LoadedModel,
    layers: &[usize],
    corpus: &StatsCorpus,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<Vec<(SecondMoment, Provenance)>> {
    let fingerprint = format!("{}@{}", model.id, model.fingerprint);
    let key = |layer| StatsKey { model: fingerprint.clone(), layer, corpus: corpus.name.clone(), dtype: "f64" };
    let mut found: HashMap<usize, (SecondMoment, Provenance)> = layers
        .iter()
        .filter_map(|&l| read_cached(cache, &key(l), &model.device).map(|m| (l, (m, Provenance::Cached))))
        .collect();
    let missing: Vec<usize> = layers.iter().copied().filter(|l| !found.contains_key(l)).collect();
    if !missing.is_empty() {
        if !model.is_pristine() {
            return Err(Error::invalid(
                "(statistics)",
                "model",
                format!(
                    "second moments of {} layers {missing:?} are not cached and the model is already edited; \
                     statistics must describe the unedited model: run `editguard stats --model {} --layers ...` first",
                    model.id, model.id
                ),
            ));
        }
        let _lock = CacheLock::acquire(&cache.root.join(format!("{}.compute", key(0).file_name())))?;
        let still_missing: Vec<usize> = missing
            .iter()
            .copied()
            .filter(|&l| match read_cached(cache, &key(l), &model.device) {
                Some(m) => {
                    found.insert(l, (m, Provenance::Cached));
                    false
                }
                None => true,
            })
            .collect();
        if !still_missing.is_empty() {
            for moment in compute(model, &still_missing, corpus, 4096, progress)? {
                write_cached(cache, &key(moment.layer), &moment)?;
                found.insert(moment.layer, (moment, Provenance::Computed));
            }
        }
    }
    Ok(layers.iter().map(|l| found.remove(l).expect("every layer found or computed")).collect())
}

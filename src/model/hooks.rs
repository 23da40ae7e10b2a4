//! Hook points of the forward pass, and the hooks editing methods attach to them.
//!
//! Every architecture calls [`Hook::visit`] at the same five places of each layer: the input of the MLP
//! ([`HookPoint::MlpInput`]) and the output of its first linear map(s) ([`HookPoint::MlpPreActivation`]), where MEND
//! reads its factors; the input of the MLP down-projection ([`HookPoint::MlpKey`], ROME's key and the knowledge
//! neurons' activations), the MLP output before it joins the residual stream ([`HookPoint::MlpOutput`], where ROME
//! adds its vector) and the residual stream after the layer ([`HookPoint::BlockOutput`], where MEMIT optimises). A hook sees the packed activation `(tokens, width)`
//! with its [`Packing`] (which maps `(sequence, position)` sites to rows) and returns the tensor the network continues
//! with, so one small trait serves capture, addition and replacement, in the fast and the differentiable path alike.

use std::sync::Mutex;

use candle_core::Tensor;

use super::packing::Packing;
use crate::error::Result;

/// A place in a layer where hooks are called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookPoint {
    /// Input of the MLP's first linear map(s) (the normalised residual stream), packed `(tokens, hidden)`.
    MlpInput,
    /// Output of the MLP's first linear map(s) before the activation, packed `(tokens, intermediate)` — for a gated
    /// MLP `(tokens, 2 · intermediate)`, gate columns first, then up.
    MlpPreActivation,
    /// Input of the MLP down-projection, packed `(tokens, intermediate)`.
    MlpKey,
    /// MLP output before the residual addition, packed `(tokens, hidden)`.
    MlpOutput,
    /// Residual stream after the layer, packed `(tokens, hidden)`.
    BlockOutput,
}

/// A token of a batch: `(sequence, position)`.
pub type Site = (usize, usize);

/// Something that observes or changes activations during a forward pass.
pub trait Hook {
    /// Called at `point` of `layer` with the packed activation `x`; returns what the network continues with.
    fn visit(&self, layer: usize, point: HookPoint, x: Tensor, packing: &Packing) -> Result<Tensor>;
}

/// The empty hook: the plain forward pass.
pub struct NoHooks;

impl Hook for NoHooks {
    fn visit(&self, _layer: usize, _point: HookPoint, x: Tensor, _packing: &Packing) -> Result<Tensor> {
        Ok(x)
    }
}

/// Several hooks applied in order.
#[derive(Default)]
pub struct HookSet<'a> {
    hooks: Vec<&'a dyn Hook>,
}

impl<'a> HookSet<'a> {
    /// An empty set.
    pub fn new() -> Self {
        HookSet { hooks: Vec::new() }
    }

    /// Adds a hook; hooks run in the order they were added.
    pub fn with(mut self, hook: &'a dyn Hook) -> Self {
        self.hooks.push(hook);
        self
    }
}

impl Hook for HookSet<'_> {
    fn visit(&self, layer: usize, point: HookPoint, mut x: Tensor, packing: &Packing) -> Result<Tensor> {
        for hook in &self.hooks {
            x = hook.visit(layer, point, x, packing)?;
        }
        Ok(x)
    }
}

/// A `(rows, sites)` one-hot matrix that scatters one vector per site into the packed activation.
fn scatter_matrix(x: &Tensor, packing: &Packing, sites: &[Site]) -> Result<Tensor> {
    let rows = x.dim(0)?;
    let mut data = vec![0f32; rows * sites.len()];
    for (column, &site) in sites.iter().enumerate() {
        data[packing.flat(site)? * sites.len() + column] = 1.0;
    }
    Ok(Tensor::from_vec(data, (rows, sites.len()), x.device())?.to_dtype(x.dtype())?)
}

/// Records the activation at some sites of one layer: the result is `(sites, width)`.
pub struct Capture {
    layer: usize,
    point: HookPoint,
    sites: Vec<Site>,
    captured: Mutex<Option<Tensor>>,
}

impl Capture {
    /// Captures `point` of `layer` at `sites`.
    pub fn new(layer: usize, point: HookPoint, sites: Vec<Site>) -> Self {
        Capture { layer, point, sites, captured: Mutex::new(None) }
    }

    /// The captured `(sites, width)` tensor, once the forward pass has run.
    pub fn take(&self) -> Option<Tensor> {
        self.captured.lock().ok().and_then(|mut c| c.take())
    }
}

impl Hook for Capture {
    fn visit(&self, layer: usize, point: HookPoint, x: Tensor, packing: &Packing) -> Result<Tensor> {
        if layer == self.layer && point == self.point {
            let rows = x.index_select(&packing.flat_indices(&self.sites, x.device())?, 0)?;
            if let Ok(mut slot) = self.captured.lock() {
                *slot = Some(rows);
            }
        }
        Ok(x)
    }
}

/// Adds one vector per site (`(sites, width)`, differentiable) to the activation of one layer.
pub struct AddAtSites {
    layer: usize,
    point: HookPoint,
    sites: Vec<Site>,
    vectors: Tensor,
}

impl AddAtSites {
    /// Adds row `i` of `vectors` at `sites[i]`.
    pub fn new(layer: usize, point: HookPoint, sites: Vec<Site>, vectors: Tensor) -> Self {
        AddAtSites { layer, point, sites, vectors }
    }

    /// Adds the same `(width,)` vector at every site.
    pub fn same(layer: usize, point: HookPoint, sites: Vec<Site>, vector: &Tensor) -> Result<Self> {
        let width = vector.dim(0)?;
        let vectors = vector.unsqueeze(0)?.broadcast_as((sites.len(), width))?;
        Ok(AddAtSites { layer, point, sites, vectors })
    }
}

impl Hook for AddAtSites {
    fn visit(&self, layer: usize, point: HookPoint, x: Tensor, packing: &Packing) -> Result<Tensor> {
        if layer != self.layer || point != self.point || self.sites.is_empty() {
            return Ok(x);
        }
        let scatter = scatter_matrix(&x, packing, &self.sites)?;
        let added = scatter.matmul(&self.vectors.to_dtype(x.dtype())?.contiguous()?)?;
        Ok((x + added)?)
    }
}

/// Replaces the activation at each site by a given row (`(sites, width)`, differentiable).
pub struct ReplaceAtSites {
    layer: usize,
    point: HookPoint,
    sites: Vec<Site>,
    values: Tensor,
}

impl ReplaceAtSites {
    /// Replaces the activation at `sites[i]` by row `i` of `values`.
    pub fn new(layer: usize, point: HookPoint, sites: Vec<Site>, values: Tensor) -> Self {
        ReplaceAtSites { layer, point, sites, values }
    }
}

impl Hook for ReplaceAtSites {
    fn visit(&self, layer: usize, point: HookPoint, x: Tensor, packing: &Packing) -> Result<Tensor> {
        if layer != self.layer || point != self.point || self.sites.is_empty() {
            return Ok(x);
        }
        let scatter = scatter_matrix(&x, packing, &self.sites)?;
        let keep = (1.0 - scatter.sum_keepdim(1)?)?;
        let replaced = x.broadcast_mul(&keep)? + scatter.matmul(&self.values.to_dtype(x.dtype())?.contiguous()?)?;
        Ok(replaced?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two sequences of three tokens, width two: rows 0..3 are sequence 0, rows 3..6 sequence 1.
    fn activation() -> (Tensor, Packing) {
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((6, 2)).unwrap();
        (x, Packing::new(&[3, 3], &Device::Cpu).unwrap())
    }

    #[test]
    fn capture_takes_the_named_sites() {
        let capture = Capture::new(1, HookPoint::MlpKey, vec![(1, 2), (0, 0)]);
        let (x, packing) = activation();
        capture.visit(0, HookPoint::MlpKey, x.clone(), &packing).unwrap();
        assert!(capture.take().is_none(), "wrong layer must not capture");
        capture.visit(1, HookPoint::MlpKey, x, &packing).unwrap();
        let rows = capture.take().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(rows, vec![vec![10.0, 11.0], vec![0.0, 1.0]]);
    }

    #[test]
    fn add_and_replace_touch_only_their_sites() {
        let v = Tensor::new(&[[100f32, 200.0]], &Device::Cpu).unwrap();
        let add = AddAtSites::new(0, HookPoint::MlpOutput, vec![(0, 1)], v.clone());
        let (x, packing) = activation();
        let out = add.visit(0, HookPoint::MlpOutput, x.clone(), &packing).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out[1], vec![102.0, 203.0]);
        assert_eq!(out[0], vec![0.0, 1.0]);
        assert_eq!(out[4], vec![8.0, 9.0]);
        let replace = ReplaceAtSites::new(0, HookPoint::MlpKey, vec![(1, 0)], v);
        let out = replace.visit(0, HookPoint::MlpKey, x, &packing).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out[3], vec![100.0, 200.0]);
        assert_eq!(out[4], vec![8.0, 9.0]);
    }

    #[test]
    fn out_of_range_site_is_an_error() {
        let capture = Capture::new(0, HookPoint::MlpKey, vec![(5, 0)]);
        let (x, packing) = activation();
        assert!(capture.visit(0, HookPoint::MlpKey, x, &packing).is_err());
    }
}

//! MEND's editor network: one gradient transform per edited weight shape, and a learned step size per weight.
//!
//! As in eric-mitchell/mend (`algs/mend.py`, `nn.py`), a transform takes the rank-one factors of a weight's gradient
//! — each token's layer input `u_t` and output gradient `δ_t` — normalises them per dimension with running
//! statistics (Welford's algorithm, updated only while training, frozen afterwards), concatenates them
//! (`combine`), and passes them through `n_hidden + 1` low-rank residual layers
//! `y = x + relu((E(Px) + b) · scale[m] + shift[m])`, with `E` (`d × r`) zero-initialised so the transform starts as
//! the identity, `P` (`r × d`) standard normal, `r = min(rank, d)` and `m` the weight's mode: its position among the
//! edited weights of the same shape, which share the transform (`shared`). The output is split back into `ũ_t`
//! and `δ̃_t`; the weight's update is `α_w · Σ_t δ̃_t ũ_tᵀ` with `α_w` learned (initialised to `edit_lr`). Rows whose
//! `u` or `δ` is all zero (padding) are dropped first. Random initialisation is seeded (ChaCha8 + Box–Muller), so the
//! same seed builds the same editor.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{D, DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::WeightId;
use crate::model::kernels::trained_product::matmul_trained;

/// Running per-dimension mean and sum of squared deviations (Welford), in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningMoments {
    /// Rows seen.
    pub count: u64,
    /// Mean per dimension.
    pub mean: Vec<f64>,
    /// Σ (x − mean)² per dimension.
    pub squares: Vec<f64>,
}

impl RunningMoments {
    /// No rows seen yet.
    pub fn new(width: usize) -> Self {
        RunningMoments { count: 0, mean: vec![0.0; width], squares: vec![0.0; width] }
    }

    /// Adds one row (the reference's `update_counter`).
    pub fn push(&mut self, row: &[f32]) {
        self.count += 1;
        let k = self.count as f64;
        for ((mean, squares), &x) in self.mean.iter_mut().zip(&mut self.squares).zip(row) {
            let x = f64::from(x);
            let next = *mean + (x - *mean) / k;
            *squares += (x - *mean) * (x - next);
            *mean = next;
        }
    }

    /// The sample standard deviation per dimension (`√(squares / (count − 1))`); None before two rows.
    pub fn std(&self) -> Option<Vec<f64>> {
        (self.count >= 2).then(|| self.squares.iter().map(|s| (s / (self.count - 1) as f64).sqrt()).collect())
    }
}

/// One low-rank residual layer `y = x + relu((E(Px) + b) · scale[m] + shift[m])`.
pub struct LowRankLayer {
    /// `E`, `(d, r)`, zero at the start.
    pub expand: Var,
    /// `P`, `(r, d)`, standard normal at the start.
    pub project: Var,
    /// `b`, `(d,)`.
    pub bias: Var,
    /// Per-mode scale, `(modes, d)`, ones at the start.
    pub mode_scale: Var,
    /// Per-mode shift, `(modes, d)`, zeros at the start.
    pub mode_shift: Var,
}

impl LowRankLayer {
    /// The parameters with the names the editor file stores them under.
    fn named_vars(&self) -> [(&'static str, &Var); 5] {
        [
            ("expand", &self.expand),
            ("project", &self.project),
            ("bias", &self.bias),
            ("mode_scale", &self.mode_scale),
            ("mode_shift", &self.mode_shift),
        ]
    }

    /// `x` `(rows, d)`, `modes` `(rows,)` u32: each row takes its own mode's scale and shift.
    fn forward(&self, x: &Tensor, modes: &Tensor) -> Result<Tensor> {
        let pre = matmul_trained(&matmul_trained(x, self.project.as_tensor())?, self.expand.as_tensor())?;
        let pre = pre.broadcast_add(self.bias.as_tensor())?;
        let scale = self.mode_scale.as_tensor().index_select(modes, 0)?;
        let shift = self.mode_shift.as_tensor().index_select(modes, 0)?;
        let pre = ((pre * scale)? + shift)?;
        Ok((pre.relu()? + x)?)
    }
}

/// The transform shared by the edited weights of one shape.
pub struct ShapeGroup {
    /// Width of `u` (the weight's input).
    pub x_dim: usize,
    /// Width of `δ` (the weight's output).
    pub delta_dim: usize,
    /// Weights sharing it.
    pub modes: usize,
    /// The residual layers.
    pub layers: Vec<LowRankLayer>,
    /// Normalisation statistics of `u` and `δ`.
    pub moments: Mutex<(RunningMoments, RunningMoments)>,
}

impl ShapeGroup {
    /// `(u − mean)/(std + 1e-7)` and the same for `δ`, with the group's statistics (which first take in the rows
    /// when `training`). Statistics that have seen fewer than two rows are an error, never NaN.
    fn normalise(&self, x: &Tensor, delta: &Tensor, training: bool) -> Result<(Tensor, Tensor)> {
        let mut moments = self.moments.lock().map_err(|_| Error::invalid("(mend)", "moments", "lock poisoned"))?;
        if training {
            for (row_x, row_delta) in x.to_vec2::<f32>()?.iter().zip(delta.to_vec2::<f32>()?.iter()) {
                moments.0.push(row_x);
                moments.1.push(row_delta);
            }
        }
        let (Some(x_std), Some(delta_std)) = (moments.0.std(), moments.1.std()) else {
            return Err(Error::invalid(
                "(mend)",
                "normalisation",
                format!(
                    "the editor's statistics have seen {} rows; at least 2 are needed (train the editor first)",
                    moments.0.count
                ),
            ));
        };
        let scaled = |t: &Tensor, mean: &[f64], std: &[f64]| -> Result<Tensor> {
            let device = t.device();
            let mean = Tensor::from_vec(mean.iter().map(|&m| m as f32).collect::<Vec<_>>(), mean.len(), device)?;
            let scale: Vec<f32> = std.iter().map(|&s| (1.0 / (s + 1e-7)) as f32).collect();
            let scale = Tensor::from_vec(scale, std.len(), device)?;
            Ok(t.broadcast_sub(&mean)?.broadcast_mul(&scale)?)
        };
        Ok((scaled(x, &moments.0.mean, &x_std)?, scaled(delta, &moments.1.mean, &delta_std)?))
    }
}

/// One edited weight: which group transforms it, and its mode there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EditedWeight {
    /// The weight.
    pub id: WeightId,
    /// Index into the groups.
    pub group: usize,
    /// Its mode in the group.
    pub mode: usize,
}

/// The whole editor: transforms, the edited weights and their step sizes.
pub struct Editor {
    /// One per distinct weight shape, in order of first appearance.
    pub groups: Vec<ShapeGroup>,
    /// The edited weights, in the configured order.
    pub weights: Vec<EditedWeight>,
    /// `α_w`, one per edited weight.
    pub edit_lrs: Var,
}

/// How to build an editor.
#[derive(Debug, Clone)]
pub struct EditorShape {
    /// `(weight, in, out)` for each edited weight.
    pub weights: Vec<(WeightId, usize, usize)>,
    /// Rank of the low-rank layers (capped at the width).
    pub rank: usize,
    /// Hidden layers (`n_hidden`; `n_hidden + 1` residual layers).
    pub n_hidden: usize,
    /// Initial `α`.
    pub edit_lr: f64,
    /// Seed of the random initialisation.
    pub seed: u64,
}

/// Standard normal values from a seeded generator (Box–Muller).
pub fn seeded_normal(count: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
    let mut out = Vec::with_capacity(count + 1);
    while out.len() < count {
        let (a, b): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random::<f64>());
        let radius = (-2.0 * a.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * b;
        out.push((radius * angle.cos()) as f32);
        out.push((radius * angle.sin()) as f32);
    }
    out.truncate(count);
    out
}

impl Editor {
    /// A freshly initialised editor (the identity transform, untrained statistics).
    pub fn new(shape: &EditorShape, device: &Device) -> Result<Editor> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(shape.seed);
        let mut groups: Vec<ShapeGroup> = Vec::new();
        let mut weights = Vec::new();
        for &(id, x_dim, delta_dim) in &shape.weights {
            let group = match groups.iter().position(|g| g.x_dim == x_dim && g.delta_dim == delta_dim) {
                Some(g) => g,
                None => {
                    groups.push(ShapeGroup {
                        x_dim,
                        delta_dim,
                        modes: 0,
                        layers: Vec::new(),
                        moments: Mutex::new((RunningMoments::new(x_dim), RunningMoments::new(delta_dim))),
                    });
                    groups.len() - 1
                }
            };
            weights.push(EditedWeight { id, group, mode: groups[group].modes });
            groups[group].modes += 1;
        }
        for group in &mut groups {
            let width = group.x_dim + group.delta_dim;
            let rank = shape.rank.min(width);
            for _ in 0..=shape.n_hidden {
                let project = Tensor::from_vec(seeded_normal(rank * width, &mut rng), (rank, width), device)?;
                group.layers.push(LowRankLayer {
                    expand: Var::zeros((width, rank), DType::F32, device)?,
                    project: Var::from_tensor(&project)?,
                    bias: Var::zeros(width, DType::F32, device)?,
                    mode_scale: Var::ones((group.modes, width), DType::F32, device)?,
                    mode_shift: Var::zeros((group.modes, width), DType::F32, device)?,
                });
            }
        }
        let lrs = vec![shape.edit_lr as f32; weights.len()];
        let edit_lrs = Var::from_tensor(&Tensor::from_vec(lrs, weights.len(), device)?)?;
        Ok(Editor { groups, weights, edit_lrs })
    }

    /// The transform's parameters (what training optimises with `lr`).
    pub fn transform_vars(&self) -> Vec<Var> {
        self.groups
            .iter()
            .flat_map(|g| g.layers.iter())
            .flat_map(|l| l.named_vars().map(|(_, var)| var.clone()))
            .collect()
    }

    /// The updates of every edited weight from its factors (`factors[i]` = `(u, δ)` of weight `i`, `(T, in)` and
    /// `(T, out)`): `α_i · Σ_t δ̃_t ũ_tᵀ`, `(out, in)` each. The weights of one shape go through their transform in one
    /// batch (each row with its weight's mode). While `training`, the group's statistics take in all of the group's
    /// rows first; the reference calls the transform weight by weight, so its first weight is normalised before the
    /// others' rows of the same step are counted — a difference that vanishes as the statistics grow.
    pub fn updates(&self, factors: &[(Tensor, Tensor)], training: bool) -> Result<Vec<Tensor>> {
        if factors.len() != self.weights.len() {
            return Err(Error::invalid("(mend)", "factors", "one (u, δ) pair per edited weight expected"));
        }
        let mut out: Vec<Option<Tensor>> = vec![None; factors.len()];
        for (g, group) in self.groups.iter().enumerate() {
            let members: Vec<usize> = (0..self.weights.len()).filter(|&i| self.weights[i].group == g).collect();
            let xs: Vec<Tensor> =
                members.iter().map(|&i| factors[i].0.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
            let deltas: Vec<Tensor> =
                members.iter().map(|&i| factors[i].1.to_dtype(DType::F32)).collect::<candle_core::Result<_>>()?;
            let (x_all, delta_all) = (Tensor::cat(&xs, 0)?, Tensor::cat(&deltas, 0)?);
            if x_all.dim(0)? == 0 {
                for &i in &members {
                    out[i] = Some(Tensor::zeros((group.delta_dim, group.x_dim), DType::F32, x_all.device())?);
                }
                continue;
            }
            let (x_normal, delta_normal) = group.normalise(&x_all, &delta_all, training)?;
            let mut hidden = Tensor::cat(&[x_normal, delta_normal], D::Minus1)?;
            let modes: Vec<u32> = members
                .iter()
                .zip(&xs)
                .flat_map(|(&i, x)| std::iter::repeat_n(self.weights[i].mode as u32, x.dim(0).unwrap_or(0)))
                .collect();
            let modes = Tensor::new(modes.as_slice(), x_all.device())?;
            for layer in &group.layers {
                hidden = layer.forward(&hidden, &modes)?;
            }
            let mut start = 0;
            for (&i, x) in members.iter().zip(&xs) {
                let rows = x.dim(0)?;
                let part = hidden.narrow(0, start, rows)?;
                start += rows;
                let (u, delta) = (part.narrow(1, 0, group.x_dim)?, part.narrow(1, group.x_dim, group.delta_dim)?);
                let alpha = self.edit_lrs.as_tensor().get(i)?;
                out[i] = Some(delta.t()?.matmul(&u)?.broadcast_mul(&alpha)?);
            }
        }
        Ok(out.into_iter().map(|u| u.expect("every weight belongs to a group")).collect())
    }

    /// The update of one edited weight alone (see [`updates`](Self::updates)); the others get no rows.
    pub fn update(&self, index: usize, x: &Tensor, delta: &Tensor, training: bool) -> Result<Tensor> {
        let mut factors = Vec::with_capacity(self.weights.len());
        for (i, w) in self.weights.iter().enumerate() {
            let group = &self.groups[w.group];
            factors.push(if i == index {
                (x.clone(), delta.clone())
            } else {
                (
                    Tensor::zeros((0, group.x_dim), DType::F32, x.device())?,
                    Tensor::zeros((0, group.delta_dim), DType::F32, x.device())?,
                )
            });
        }
        Ok(self.updates(&factors, training)?.swap_remove(index))
    }

    /// A copy of every tensor of the editor by name (parameters and statistics), for saving or for keeping the best
    /// editor of a training run (the optimisers update parameters in place, so these are copies).
    pub fn named_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert("edit_lrs".to_string(), self.edit_lrs.as_tensor().copy()?);
        for (g, group) in self.groups.iter().enumerate() {
            for (l, layer) in group.layers.iter().enumerate() {
                for (name, var) in layer.named_vars() {
                    out.insert(format!("group{g}.layer{l}.{name}"), var.as_tensor().copy()?);
                }
            }
            let moments = group.moments.lock().map_err(|_| Error::invalid("(mend)", "moments", "lock poisoned"))?;
            let device = self.edit_lrs.device();
            for (name, m) in [("x", &moments.0), ("delta", &moments.1)] {
                out.insert(format!("group{g}.{name}_mean"), Tensor::new(m.mean.as_slice(), device)?);
                out.insert(format!("group{g}.{name}_squares"), Tensor::new(m.squares.as_slice(), device)?);
                out.insert(format!("group{g}.{name}_count"), Tensor::new(&[m.count as f64], device)?);
            }
        }
        Ok(out)
    }

    /// Sets every tensor from `tensors` (as [`named_tensors`](Self::named_tensors) wrote them); a missing tensor or a
    /// shape that does not match is an error naming it.
    pub fn load_tensors(&self, tensors: &HashMap<String, Tensor>, origin: &str) -> Result<()> {
        let get = |name: &str, like: &Tensor| -> Result<Tensor> {
            let t = tensors.get(name).ok_or_else(|| Error::invalid(origin, name, "missing from the editor file"))?;
            if t.shape() != like.shape() {
                return Err(Error::invalid(origin, name, format!("shape {:?}, expected {:?}", t.dims(), like.dims())));
            }
            Ok(t.to_dtype(like.dtype())?)
        };
        self.edit_lrs.set(&get("edit_lrs", self.edit_lrs.as_tensor())?)?;
        for (g, group) in self.groups.iter().enumerate() {
            for (l, layer) in group.layers.iter().enumerate() {
                for (name, var) in layer.named_vars() {
                    var.set(&get(&format!("group{g}.layer{l}.{name}"), var.as_tensor())?)?;
                }
            }
            let mut moments = group.moments.lock().map_err(|_| Error::invalid("(mend)", "moments", "lock poisoned"))?;
            let (x_moments, delta_moments) = &mut *moments;
            for (name, m) in [("x", x_moments), ("delta", delta_moments)] {
                let like = Tensor::new(m.mean.as_slice(), self.edit_lrs.device())?;
                m.mean = get(&format!("group{g}.{name}_mean"), &like)?.to_vec1()?;
                m.squares = get(&format!("group{g}.{name}_squares"), &like)?.to_vec1()?;
                let count = Tensor::new(&[0f64], self.edit_lrs.device())?;
                m.count = get(&format!("group{g}.{name}_count"), &count)?.to_vec1::<f64>()?[0] as u64;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welford_equals_a_two_pass_mean_and_variance() {
        // The third column sits far from zero with a small spread: where a one-pass sum of squares loses its digits.
        let rows: Vec<Vec<f32>> = (0..50)
            .map(|i| {
                vec![(i as f32 * 0.37).sin() * 3.0 + 1.0, (i * i) as f32 * 1e-2, 1e3 + (i as f32 * 0.61).cos() * 1e-2]
            })
            .collect();
        let mut moments = RunningMoments::new(3);
        for row in &rows {
            moments.push(row);
        }
        for d in 0..3 {
            let values: Vec<f64> = rows.iter().map(|r| f64::from(r[d])).collect();
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64;
            assert!((moments.mean[d] - mean).abs() < 1e-10 * mean.abs().max(1.0));
            assert!((moments.std().unwrap()[d] - variance.sqrt()).abs() < 1e-8 * variance.sqrt());
        }
        assert!(RunningMoments::new(2).std().is_none());
    }

    #[test]
    fn the_initial_transform_is_the_identity_on_normalised_factors() {
        let device = Device::Cpu;
        let id = WeightId::MlpDown(0);
        let shape = EditorShape { weights: vec![(id, 3, 2)], rank: 4, n_hidden: 1, edit_lr: 1e-4, seed: 7 };
        let editor = Editor::new(&shape, &device).unwrap();
        let x = Tensor::new(&[[1f32, 2.0, 3.0], [2.0, 0.0, -1.0], [0.5, 1.0, 1.0]], &device).unwrap();
        let delta = Tensor::new(&[[0.1f32, -0.2], [0.3, 0.1], [-0.2, 0.05]], &device).unwrap();
        assert!(editor.update(0, &x, &delta, false).is_err(), "statistics unset must be an error, not NaN");
        let update = editor.update(0, &x, &delta, true).unwrap();
        // Identity transform: ũ, δ̃ are the normalised factors; ΔW = α Σ δ̃ ũᵀ.
        let moments = editor.groups[0].moments.lock().unwrap().clone();
        let norm = |t: &Tensor, m: &RunningMoments| {
            let std = m.std().unwrap();
            let rows = t.to_vec2::<f32>().unwrap();
            rows.iter()
                .map(|r| {
                    r.iter().enumerate().map(|(d, v)| (f64::from(*v) - m.mean[d]) / (std[d] + 1e-7)).collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        };
        let (xn, dn) = (norm(&x, &moments.0), norm(&delta, &moments.1));
        let got = update.to_vec2::<f32>().unwrap();
        for o in 0..2 {
            for i in 0..3 {
                let expected: f64 = 1e-4 * (0..3).map(|t| dn[t][o] * xn[t][i]).sum::<f64>();
                assert!((f64::from(got[o][i]) - expected).abs() < 1e-8, "({o},{i}) {} vs {expected}", got[o][i]);
            }
        }
        assert_eq!(
            seeded_normal(5, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)),
            seeded_normal(5, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1))
        );
    }

    #[test]
    fn weights_of_one_shape_share_a_transform_with_their_own_modes() {
        let shape = EditorShape {
            weights: vec![(WeightId::MlpGate(2), 4, 6), (WeightId::MlpUp(2), 4, 6), (WeightId::MlpDown(2), 6, 4)],
            rank: 100,
            n_hidden: 1,
            edit_lr: 1e-4,
            seed: 0,
        };
        let editor = Editor::new(&shape, &Device::Cpu).unwrap();
        assert_eq!(editor.groups.len(), 2);
        let placed: Vec<(usize, usize)> = editor.weights.iter().map(|w| (w.group, w.mode)).collect();
        assert_eq!(placed, vec![(0, 0), (0, 1), (1, 0)]);
        assert_eq!(editor.groups[0].layers[0].expand.as_tensor().dims(), &[10, 10], "rank capped at the width");
        assert_eq!(editor.transform_vars().len(), 2 * 2 * 5);
    }
}

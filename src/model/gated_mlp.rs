//! The weights of a gated MLP (`down(act(gate · x) ⊙ up · x)`, Llama's SwiGLU and Gemma's GeGLU) and their overrides.
//!
//! Gate and up are stacked into one `(2·width, hidden)` matrix so that the forward pass takes a single larger matrix
//! product. Editing methods read and override the projections one at a time: replacing gate or up builds a new stack
//! with the other half as it is, and the undo puts the whole previous stack back, so that undoing several overrides
//! in reverse order restores the very tensors there were (no copies, no autograd history).

use candle_core::Tensor;

use super::MlpProjection;

/// Stacked gate/up and down projections of one layer, `(out, in)` orientation.
pub struct GatedMlp {
    /// `[gate; up]`, `(2·width, hidden)`.
    pub gate_up: Tensor,
    /// `(hidden, width)`.
    pub down: Tensor,
    /// The MLP width (rows of gate, and of up).
    pub width: usize,
}

impl GatedMlp {
    /// Stacks `gate` and `up` (each `(width, hidden)`) beside `down`.
    pub fn new(gate: Tensor, up: Tensor, down: Tensor) -> candle_core::Result<Self> {
        let width = gate.dim(0)?;
        Ok(GatedMlp { gate_up: Tensor::cat(&[gate, up], 0)?, down, width })
    }

    /// The current value of a projection.
    pub fn weight(&self, projection: MlpProjection) -> Option<Tensor> {
        match projection {
            MlpProjection::Gate => self.gate_up.narrow(0, 0, self.width).ok(),
            MlpProjection::Up => self.gate_up.narrow(0, self.width, self.width).ok(),
            MlpProjection::Down => Some(self.down.clone()),
        }
    }

    /// Replaces a projection, returning what [`restore`](Self::restore) needs to undo it (for gate or up: the whole
    /// previous stack).
    pub fn replace(&mut self, projection: MlpProjection, value: Tensor) -> Option<Tensor> {
        let width = self.width;
        let stacked = match projection {
            MlpProjection::Gate => Tensor::cat(&[&value, &self.gate_up.narrow(0, width, width).ok()?], 0).ok()?,
            MlpProjection::Up => Tensor::cat(&[&self.gate_up.narrow(0, 0, width).ok()?, &value], 0).ok()?,
            MlpProjection::Down => return Some(std::mem::replace(&mut self.down, value)),
        };
        Some(std::mem::replace(&mut self.gate_up, stacked))
    }

    /// Undoes [`replace`](Self::replace) with what it returned.
    pub fn restore(&mut self, projection: MlpProjection, saved: Tensor) {
        match projection {
            MlpProjection::Gate | MlpProjection::Up => self.gate_up = saved,
            MlpProjection::Down => self.down = saved,
        }
    }
}

//! Packed batches: the tokens of several sequences stacked as rows of one `(tokens, width)` matrix.
//!
//! Linear layers, norms and activations act on each token independently, so running them on the packed rows wastes
//! nothing on padding and gives the matrix products their largest, most efficient shapes. Only attention needs the
//! sequences apart: [`Packing::pad`] lays the rows out as a right-padded `(batch, longest, width)` tensor and
//! [`Packing::unpad`] gathers the real tokens back. Padding slots copy a real token of their own row; they come after
//! every real token, so the causal mask keeps them out of every real token's context and their value never matters.
//! Both are `index_select`s, which carry gradients.

use candle_core::{Device, Tensor};

use super::hooks::Site;
use crate::error::{Error, Result};

/// Where each sequence's tokens sit among the packed rows.
#[derive(Debug, Clone)]
pub struct Packing {
    lengths: Vec<usize>,
    offsets: Vec<usize>,
    longest: usize,
    padded_index: Tensor,
    packed_index: Tensor,
    positions: Tensor,
}

impl Packing {
    /// The packing of sequences with these lengths (each at least one token).
    pub fn new(lengths: &[usize], device: &Device) -> Result<Self> {
        Self::starting_at(lengths, &vec![0; lengths.len()], device)
    }

    /// Like [`new`](Self::new) for sequences that continue earlier tokens: sequence `i`'s tokens sit at positions
    /// `starts[i]..starts[i] + lengths[i]` (what [`positions`](Self::positions) reports, e.g. for absolute position
    /// embeddings of the new tokens of a decoding step).
    pub fn starting_at(lengths: &[usize], starts: &[usize], device: &Device) -> Result<Self> {
        if starts.len() != lengths.len() {
            return Err(Error::invalid("(batch)", "starts", "one start position per sequence"));
        }
        if lengths.is_empty() || lengths.contains(&0) {
            return Err(Error::invalid(
                "(batch)",
                "lengths",
                format!("expected non-empty sequences, found {lengths:?}"),
            ));
        }
        let longest = *lengths.iter().max().unwrap_or(&1);
        let mut offsets = Vec::with_capacity(lengths.len());
        let mut total = 0;
        for &length in lengths {
            offsets.push(total);
            total += length;
        }
        let mut padded = Vec::with_capacity(lengths.len() * longest);
        let mut packed = Vec::with_capacity(total);
        let mut positions = Vec::with_capacity(total);
        for (row, ((&offset, &length), &start)) in offsets.iter().zip(lengths).zip(starts).enumerate() {
            for position in 0..longest {
                padded.push((offset + position.min(length - 1)) as u32);
            }
            for position in 0..length {
                packed.push((row * longest + position) as u32);
                positions.push((start + position) as u32);
            }
        }
        Ok(Packing {
            padded_index: Tensor::from_vec(padded, lengths.len() * longest, device)?,
            packed_index: Tensor::from_vec(packed, total, device)?,
            positions: Tensor::from_vec(positions, total, device)?,
            lengths: lengths.to_vec(),
            offsets,
            longest,
        })
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// Number of packed rows (real tokens).
    pub fn rows(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// The longest sequence.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// Lengths of the sequences.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Position of every packed row within its sequence (counted from the sequence's start position), `(rows,)` u32.
    pub fn positions(&self) -> &Tensor {
        &self.positions
    }

    fn uniform(&self) -> bool {
        self.lengths.iter().all(|&l| l == self.longest)
    }

    /// The packed row of token `position` of sequence `row`.
    pub fn flat(&self, (row, position): Site) -> Result<usize> {
        match self.lengths.get(row) {
            Some(&length) if position < length => Ok(self.offsets[row] + position),
            _ => Err(Error::invalid(
                "(batch)",
                "site",
                format!("({row}, {position}) is outside a batch with sequence lengths {:?}", self.lengths),
            )),
        }
    }

    /// Packed row indices of `sites`, as a `(sites,)` u32 tensor.
    pub fn flat_indices(&self, sites: &[Site], device: &Device) -> Result<Tensor> {
        let flat = sites.iter().map(|&s| self.flat(s).map(|i| i as u32)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::from_vec(flat, sites.len(), device)?)
    }

    /// `(rows, width)` → right-padded `(batch, longest, width)`.
    pub fn pad(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let width = x.dim(1)?;
        if self.uniform() {
            return x.reshape((self.batch(), self.longest, width));
        }
        x.contiguous()?.index_select(&self.padded_index, 0)?.reshape((self.batch(), self.longest, width))
    }

    /// The packing of each sequence's tokens from `starts[i]` on, and those rows of the packed `hidden` state.
    pub fn suffix_rows(&self, starts: &[usize], hidden: &Tensor) -> Result<(Packing, Tensor)> {
        let mut rows = Vec::new();
        let mut offset = 0;
        for (&length, &start) in self.lengths.iter().zip(starts) {
            rows.extend((offset + start..offset + length).map(|r| r as u32));
            offset += length;
        }
        let lengths: Vec<usize> = self.lengths.iter().zip(starts).map(|(l, s)| l - s).collect();
        let index = Tensor::from_vec(rows, lengths.iter().sum::<usize>(), hidden.device())?;
        Ok((Packing::new(&lengths, hidden.device())?, hidden.index_select(&index, 0)?))
    }

    /// Right-padded `(batch, longest, width)` → `(rows, width)`.
    pub fn unpad(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let width = x.dim(2)?;
        let flat = x.reshape((self.batch() * self.longest, width))?;
        if self.uniform() {
            return Ok(flat);
        }
        flat.index_select(&self.packed_index, 0)
    }
}

/// Token ids of several sequences, packed, with their [`Packing`].
pub struct PackedBatch {
    /// `(rows,)` u32 ids.
    pub ids: Tensor,
    /// Where each sequence sits.
    pub packing: Packing,
}

impl PackedBatch {
    /// Packs `sequences` (each at least one token).
    pub fn new(sequences: &[&[u32]], device: &Device) -> Result<Self> {
        let lengths: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        let packing = Packing::new(&lengths, device)?;
        let ids: Vec<u32> = sequences.iter().flat_map(|s| s.iter().copied()).collect();
        Ok(PackedBatch { ids: Tensor::from_vec(ids, packing.rows(), device)?, packing })
    }

    /// A batch of one sequence.
    pub fn single(sequence: &[u32], device: &Device) -> Result<Self> {
        Self::new(&[sequence], device)
    }
}

/// Where each of consecutive runs of `counts` rows starts: `[0, c₀, c₀ + c₁, …]` (one entry per run).
pub fn offsets(counts: &[usize]) -> Vec<usize> {
    counts
        .iter()
        .scan(0, |total, &count| {
            let start = *total;
            *total += count;
            Some(start)
        })
        .collect()
}

/// Groups sequence indices into chunks of at most `token_budget` real tokens (a chunk holds at least one sequence),
/// sorted by length so that the padding attention needs stays small. Chunks come longest first.
pub fn length_sorted_chunks(lengths: &[usize], token_budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut chunks: Vec<(usize, Vec<usize>)> = Vec::new();
    for index in order {
        match chunks.last_mut() {
            Some((tokens, chunk)) if *tokens + lengths[index] <= token_budget => {
                *tokens += lengths[index];
                chunk.push(index);
            }
            _ => chunks.push((lengths[index], vec![index])),
        }
    }
    chunks.into_iter().map(|(_, chunk)| chunk).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_and_unpad_round_trip() {
        let packing = Packing::new(&[3, 1, 2], &Device::Cpu).unwrap();
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap().reshape((6, 1)).unwrap();
        let padded = packing.pad(&x).unwrap();
        assert_eq!(padded.dims(), &[3, 3, 1]);
        let rows: Vec<Vec<f32>> =
            padded.squeeze(2).unwrap().to_vec2::<f32>().unwrap().into_iter().map(|r| r.to_vec()).collect();
        assert_eq!(rows[0], vec![0.0, 1.0, 2.0]);
        assert_eq!(rows[1][0], 3.0);
        assert_eq!(rows[2][..2], [4.0, 5.0]);
        let back = packing.unpad(&padded).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
        assert_eq!(packing.positions().to_vec1::<u32>().unwrap(), vec![0, 1, 2, 0, 0, 1]);
    }

    #[test]
    fn sites_map_to_rows_and_out_of_range_is_refused() {
        let packing = Packing::new(&[3, 2], &Device::Cpu).unwrap();
        assert_eq!(packing.flat((1, 1)).unwrap(), 4);
        assert!(packing.flat((1, 2)).is_err());
        assert!(packing.flat((2, 0)).is_err());
        assert!(Packing::new(&[2, 0], &Device::Cpu).is_err());
    }

    #[test]
    fn chunks_cover_every_index_once_within_budget() {
        let lengths = [5, 30, 7, 7, 12, 1, 30, 50];
        let chunks = length_sorted_chunks(&lengths, 40);
        let mut seen: Vec<usize> = chunks.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for chunk in &chunks {
            let tokens: usize = chunk.iter().map(|&i| lengths[i]).sum();
            assert!(chunk.len() == 1 || tokens <= 40, "{chunk:?}");
        }
    }
}

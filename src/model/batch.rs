//! Right-padded token batches and length-sorted chunking.
//!
//! Rows are padded on the right, so causal attention alone keeps padding out of every real token's context and
//! positions start at 0 in every row. Sorting sequences by length before chunking keeps padding, and so wasted work,
//! small.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// A `(batch, tokens)` id tensor and the real length of each row.
pub struct TokenBatch {
    /// Right-padded ids.
    pub ids: Tensor,
    /// Real lengths, one per row.
    pub lengths: Vec<usize>,
}

impl TokenBatch {
    /// Pads `sequences` on the right with `pad_id` to the longest one.
    pub fn right_padded(sequences: &[&[u32]], pad_id: u32, device: &Device) -> Result<Self> {
        let width = sequences.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut data = Vec::with_capacity(sequences.len() * width);
        for sequence in sequences {
            data.extend_from_slice(sequence);
            data.extend(std::iter::repeat_n(pad_id, width - sequence.len()));
        }
        let ids = Tensor::from_vec(data, (sequences.len(), width), device)?;
        Ok(TokenBatch { ids, lengths: sequences.iter().map(|s| s.len()).collect() })
    }
}

/// Groups sequence indices into chunks of similar length whose padded size stays within `token_budget`
/// (a chunk holds at least one sequence). Chunks come longest first.
pub fn length_sorted_chunks(lengths: &[usize], token_budget: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut chunks: Vec<Vec<usize>> = Vec::new();
    for index in order {
        let fits = chunks.last().is_some_and(|chunk| {
            let widest = lengths[chunk[0]];
            (chunk.len() + 1) * widest <= token_budget
        });
        match chunks.last_mut() {
            Some(chunk) if fits => chunk.push(index),
            _ => chunks.push(vec![index]),
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_on_the_right() {
        let batch = TokenBatch::right_padded(&[&[1, 2, 3], &[4]], 0, &Device::Cpu).unwrap();
        assert_eq!(batch.ids.to_vec2::<u32>().unwrap(), vec![vec![1, 2, 3], vec![4, 0, 0]]);
        assert_eq!(batch.lengths, vec![3, 1]);
    }

    #[test]
    fn chunks_cover_every_index_once_within_budget() {
        let lengths = [5, 30, 7, 7, 12, 1, 30];
        let chunks = length_sorted_chunks(&lengths, 40);
        let mut seen: Vec<usize> = chunks.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        for chunk in &chunks {
            let widest = chunk.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(chunk.len() == 1 || chunk.len() * widest <= 40, "{chunk:?}");
        }
    }
}

//! Running independent pieces of work on candle's CPU worker pool.
//!
//! The CPU kernels of the fast path (attention, decoding attention, the SwiGLU product, matrix products with a weight)
//! split their output into one piece per thread. Spawning threads for every call costs more than the work on the
//! short inputs of editing (tens of rows), and on a virtual machine waking a sleeping thread is slow too; candle's
//! [`barrier_pool`] keeps its workers spinning between calls, so a hand-off costs microseconds. The calling thread
//! takes a share of the work itself.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::utils::barrier_pool;

/// How many threads work on a call: the pool's workers plus the caller.
pub fn threads() -> usize {
    barrier_pool().n_workers() + 1
}

/// Runs `task` on every item over [`threads`] threads, each taking the next item not yet taken (so items of unequal
/// cost, such as attention blocks late in a long document, do not leave a thread idle); returns when all are done.
/// Which thread runs an item never changes what the item computes.
pub fn for_each_item<T: Send>(items: Vec<T>, task: impl Fn(T) + Sync) {
    match items.len() {
        0 => {}
        1 => items.into_iter().for_each(task),
        _ => {
            let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|item| Mutex::new(Some(item))).collect();
            let next = AtomicUsize::new(0);
            barrier_pool().execute(|_thread| {
                while let Some(slot) = slots.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let item = slot.lock().ok().and_then(|mut slot| slot.take());
                    if let Some(item) = item {
                        task(item);
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_runs_exactly_once() {
        for count in [0, 1, 2, 3, 17] {
            let seen: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            for_each_item((0..count).collect(), |i: usize| {
                seen[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1), "{count} items");
        }
    }

    #[test]
    fn items_can_carry_disjoint_mutable_slices() {
        let mut out = vec![0usize; 10];
        let pieces: Vec<(usize, &mut [usize])> = out.chunks_mut(3).enumerate().collect();
        for_each_item(pieces, |(index, piece)| piece.iter_mut().for_each(|v| *v = index + 1));
        assert_eq!(out, vec![1, 1, 1, 2, 2, 2, 3, 3, 3, 4]);
    }
}

//! Delta debugging (Zeller and Hildebrandt 2002, "ddmin"): a 1-minimal failing subsequence of a failing input.
//!
//! Given a list whose run fails and a test that runs any subsequence (order kept), ddmin splits the list into `n`
//! chunks and tries each chunk, then each complement; the first that still fails becomes the list (granularity back
//! to 2 after a chunk, `n − 1` after a complement); when none fails the granularity doubles, until the chunks are
//! single elements. The result fails, and removing any one element from it makes it pass. Every subsequence is
//! tested at most once (results are remembered), and the number of tests run is reported.

use std::collections::HashMap;

/// The outcome of a minimisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minimised {
    /// Indices into the input of the minimal failing subsequence, ascending.
    pub indices: Vec<usize>,
    /// Tests run (distinct subsequences).
    pub tests: usize,
}

/// Minimises `0..len` under `fails` (which must hold for the whole list; the caller checks that first, and it is
/// not re-run). `fails` receives ascending indices. Errors from `fails` stop the search.
pub fn ddmin<E>(len: usize, fails: &mut dyn FnMut(&[usize]) -> Result<bool, E>) -> Result<Minimised, E> {
    let mut seen: HashMap<Vec<usize>, bool> = HashMap::new();
    let mut current: Vec<usize> = (0..len).collect();
    seen.insert(current.clone(), true);
    let mut test = |subset: &[usize], seen: &mut HashMap<Vec<usize>, bool>| -> Result<bool, E> {
        if let Some(&known) = seen.get(subset) {
            return Ok(known);
        }
        let outcome = fails(subset)?;
        seen.insert(subset.to_vec(), outcome);
        Ok(outcome)
    };
    let mut n = 2usize;
    while current.len() >= 2 {
        let chunks = split(&current, n);
        let mut reduced = false;
        for chunk in &chunks {
            if test(chunk, &mut seen)? {
                current = chunk.clone();
                n = 2;
                reduced = true;
                break;
            }
        }
        if !reduced && chunks.len() > 2 {
            for i in 0..chunks.len() {
                let complement: Vec<usize> =
                    chunks.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, c)| c.iter().copied()).collect();
                if test(&complement, &mut seen)? {
                    current = complement;
                    n = (n - 1).max(2);
                    reduced = true;
                    break;
                }
            }
        }
        if !reduced {
            if n >= current.len() {
                break;
            }
            n = (2 * n).min(current.len());
        }
    }
    // The whole input was given as failing without a test; everything else was tested.
    let tests = seen.len() - 1;
    Ok(Minimised { indices: current, tests })
}

/// `items` in `n` contiguous chunks of near-equal size (the first ones one longer).
fn split(items: &[usize], n: usize) -> Vec<Vec<usize>> {
    let n = n.min(items.len()).max(1);
    let (size, extra) = (items.len() / n, items.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for i in 0..n {
        let end = start + size + usize::from(i < extra);
        out.push(items[start..end].to_vec());
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimise(len: usize, fails: impl Fn(&[usize]) -> bool) -> Minimised {
        ddmin::<()>(len, &mut |s| Ok(fails(s))).unwrap()
    }

    #[test]
    fn a_single_culprit_is_found() {
        let result = minimise(50, |s| s.contains(&37));
        assert_eq!(result.indices, vec![37]);
        assert!(result.tests <= 20, "{} tests", result.tests);
    }

    #[test]
    fn an_interaction_keeps_both_parts_in_order() {
        // Fails only when 3 comes before 41 (both present; order is kept by construction).
        let result = minimise(50, |s| s.contains(&3) && s.contains(&41));
        assert_eq!(result.indices, vec![3, 41]);
    }

    #[test]
    fn the_result_is_one_minimal() {
        // Fails when at least three of the even indices below 20 are present.
        let fails = |s: &[usize]| s.iter().filter(|&&i| i < 20 && i % 2 == 0).count() >= 3;
        let result = minimise(30, fails);
        assert!(fails(&result.indices));
        assert_eq!(result.indices.len(), 3);
        for skip in 0..result.indices.len() {
            let mut fewer = result.indices.clone();
            fewer.remove(skip);
            assert!(!fails(&fewer));
        }
    }

    #[test]
    fn errors_stop_the_search_and_single_inputs_need_no_test() {
        assert_eq!(ddmin::<&str>(4, &mut |_| Err("boom")), Err("boom"));
        assert_eq!(minimise(1, |_| true), Minimised { indices: vec![0], tests: 0 });
    }
}

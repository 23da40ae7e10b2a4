//! Scoring generated text against references: the normalisations and overlap measures the generation tasks use.
//!
//! - SQuAD (Rajpurkar et al.): lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace;
//!   F1 of the bags of words, the best over the references; an unanswerable question has the empty answer as its
//!   only reference, so it scores 1 exactly when the model answers nothing.
//! - NQ-open, lm-evaluation-harness's `exact_match`: remove the article pattern `\b(?:The |the |An |A |a |an )`,
//!   lowercase, drop punctuation, then compare whole strings (any reference may match).
//! - GSM8K strict match: the first `#### <number>` of the generation against the reference's, both with `,`, `$` and a
//!   trailing `.` removed.
//! - ROUGE-1/2/L F-scores (Lin 2004) on lowercased alphanumeric words; ROUGE-L from the longest common subsequence.
//! - Entity lists: the first line of the generation split on `,`/`;`, compared as case-insensitive sets.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use regex::Regex;

static SQUAD_ARTICLES: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\b(a|an|the)\b").expect("valid pattern"));
static LM_EVAL_ARTICLES: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(?:The |the |An |A |The |a |an )").expect("valid pattern"));
static GSM8K_STRICT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"#### (-?[0-9.,]+)").expect("valid pattern"));

fn drop_punctuation(text: &str) -> String {
    text.chars().filter(|c| !c.is_ascii_punctuation()).collect()
}

/// SQuAD's answer normalisation.
pub fn squad_normalize(text: &str) -> String {
    let text = drop_punctuation(&text.to_lowercase());
    let text = SQUAD_ARTICLES.replace_all(&text, " ");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// SQuAD F1 of one prediction against one reference.
pub fn squad_f1(prediction: &str, reference: &str) -> f64 {
    let predicted = squad_normalize(prediction);
    let gold = squad_normalize(reference);
    let predicted: Vec<&str> = predicted.split_whitespace().collect();
    let gold: Vec<&str> = gold.split_whitespace().collect();
    if predicted.is_empty() || gold.is_empty() {
        return f64::from(u8::from(predicted == gold));
    }
    let common = bag_overlap(&predicted, &gold);
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / predicted.len() as f64;
    let recall = common as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// The best SQuAD F1 over `references`; no reference means unanswerable (the empty answer is right).
pub fn squad_best_f1(prediction: &str, references: &[String]) -> f64 {
    if references.is_empty() {
        return squad_f1(prediction, "");
    }
    references.iter().map(|r| squad_f1(prediction, r)).fold(0.0, f64::max)
}

fn lm_eval_normalize(text: &str) -> String {
    drop_punctuation(&LM_EVAL_ARTICLES.replace_all(text, "").to_lowercase())
}

/// lm-evaluation-harness's exact match of a (left-stripped) prediction against any reference.
pub fn lm_eval_exact_match(prediction: &str, references: &[String]) -> bool {
    let predicted = lm_eval_normalize(prediction.trim_start());
    references.iter().any(|r| lm_eval_normalize(r) == predicted)
}

fn clean_number(text: &str) -> String {
    let text: String = text.chars().filter(|c| *c != ',' && *c != '$').collect();
    text.trim().trim_end_matches('.').to_string()
}

/// The number after the first `####` of a GSM8K solution, cleaned; `None` when there is none.
pub fn gsm8k_answer(solution: &str) -> Option<String> {
    GSM8K_STRICT.captures(solution).map(|c| clean_number(&c[1])).filter(|n| !n.is_empty())
}

fn words(text: &str) -> Vec<String> {
    text.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(String::from).collect()
}

fn bag_overlap<T: std::hash::Hash + Eq>(a: &[T], b: &[T]) -> usize {
    let mut counts: HashMap<&T, usize> = HashMap::new();
    for x in b {
        *counts.entry(x).or_default() += 1;
    }
    a.iter()
        .filter(|x| match counts.get_mut(x) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .count()
}

fn f_score(overlap: usize, candidate: usize, reference: usize) -> f64 {
    if overlap == 0 || candidate == 0 || reference == 0 {
        return 0.0;
    }
    let (p, r) = (overlap as f64 / candidate as f64, overlap as f64 / reference as f64);
    2.0 * p * r / (p + r)
}

fn ngrams(words: &[String], n: usize) -> Vec<&[String]> {
    if words.len() < n { Vec::new() } else { words.windows(n).collect() }
}

fn longest_common_subsequence(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diagonal = 0;
        for (j, y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y { diagonal + 1 } else { row[j + 1].max(row[j]) };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// ROUGE-1, ROUGE-2 and ROUGE-L F-scores of a candidate summary against a reference.
pub fn rouge_f_scores(candidate: &str, reference: &str) -> [f64; 3] {
    let (c, r) = (words(candidate), words(reference));
    let n_gram_f = |n: usize| {
        let (cn, rn) = (ngrams(&c, n), ngrams(&r, n));
        f_score(bag_overlap(&cn, &rn), cn.len(), rn.len())
    };
    [n_gram_f(1), n_gram_f(2), f_score(longest_common_subsequence(&c, &r), c.len(), r.len())]
}

/// The mean of ROUGE-1/2/L F (Gu et al.'s SAMSum score).
pub fn rouge_mean(candidate: &str, reference: &str) -> f64 {
    rouge_f_scores(candidate, reference).iter().sum::<f64>() / 3.0
}

/// The entities a generation lists: its first line split on `,` and `;`, trimmed, without "none"-like answers.
pub fn listed_entities(generated: &str) -> Vec<String> {
    let first_line = generated.trim_start().lines().next().unwrap_or("");
    let mut seen = HashSet::new();
    first_line
        .split([',', ';'])
        .map(|e| e.split_whitespace().collect::<Vec<_>>().join(" "))
        .map(|e| e.trim_matches(|c: char| c == '.' || c == '"' || c == '\'').to_string())
        .filter(|e| !e.is_empty() && !matches!(e.to_lowercase().as_str(), "none" | "n/a" | "no entity"))
        .filter(|e| seen.insert(e.to_lowercase()))
        .collect()
}

/// True positives, false positives and false negatives of predicted against gold entities (case-insensitive sets).
pub fn entity_counts(predicted: &[String], gold: &[String]) -> [usize; 3] {
    let predicted: HashSet<String> = predicted.iter().map(|e| e.to_lowercase()).collect();
    let gold: HashSet<String> = gold.iter().map(|e| e.to_lowercase()).collect();
    let hits = predicted.intersection(&gold).count();
    [hits, predicted.len() - hits, gold.len() - hits]
}

/// Micro-averaged F1 from summed counts.
pub fn micro_f1([hits, false_positives, misses]: [usize; 3]) -> f64 {
    f_score(hits, hits + false_positives, hits + misses)
}

/// The first word of a generation, lowercased, without punctuation (Gu et al.'s label answers).
pub fn first_word(generated: &str) -> String {
    generated.split_whitespace().next().map(|w| drop_punctuation(w).to_lowercase()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squad_f1_follows_the_official_normalisation() {
        assert_eq!(squad_normalize("The  Eiffel Tower!"), "eiffel tower");
        assert!((squad_f1("the Eiffel tower in Paris", "Eiffel Tower") - 2.0 * 0.5 * 1.0 / 1.5).abs() < 1e-12);
        assert_eq!(squad_best_f1("", &[]), 1.0);
        assert_eq!(squad_best_f1("Paris", &[]), 0.0);
        assert_eq!(squad_best_f1("", &["Paris".to_string()]), 0.0);
        assert_eq!(squad_best_f1("paris.", &["London".into(), "Paris".into()]), 1.0);
    }

    #[test]
    fn lm_eval_exact_match_ignores_articles_case_and_punctuation() {
        let refs = vec!["The Beatles".to_string(), "Beatles".to_string()];
        assert!(lm_eval_exact_match(" the beatles", &refs));
        assert!(lm_eval_exact_match("Beatles!", &refs));
        assert!(!lm_eval_exact_match("the Rolling Stones", &refs));
        assert!(lm_eval_exact_match("14 December 1972", &["14 December 1972".into()]));
    }

    #[test]
    fn gsm8k_takes_the_first_marked_number() {
        assert_eq!(gsm8k_answer("so 9 * 2 = 18\n#### 1,018.").as_deref(), Some("1018"));
        assert_eq!(gsm8k_answer("#### -3 and #### 4").as_deref(), Some("-3"));
        assert_eq!(gsm8k_answer("The answer is 18."), None);
    }

    #[test]
    fn rouge_matches_hand_counts() {
        let [r1, r2, rl] = rouge_f_scores("the cat sat on the mat", "the cat lay on the mat");
        assert!((r1 - 5.0 / 6.0).abs() < 1e-12);
        assert!((r2 - 3.0 / 5.0).abs() < 1e-12);
        assert!((rl - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(rouge_mean("", "a summary"), 0.0);
    }

    #[test]
    fn entities_are_compared_as_sets() {
        let listed = listed_entities(" Japan, China; japan.\nIgnored, Line");
        assert_eq!(listed, vec!["Japan".to_string(), "China".to_string()]);
        assert_eq!(entity_counts(&listed, &["CHINA".into(), "Syria".into()]), [1, 1, 1]);
        assert!((micro_f1([1, 1, 1]) - 0.5).abs() < 1e-12);
        assert_eq!(listed_entities(" None"), Vec::<String>::new());
        assert_eq!(first_word(" Positive."), "positive");
    }
}

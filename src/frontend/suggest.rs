//! "did you mean ...?" by edit distance.

/// The known word closest to `word`, if it is close enough to be a likely typo: at most a third
/// of its letters changed (at least one), or the same word in another case.
pub fn did_you_mean<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|candidate| {
            let distance = if candidate.eq_ignore_ascii_case(word) { 0 } else { edit_distance(word, candidate) };
            (distance, *candidate)
        })
        .filter(|(distance, candidate)| *distance <= (candidate.chars().count() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance (insertions, deletions, substitutions), over chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // Words longer than any key cannot be typos of one; skip the quadratic work on hostile input.
    if a.len() > 64 || b.len() > 64 {
        return usize::MAX;
    }
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, char_a) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, char_b) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(char_a != *char_b);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_words_only() {
        assert_eq!(edit_distance("causl", "causal"), 1);
        assert_eq!(did_you_mean("kv_head", &["kv_heads", "head_dim"]), Some("kv_heads"));
        assert_eq!(did_you_mean("Causal", &["none", "causal"]), Some("causal"));
        assert!(did_you_mean("fp16", &["bf16", "f16"]).is_some());
        assert_eq!(did_you_mean("banana", &["model_dim", "head_dim"]), None);
    }
}

//! "did you mean ...?" by edit distance.

/// The known word closest to `word`, if it is close enough to be a likely typo: at most a third
/// of its letters changed (at least one), or the same word in another case.
pub fn did_you_mean<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|candidate| {
            let distance = if candidate.eq_ignore_ascii_case(word) {
                0
            } else {
                edit_distance(word, candidate)
            };
            (distance, *candidate)
        })
        .filter(|(distance, candidate)| *distance <= (candidate.chars().count() / 3).max(1))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Edit distance counting insertions, deletions, substitutions and swaps of two adjacent
/// characters (`widht` → `width` is one edit), over chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Words longer than any key cannot be typos of one; skip the quadratic work on hostile input.
    if a.len() > 64 || b.len() > 64 {
        return usize::MAX;
    }
    // distance[i][j]: between the first i chars of a and the first j chars of b.
    let mut distance = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in distance.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in distance[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitution = distance[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            let mut best = substitution.min(distance[i - 1][j] + 1).min(distance[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(distance[i - 2][j - 2] + 1);
            }
            distance[i][j] = best;
        }
    }
    distance[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_words_only() {
        assert_eq!(edit_distance("causl", "causal"), 1);
        assert_eq!(edit_distance("widht", "width"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(did_you_mean("kv_head", &["kv_heads", "head_dim"]), Some("kv_heads"));
        assert_eq!(did_you_mean("Causal", &["none", "causal"]), Some("causal"));
        assert!(did_you_mean("fp16", &["bf16", "f16"]).is_some());
        assert_eq!(did_you_mean("banana", &["model_dim", "head_dim"]), None);
    }
}

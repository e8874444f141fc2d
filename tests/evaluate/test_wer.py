"""Corpus WER and CER against examples counted by hand (substitution, deletion, insertion, empty reference,
empty hypothesis, sums over a corpus). CER counts the space between words as a character."""

import pytest

from asrshrink.evaluate.wer import char_errors, word_errors


@pytest.mark.parametrize("refs, hyps, s, d, i, n", [
    (["the cat sat"], ["the cat sat"], 0, 0, 0, 3),            # exact
    (["the cat sat"], ["the bat sat"], 1, 0, 0, 3),            # cat -> bat
    (["the cat sat"], ["the sat"], 0, 1, 0, 3),                # cat deleted
    (["the cat sat"], ["the cat sat down"], 0, 0, 1, 3),       # down inserted
    (["a b c"], [""], 0, 3, 0, 3),                             # empty hypothesis: every word deleted
    ([""], ["a b"], 0, 0, 2, 0),                               # empty reference: every word inserted
    (["a b", "c d e"], ["a x", "c e"], 1, 1, 0, 5),            # corpus sums: b -> x, d deleted
    (["one two three four"], ["two three four five"], 0, 1, 1, 4),  # one deleted, five inserted (not 4 subs)
])
def test_word_errors_by_hand(refs, hyps, s, d, i, n):
    counts = word_errors(refs, hyps)
    assert (counts.substitutions, counts.deletions, counts.insertions, counts.reference_units) == (s, d, i, n)
    if n:
        assert counts.rate == pytest.approx(100 * (s + d + i) / n)


@pytest.mark.parametrize("refs, hyps, s, d, i, n", [
    (["abc"], ["abd"], 1, 0, 0, 3),
    (["a b"], ["a c"], 1, 0, 0, 3),                            # the space is a character
    (["a b", "c d e"], ["a x", "c e"], 1, 2, 0, 8),            # b -> x; "d" and one space deleted
    (["hi"], ["hi there you"], 0, 0, 10, 2),                   # " there you" inserted
    (["ab"], [""], 0, 2, 0, 2),
])
def test_char_errors_by_hand(refs, hyps, s, d, i, n):
    counts = char_errors(refs, hyps)
    assert (counts.substitutions, counts.deletions, counts.insertions, counts.reference_units) == (s, d, i, n)
    assert counts.rate == pytest.approx(100 * (s + d + i) / n)


def test_corpus_rate_is_total_errors_over_total_words_not_a_mean_of_rates():
    counts = word_errors(["a", "b c d e f g h i j"], ["x", "b c d e f g h i j"])
    assert counts.rate == pytest.approx(10.0)  # 1 error in 10 words; the mean of utterance rates would be 50


def test_no_utterances():
    assert word_errors([], []).errors == 0 and word_errors([], []).rate == 0.0

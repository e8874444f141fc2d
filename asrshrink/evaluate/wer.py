"""Corpus word and character error rates (word-level Levenshtein over all utterances, as MLPerf scores)."""

from __future__ import annotations

from dataclasses import dataclass

import jiwer


@dataclass(frozen=True)
class ErrorCounts:
    """Edit counts summed over a corpus; ``rate`` is errors / reference units, in percent."""

    substitutions: int
    deletions: int
    insertions: int
    reference_units: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        return 100.0 * self.errors / max(self.reference_units, 1)


def word_errors(references: list[str], hypotheses: list[str]) -> ErrorCounts:
    """Corpus word errors. References must be non-empty; empty hypotheses count as deletions."""
    return _errors(jiwer.process_words, references, hypotheses)


def char_errors(references: list[str], hypotheses: list[str]) -> ErrorCounts:
    return _errors(jiwer.process_characters, references, hypotheses)


def _errors(process, references: list[str], hypotheses: list[str]) -> ErrorCounts:
    if not references:
        return ErrorCounts(0, 0, 0, 0)
    out = process(references, hypotheses)
    return ErrorCounts(out.substitutions, out.deletions, out.insertions,
                       out.hits + out.substitutions + out.deletions)

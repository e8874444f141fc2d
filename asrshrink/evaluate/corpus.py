"""Corpus evaluation: decode every utterance of a dataset in length-sorted batches (greedy, or the best
hypothesis of a beam search) and score WER/CER.

No Typer or rich here: long work reports through an optional ``progress(done, total)`` callback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from asrshrink.audio.datasets import Dataset, batches_by_duration
from asrshrink.errors import DataError
from asrshrink.evaluate.transcribe import transcribe
from asrshrink.evaluate.wer import char_errors, word_errors
from asrshrink.models.base import Transducer

Progress = Callable[[int, int], None]


@dataclass
class EvalResult:
    """Corpus figures of one evaluation; ``hypotheses`` holds one dict per utterance in dataset order."""

    wer: float
    cer: float
    num_utterances: int
    num_words: int
    word_errors: dict[str, int]
    seconds: float
    audio_seconds: float
    hypotheses: list[dict] = field(default_factory=list)
    beam: int | None = None  # the beam width, None for greedy decoding

    @property
    def search(self) -> str:
        """The decoding that produced the hypotheses: "greedy" or "beam"."""
        return "greedy" if self.beam is None else "beam"

    @property
    def speed(self) -> float:
        """Audio seconds decoded per wall second (featurize + encode + decode)."""
        return self.audio_seconds / max(self.seconds, 1e-9)

    def to_json(self, *, with_hypotheses: bool = False) -> dict:
        data = {"wer": self.wer, "cer": self.cer, "num_utterances": self.num_utterances,
                "num_words": self.num_words, "word_errors": self.word_errors, "seconds": self.seconds,
                "audio_seconds": self.audio_seconds, "speed": self.speed,
                "search": self.search, "beam": self.beam}
        if with_hypotheses:
            data["hypotheses"] = self.hypotheses
        return data


def evaluate(model: Transducer, dataset: Dataset, *, max_batch: int = 32, max_seconds: float = 240.0,
             progress: Progress | None = None, beam: int | None = None) -> EvalResult:
    """Decode every utterance of ``dataset`` and score corpus WER/CER against its transcripts: greedy, or with
    ``beam`` N the best hypothesis of a width-N beam search (each row then also has its ``score``)."""
    if len(dataset) == 0:
        raise DataError(f"{dataset.source}: the dataset is empty")
    start = time.perf_counter()
    results: list[dict | None] = [None] * len(dataset)
    audio_seconds = 0.0
    done = 0
    for batch in batches_by_duration(dataset.durations(), max_seconds=max_seconds, max_batch=max_batch):
        utterances = [dataset[i] for i in batch]
        try:
            hyps = transcribe(model, [u.audio for u in utterances], beam=beam)
        except DataError as exc:
            bad = min(utterances, key=lambda u: len(u.audio))
            raise DataError(f"{dataset.entries[batch[utterances.index(bad)]].audio_path}: {exc}") from None
        for i, u, h in zip(batch, utterances, hyps):
            if beam is not None:
                h = h[0]
            results[i] = {"id": u.id, "reference": u.text, "hypothesis": h.text, "duration": u.duration}
            if beam is not None:
                results[i]["score"] = h.score
            audio_seconds += u.duration
        done += len(batch)
        if progress:
            progress(done, len(dataset))
    rows = [r for r in results if r is not None]
    refs = [r["reference"] for r in rows]
    hyps_text = [r["hypothesis"] for r in rows]
    words = word_errors(refs, hyps_text)
    chars = char_errors(refs, hyps_text)
    return EvalResult(
        wer=words.rate, cer=chars.rate, num_utterances=len(rows), num_words=words.reference_units,
        word_errors={"substitutions": words.substitutions, "deletions": words.deletions,
                     "insertions": words.insertions},
        seconds=time.perf_counter() - start, audio_seconds=audio_seconds, hypotheses=rows, beam=beam)


#: The group of utterances that lack a field ``wer_by`` groups by.
NO_VALUE = "(none)"


def field_names(dataset: Dataset) -> list[str]:
    """The names ``wer_by`` can group ``dataset`` by (its entries' ``fields``), in first-seen order."""
    return list(dict.fromkeys(name for entry in dataset.entries for name, _ in entry.fields))


def check_fields(dataset: Dataset, names: list[str]) -> None:
    """A DataError naming the fields there are, unless some utterance of ``dataset`` has each of ``names``."""
    have = field_names(dataset)
    for name in names:
        if name not in have:
            listed = ", ".join(have) if have else f"none ({dataset.kind} entries carry no fields)"
            raise DataError(f"{dataset.source}: no utterance has a field {name!r} to group WER by; the fields "
                            f"are: {listed}")


def group_word_errors(rows: list[dict], value_of: Callable[[dict], str]) -> dict[str, dict]:
    """Corpus WER per group of ``rows`` (``EvalResult.hypotheses``-style dicts with ``reference`` and
    ``hypothesis``), the group of a row being ``value_of(row)``: ``{value: {"utterances", "words", "wer",
    "substitutions", "deletions", "insertions"}}``, values sorted."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for row in rows:
        refs, hyps = groups.setdefault(value_of(row), ([], []))
        refs.append(row["reference"])
        hyps.append(row["hypothesis"])
    out: dict[str, dict] = {}
    for value in sorted(groups):
        counts = word_errors(*groups[value])
        out[value] = {"utterances": len(groups[value][0]), "words": counts.reference_units, "wer": counts.rate,
                      "substitutions": counts.substitutions, "deletions": counts.deletions,
                      "insertions": counts.insertions}
    return out


def wer_by(rows: list[dict], dataset: Dataset, names: list[str]) -> dict[str, dict[str, dict]]:
    """Corpus WER of evaluated ``rows`` (``EvalResult.hypotheses`` of ``dataset``) grouped by each field in
    ``names`` (a synthesizer, a voice, a LibriSpeech speaker): ``{name: group_word_errors(...)}``; utterances
    without the field form the group ``NO_VALUE``. A name no utterance has is a DataError listing the names."""
    check_fields(dataset, names)
    fields = {entry.id: dict(entry.fields) for entry in dataset.entries}
    return {name: group_word_errors(rows, lambda row, name=name: fields[row["id"]].get(name, NO_VALUE))
            for name in names}

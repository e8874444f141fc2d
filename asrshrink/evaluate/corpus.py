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

"""Running a model on waveforms: features, encoder output, transcripts (greedy, or the N-best of a beam search),
and per-file dumps of features, encoder output and greedy tokens.

No Typer or rich here, and no dataset handling: callers pass waveforms (or audio paths, for ``dump``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from asrshrink.audio.datasets import read_audio
from asrshrink.errors import DataError
from asrshrink.evaluate.beam import beam_search
from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.models.base import Transducer


@dataclass(frozen=True)
class Hypothesis:
    """A transcript: label ids and text; from a beam search also ``score`` (natural log-probability) and
    ``normalised`` (softmax over the utterance's N-best), as ``asrshrink.evaluate.beam.beam_search`` defines
    them; None from greedy decoding."""

    tokens: list[int]
    text: str
    score: float | None = None
    normalised: float | None = None


def featurize(model: Transducer, waveforms: Sequence[np.ndarray | torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveforms (each (N_i,) float at the model's sample rate) -> features (B, T, F) and lengths (B,)."""
    lengths = torch.tensor([len(w) for w in waveforms], dtype=torch.int64)
    batch = torch.zeros(len(waveforms), int(lengths.max()) if len(waveforms) else 0)
    for i, w in enumerate(waveforms):
        batch[i, :len(w)] = torch.as_tensor(np.asarray(w, dtype=np.float32))
    with torch.no_grad():
        return model.featurizer(batch, lengths)


def encode(model: Transducer, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """features (B, T, F), lengths (B,) -> encoder output (B, T', D), lengths (B,)."""
    with torch.no_grad():
        return model.encode(features, lengths)


def transcribe(model: Transducer, waveforms: Sequence[np.ndarray], *, max_symbols_per_step: int | None = None,
               beam: int | None = None) -> list[Hypothesis] | list[list[Hypothesis]]:
    """Transcripts of a batch of waveforms: with ``beam`` None, greedy, one ``Hypothesis`` per waveform; with
    ``beam`` N, per waveform its N-best list (at most N hypotheses, best first, with scores)."""
    features, lengths = featurize(model, waveforms)
    enc, enc_lengths = encode(model, features, lengths)
    if beam is None:
        tokens = greedy_decode(model, enc, enc_lengths, max_symbols_per_step)
        return [Hypothesis(t, model.vocabulary.decode(t)) for t in tokens]
    nbest = beam_search(model, enc, enc_lengths, beam, max_symbols_per_step)
    return [[Hypothesis(h.tokens, model.vocabulary.decode(h.tokens), h.score, h.normalised) for h in hyps]
            for hyps in nbest]


def dump(model: Transducer, audio_paths: Iterable[str | Path]) -> dict[str, np.ndarray]:
    """For each audio file: ``{stem}.features`` (L, F), ``{stem}.encoder`` (T', D), ``{stem}.tokens`` (n,)."""
    out: dict[str, np.ndarray] = {}
    rate = model.feature_config.sample_rate
    for path in audio_paths:
        path = Path(path)
        stem = path.stem
        if f"{stem}.features" in out:
            raise DataError(f"{path}: two inputs share the file stem {stem!r}; rename one of them")
        try:
            features, lengths = featurize(model, [read_audio(path, rate)])
        except DataError as exc:
            message = str(exc)
            raise DataError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        enc, enc_lengths = encode(model, features, lengths)
        tokens = greedy_decode(model, enc, enc_lengths)[0]
        out[f"{stem}.features"] = features[0, :int(lengths[0])].numpy()
        out[f"{stem}.encoder"] = enc[0, :int(enc_lengths[0])].numpy()
        out[f"{stem}.tokens"] = np.asarray(tokens, dtype=np.int64)
    return out

"""Running a model on waveforms: features, encoder output, greedy transcripts, and per-file dumps of all three.

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
from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.models.base import Transducer


@dataclass(frozen=True)
class Hypothesis:
    tokens: list[int]
    text: str


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


def transcribe(model: Transducer, waveforms: Sequence[np.ndarray], *,
               max_symbols_per_step: int | None = None) -> list[Hypothesis]:
    """Greedy transcripts of a batch of waveforms."""
    features, lengths = featurize(model, waveforms)
    enc, enc_lengths = encode(model, features, lengths)
    tokens = greedy_decode(model, enc, enc_lengths, max_symbols_per_step)
    return [Hypothesis(t, model.vocabulary.decode(t)) for t in tokens]


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

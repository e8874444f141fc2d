"""Calibration: featurized calibration batches (``calibration_batches``), streaming statistics
(``calibrate.stats``) and the block-by-block walk that runs an original and a compressed model side by side
so a method can solve one matrix at a time (``calibrate.walk``).

Dimension letters: T frames, B batch, D features, N valid rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from asrshrink.audio.datasets import Dataset, batches_by_duration
from asrshrink.calibrate.walk import Capture, Solution, Solver, shift, valid_rows, walk, walked
from asrshrink.errors import DataError
from asrshrink.evaluate.transcribe import featurize
from asrshrink.models.base import Transducer

__all__ = ["Activations", "Capture", "Solution", "Solver", "calibration_batches", "shift", "valid_rows", "walk",
           "walked"]

Activations = list[tuple[torch.Tensor, torch.Tensor]]  # per calibration batch: (x (T, B, D), lengths (B,))


def calibration_batches(model: Transducer, dataset: Dataset, *, batch_size: int = 32,
                        progress: Callable[[int, int], None] | None = None,
                        shard: tuple[int, int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Featurize ``dataset`` into length-sorted batches: features (B, T, F), feature_lengths, labels (B, U),
    label_lengths. Features are computed once and reused by every iteration of a method. Durations come from
    the manifest or the audio files' headers (no audio is decoded twice). ``shard`` = (rank, world): this
    process's share of the utterances (every world-th by length, from rank) under torch.distributed."""
    durations = dataset.durations()
    batches = []
    done = 0
    mine = list(range(len(durations)))
    if shard is not None:  # every world-th utterance by length, from rank: shards of alike lengths and sizes
        mine = sorted(mine, key=lambda i: (-durations[i], i))[shard[0]::shard[1]]
    groups = [[mine[k] for k in group] for group in
              batches_by_duration([durations[i] for i in mine], max_seconds=float("inf"), max_batch=batch_size)]
    total = sum(len(g) for g in groups)
    for group in groups:
        utterances = []
        for i in group:
            utterances.append(dataset[i])
        try:
            features, lengths = featurize(model, [u.audio for u in utterances])
        except DataError as exc:
            shortest = min(range(len(group)), key=lambda k: len(utterances[k].audio))
            raise DataError(f"{dataset.entries[group[shortest]].audio_path}: {exc}") from None
        labels = [model.vocabulary.encode(u.text) for u in utterances]
        label_lengths = torch.tensor([len(x) for x in labels])
        padded = torch.zeros(len(labels), max(1, int(label_lengths.max())), dtype=torch.long)
        for row, ids in enumerate(labels):
            padded[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        batches.append({"features": features, "feature_lengths": lengths, "labels": padded,
                        "label_lengths": label_lengths})
        done += len(group)
        if progress:
            progress(done, total)
    return batches

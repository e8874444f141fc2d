"""Training data: featurized utterances cached on disk, and length-bucketed, seed-determined batches."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from asrshrink.audio.datasets import Dataset
from asrshrink.audio.features import Featurizer
from asrshrink.audio.text import Vocabulary
from asrshrink.errors import DataError
from asrshrink.io import atomic_write, write_json_atomic


@dataclass
class FeatureBank:
    """Features of many utterances in one float16 array (total frames, F), with per-utterance offsets."""

    features: np.ndarray      # (sum L_i, F) float16 (a memory map when loaded from disk)
    offsets: np.ndarray       # (N + 1,) int64
    labels: list[list[int]]   # label ids per utterance
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Padded batch: features (B, T, F) float32, feature_lengths (B,), labels (B, U), label_lengths (B,),
        index (B,) the utterances' positions in the bank."""
        lengths = [int(self.offsets[i + 1] - self.offsets[i]) for i in indices]
        dim = self.features.shape[1]
        feats = torch.zeros(len(indices), max(lengths), dim)
        for row, i in enumerate(indices):
            feats[row, :lengths[row]] = torch.from_numpy(
                np.asarray(self.features[self.offsets[i]:self.offsets[i + 1]], dtype=np.float32))
        label_lengths = [len(self.labels[i]) for i in indices]
        labels = torch.zeros(len(indices), max(max(label_lengths), 1), dtype=torch.long)
        for row, i in enumerate(indices):
            labels[row, :label_lengths[row]] = torch.tensor(self.labels[i], dtype=torch.long)
        return {"features": feats, "feature_lengths": torch.tensor(lengths), "labels": labels,
                "label_lengths": torch.tensor(label_lengths), "index": torch.tensor(indices, dtype=torch.long)}

    @classmethod
    def build(cls, dataset: Dataset, featurizer: Featurizer, vocabulary: Vocabulary, directory: str | Path,
              progress: Callable[[int, int], None] | None = None) -> "FeatureBank":
        """Featurize every utterance once and store the bank in ``directory`` (features.f16, index.json)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        chunks, offsets, labels, ids = [], [0], [], []
        for n, utt in enumerate(dataset):
            try:
                feats = featurizer.featurize_one(utt.audio).numpy().astype(np.float16)
            except DataError as exc:
                raise DataError(f"{dataset.entries[n].audio_path}: {exc}") from None
            chunks.append(feats)
            offsets.append(offsets[-1] + feats.shape[0])
            labels.append(vocabulary.encode(utt.text))
            ids.append(utt.id)
            if progress:
                progress(n + 1, len(dataset))
        features = np.concatenate(chunks) if chunks else np.zeros((0, featurizer.config.feature_dim), np.float16)
        atomic_write(directory / "features.f16", lambda tmp: features.tofile(tmp))
        write_json_atomic(directory / "index.json", {"shape": list(features.shape), "offsets": offsets,
                                                     "labels": labels, "ids": ids})
        return cls(features, np.asarray(offsets, dtype=np.int64), labels, ids)

    @classmethod
    def load(cls, directory: str | Path) -> "FeatureBank":
        directory = Path(directory)
        index = json.loads((directory / "index.json").read_text())
        features = np.memmap(directory / "features.f16", dtype=np.float16, mode="r", shape=tuple(index["shape"]))
        return cls(features, np.asarray(index["offsets"], dtype=np.int64), index["labels"], index["ids"])


class BucketSampler:
    """Batches of similar length, at most ``max_frames`` padded frames and ``max_batch`` utterances each.

    The batches of epoch e depend only on (seed, e), so a run resumed at (epoch, position) sees exactly the
    batches an uninterrupted run would.
    """

    def __init__(self, lengths: np.ndarray, *, max_frames: int, max_batch: int, seed: int):
        self.lengths = np.asarray(lengths)
        self.max_frames = max_frames
        self.max_batch = max_batch
        self.seed = seed

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        jitter = rng.random(len(self.lengths))  # shuffles utterances of equal length
        order = np.lexsort((jitter, self.lengths))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order.tolist():
            if current and (len(current) + 1 > self.max_batch
                            or int(self.lengths[i]) * (len(current) + 1) > self.max_frames):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        rng.shuffle(batches)
        return batches

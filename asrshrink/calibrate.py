"""Calibration: featurized calibration batches, and the block-by-block walk that runs an original and a
compressed model side by side so a method can refit one layer at a time.

Dimension letters: T frames, B batch, D features, N valid rows.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from asrshrink.audio.datasets import Dataset
from asrshrink.errors import DataError
from asrshrink.models.base import Transducer

Activations = list[tuple[torch.Tensor, torch.Tensor]]  # per calibration batch: (x (T, B, D), lengths (B,))


def shift(h: torch.Tensor) -> torch.Tensor:
    """Hidden states h_{t-1} for every t: (T, B, H) shifted by one step, zeros first."""
    return torch.cat([torch.zeros_like(h[:1]), h[:-1]], 0)


def valid_rows(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rows of (T, B, D) at valid frames -> (N, D)."""
    mask = torch.arange(x.shape[0]).unsqueeze(1) < lengths.unsqueeze(0)
    return x[mask]



def calibration_batches(model: Transducer, dataset: Dataset, *, batch_size: int = 32,
                        progress: Callable[[int, int], None] | None = None) -> list[dict[str, torch.Tensor]]:
    """Featurize ``dataset`` into length-sorted batches: features (B, T, F), feature_lengths, labels (B, U),
    label_lengths. Features are computed once and reused by every iteration of a method."""
    from asrshrink.api import batches_by_duration, featurize

    durations = [e.duration if e.duration is not None else 0.0 for e in dataset.entries]
    if any(e.duration is None for e in dataset.entries):
        durations = [dataset[i].duration for i in range(len(dataset))]
    batches = []
    done = 0
    for group in batches_by_duration(durations, max_seconds=float("inf"), max_batch=batch_size):
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
            progress(done, len(dataset))
    return batches


Visit = Callable[..., "nn.Module | tuple[nn.Module, list[torch.Tensor]] | None"]


@torch.no_grad()
def walk_layers(original: Transducer, compressed: Transducer, batches: list[dict[str, torch.Tensor]],
                components: tuple[str, ...], visit: Visit, *, skip: Callable[[int], bool] = lambda j: False
                ) -> None:
    """Run ``original`` and ``compressed`` block by block over calibration batches, side by side.

    At LSTM layer j, ``visit(original_layer, name, compressed_layer, original_inputs, compressed_inputs, j,
    original_outputs)`` may return a replacement for the compressed layer (optionally with its outputs on
    the compressed inputs, (T, B, H) per batch, to save recomputing them), which is swapped in before its
    outputs feed the next block. Only the current block's inputs and outputs are alive: each list is updated
    in place, batch by batch. Blocks are numbered across all components in order; ``skip(j)`` skips the
    visit of block j.
    """
    index = -1
    for component in components:
        orig_acts = [original.block_inputs(component, b) for b in batches]
        comp_acts = [compressed.block_inputs(component, b) for b in batches]
        for j in range(len(original.blocks(component))):
            index += 1
            o_block = original.blocks(component)[j]
            c_block = compressed.blocks(component)[j]
            orig_next = [o_block.run(x, n) for x, n in orig_acts]
            outputs = None
            if c_block.layer is not None and not skip(index):
                new = visit(o_block.layer, c_block.name, c_block.layer, orig_acts, comp_acts, index, orig_next)
                if isinstance(new, tuple):
                    new, outputs = new
                if new is not None:
                    compressed.set_submodule(c_block.name, new)
                    c_block = compressed.blocks(component)[j]
            orig_acts = orig_next
            del orig_next
            for i, (x, n) in enumerate(comp_acts):
                comp_acts[i] = (outputs[i], n) if outputs is not None else c_block.run(x, n)
                if outputs is not None:
                    outputs[i] = None  # hand the tensor over


def check_lstm_walk(model: Transducer, components: tuple[str, ...] | list[str], method: str) -> None:
    """Refuse a calibrated method on a component whose blocks hold layers other than LSTM layers (a Conformer
    encoder): the layer solvers here fit LSTM layers, and skipping the others would report a method that was
    not applied."""
    from asrshrink.errors import AsrshrinkError
    from asrshrink.models.layers import FactorizedLSTMLayer, LSTMLayer

    for component in components:
        try:
            blocks = model.blocks(component)
        except AsrshrinkError:
            continue  # not walked (the joint); the method's own checks say what it does there
        other = [b.name for b in blocks if b.layer is not None and not isinstance(b.layer, (LSTMLayer, FactorizedLSTMLayer))]
        if other:
            raise AsrshrinkError(
                f"{method} calibrates LSTM layers, and the {component} of this {model.family} model is made of "
                f"other layers ({other[0]}, ...), which it does not handle yet; use plain svd or prune --method "
                f"magnitude there, or --components prediction")

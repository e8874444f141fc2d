"""Greedy transducer decoding, batched with length masks, equal to batch-1 decoding utterance by utterance.

Dimension letters: B batch, T' encoder frames, D encoder size, J joint hidden size, V outputs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from asrshrink.models.base import Transducer



@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run tiny per-step ops on one thread: on a busy small CPU, thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def greedy_decode(model: Transducer, enc: torch.Tensor, enc_lengths: torch.Tensor,
                  max_symbols_per_step: int | None = None) -> list[list[int]]:
    """Greedy search: at each frame, emit the argmax label until blank (or ``max_symbols_per_step`` joint
    evaluations; None: the family's rule, ``model.max_symbols_per_step``), then move to the next frame. Ties go
    to the lowest id.

    enc (B, T', D), enc_lengths (B,) -> one list of label ids per utterance.
    """
    if max_symbols_per_step is None:
        max_symbols_per_step = model.max_symbols_per_step
    with single_thread():
        return _greedy(model, enc, enc_lengths, max_symbols_per_step)


def _greedy(model: Transducer, enc: torch.Tensor, enc_lengths: torch.Tensor, max_symbols_per_step: int
            ) -> list[list[int]]:
    batch = enc.shape[0]
    blank = model.vocabulary.blank
    enc_part = model.joint_encoder(enc)                                   # (B, T', J)
    labels = torch.full((batch, 1), blank, dtype=torch.long, device=enc.device)
    g, state = model.predict(labels, model.initial_state(batch))         # output after the start symbol
    pred_part = model.joint_prediction(g[:, 0])                           # (B, J)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    lengths = enc_lengths.to(enc.device)
    for t in range(int(lengths.max()) if batch else 0):
        active = lengths > t                                              # (B,)
        for _ in range(max_symbols_per_step):
            best = model.joint_output(enc_part[:, t], pred_part).argmax(-1)  # (B,)
            emit = active & (best != blank)
            if not bool(emit.any()):
                break
            for b in emit.nonzero().flatten().tolist():
                tokens[b].append(int(best[b]))
            g, new_state = model.predict(torch.where(emit, best, blank).unsqueeze(1), state)
            state = model.select_state(emit, new_state, state)
            pred_part = torch.where(emit.unsqueeze(1), model.joint_prediction(g[:, 0]), pred_part)
            active = emit
    return tokens

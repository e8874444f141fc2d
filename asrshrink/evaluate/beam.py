"""Transducer beam search: the N best label sequences of each utterance with their log-probabilities.

Dimension letters: B batch, T' encoder frames, D encoder size, J joint hidden size, V outputs (labels + blank),
H live hypotheses (of all utterances together).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from asrshrink.evaluate.decoding import single_thread
from asrshrink.models.base import Transducer


@dataclass(frozen=True)
class Scored:
    """One of an utterance's N best: label ids, ``score`` (natural log-probability, see ``beam_search``) and
    ``normalised`` (the softmax of the N scores: exp(score) / sum of exp(score) over the utterance's N-best, so
    the N values sum to 1)."""

    tokens: list[int]
    score: float
    normalised: float


class _Hyp:
    """A hypothesis: its labels, its log-probability and its row in the search's bank of prediction states."""

    __slots__ = ("tokens", "score", "row")

    def __init__(self, tokens: tuple[int, ...], score: float, row: int):
        self.tokens, self.score, self.row = tokens, score, row


@torch.no_grad()
def beam_search(model: Transducer, enc: torch.Tensor, enc_lengths: torch.Tensor, beam: int,
                max_symbols_per_step: int | None = None) -> list[list[Scored]]:
    """Beam search of width ``beam``: for each utterance its (at most) ``beam`` best label sequences, best first.

    The time-synchronous form of Graves' (2012) RNN-T beam search. Each frame starts from the beam that the
    previous frame ended with and expands it one label at a time. At each expansion step every open hypothesis
    (one that may still emit at this frame) offers two kinds of candidates: itself closed by blank (it moves on
    to the next frame) and itself extended by each label (still open); closed candidates with the same label
    sequence are merged, their probabilities summed (log-sum-exp: the alignments of one sequence that reach the
    next frame through different expansion steps; Graves' prefix merge); then closed and open candidates
    compete in one beam of ``beam``, and the frame ends when no open hypothesis is left in it. The family's
    symbols-per-frame rule (``max_symbols_per_step``; None: ``model.max_symbols_per_step``) is kept as greedy
    keeps it: at most that many labels at one frame, after which a hypothesis may only close with blank.

    Why time-synchronous rather than Graves' best-first loop: the symbols-per-frame rule is a per-frame rule;
    each expansion step runs the joint over all open hypotheses of all utterances in one call and the prediction
    network over all new extensions in one call; and width 1 is exactly greedy decoding (at each step the single
    best of blank and the labels, ties to the lowest id as greedy's argmax), which the best-first loop is not.

    ``score``: the natural log of the summed probability of the alignments of the sequence that the search
    kept, an alignment's probability being the product of the joint's softmax probabilities along its path
    through the (frame, label) lattice, one blank closing every frame (a frame closed by the symbols-per-frame
    rule included). Candidates are ranked by raw ``score`` (no length normalisation); ``normalised`` is the
    softmax of the N-best's scores. Scores are accumulated in float64.

    enc (B, T', D), enc_lengths (B,) -> per utterance a list of ``Scored``, sorted by score, highest first.
    """
    if beam < 1:
        raise ValueError(f"beam width must be at least 1, got {beam}")
    if max_symbols_per_step is None:
        max_symbols_per_step = model.max_symbols_per_step
    with single_thread():
        return _beam(model, enc, enc_lengths, beam, max_symbols_per_step)


def _beam(model: Transducer, enc: torch.Tensor, enc_lengths: torch.Tensor, width: int, cap: int
          ) -> list[list[Scored]]:
    batch = enc.shape[0]
    blank = model.vocabulary.blank
    lengths = [int(n) for n in enc_lengths.tolist()]
    enc_part = model.joint_encoder(enc)                                   # (B, T', J)
    start = torch.full((batch, 1), blank, dtype=torch.long, device=enc.device)
    g, state = model.predict(start, model.initial_state(batch))         # output after the start symbol
    pred = model.joint_prediction(g[:, 0])                                # the bank: (H, J), state (L, H, P)
    beams = [[_Hyp((), 0.0, b)] for b in range(batch)]
    finished: dict[int, list[_Hyp]] = {b: beams[b] for b in range(batch) if lengths[b] <= 0}
    for t in range(max(lengths, default=0)):
        active = [b for b in range(batch) if lengths[b] > t]
        closed: dict[int, dict[tuple[int, ...], _Hyp]] = {b: {} for b in active}
        opened = {b: beams[b] for b in active}
        for step in range(cap + 1):
            utts = [b for b in active for _ in opened[b]]
            if not utts:
                break
            rows = torch.tensor([h.row for b in active for h in opened[b]], device=enc.device)
            logits = model.joint_output(enc_part[torch.tensor(utts, device=enc.device), t], pred[rows])  # (H, V)
            logp = torch.log_softmax(logits.double(), dim=-1).cpu().numpy()
            extend: list[tuple[int, _Hyp, int, float]] = []               # (utterance, parent, label, score)
            first = 0
            for b in active:
                hyps = opened[b]
                if not hyps:
                    continue
                scores = np.array([h.score for h in hyps])[:, None] + logp[first:first + len(hyps)]  # (n, V)
                first += len(hyps)
                pool = closed[b]
                for h, s in zip(hyps, scores[:, blank].tolist()):
                    old = pool.get(h.tokens)
                    pool[h.tokens] = _Hyp(h.tokens, s if old is None else float(np.logaddexp(old.score, s)), h.row)
                # Ranked by score, ties to the lower id (blank at its own id), as greedy's argmax.
                entries: list[tuple[float, int, _Hyp | None, int]] = [(-h.score, blank, h, -1) for h in pool.values()]
                if step < cap:
                    labels = scores.copy()
                    labels[:, blank] = -np.inf
                    flat = labels.ravel()
                    for j in np.argsort(-flat, kind="stable")[:width].tolist():
                        if flat[j] > -np.inf:
                            parent, k = divmod(j, labels.shape[1])
                            entries.append((-float(flat[j]), k, None, parent))
                entries.sort(key=lambda e: (e[0], e[1]))
                kept = entries[:width]
                closed[b] = {e[2].tokens: e[2] for e in kept if e[2] is not None}
                extend.extend((b, hyps[e[3]], e[1], -e[0]) for e in kept if e[2] is None)
            opened = {b: [] for b in active}
            if not extend:
                break
            parents = torch.tensor([p.row for _, p, _, _ in extend], device=enc.device)
            labels_in = torch.tensor([[k] for _, _, k, _ in extend], dtype=torch.long, device=enc.device)
            g, new_state = model.predict(labels_in, tuple(s.index_select(1, parents) for s in state))
            base = pred.shape[0]
            pred = torch.cat([pred, model.joint_prediction(g[:, 0])])
            state = tuple(torch.cat([s, n], dim=1) for s, n in zip(state, new_state))
            for i, (b, parent, k, score) in enumerate(extend):
                opened[b].append(_Hyp(parent.tokens + (k,), score, base + i))
        for b in active:
            beams[b] = list(closed[b].values())
            if lengths[b] == t + 1:
                finished[b] = beams[b]
        # Keep in the bank only the rows that the utterances still running will expand.
        going = [h for b in active if lengths[b] > t + 1 for h in beams[b]]
        keep = torch.tensor([h.row for h in going], dtype=torch.long, device=enc.device)
        pred = pred.index_select(0, keep)
        state = tuple(s.index_select(1, keep) for s in state)
        for i, h in enumerate(going):
            h.row = i
    return [_nbest(finished[b]) for b in range(batch)]


def _nbest(hyps: list[_Hyp]) -> list[Scored]:
    ordered = sorted(hyps, key=lambda h: -h.score)
    scores = np.array([h.score for h in ordered])
    normalised = np.exp(scores - np.logaddexp.reduce(scores))
    return [Scored(list(h.tokens), float(h.score), float(p)) for h, p in zip(ordered, normalised)]

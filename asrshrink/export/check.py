"""Parity of an ONNX export with the PyTorch model it came from, on random inputs and on real speech.

Dimension letters: B batch, T feature frames, T' encoder frames, U labels, J joint hidden size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.evaluate.transcribe import featurize
from asrshrink.export.runtime import OnnxTransducer
from asrshrink.models.base import Transducer

#: Largest absolute difference an export may show against PyTorch on any output.
ATOL = 1e-4


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def compare(model: Transducer, runtime: OnnxTransducer, speech: Sequence[np.ndarray], *, seed: int = 0) -> dict:
    """Largest absolute difference between ``runtime`` and ``model`` for each part ("encoder", "decoder",
    "joiner") on random inputs ("random") and on ``speech`` (waveforms at the model's sample rate; "speech"),
    and whether greedy decoding of ``speech`` gives the same tokens (None without speech). An AmNet (PyTorch
    with hard switching against its export) adds the kind "one utterance" (the first speech utterance alone)
    and ``decisions_equal``: per input kind, whether every frame of every utterance chose the same branch."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, float]] = {"encoder": {}, "decoder": {}, "joiner": {}}
    amnet = getattr(runtime, "amnet", None) is not None
    decisions: dict[str, bool] = {}

    def encoder(kind: str, features: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> the model's encoder output (B, T', D), lengths, and its joint encoder block's output (B, T', J)."""
        with torch.no_grad():
            enc, enc_lengths = model.encode(features, lengths)
            enc_part = model.joint_encoder(enc) if runtime.projects_joint else enc
        if amnet:
            with torch.no_grad():
                trace = model.encode_amortized(features, lengths, sampling="hard")[2]
            got, got_lengths, got_trace = runtime.encode_amortized(features, lengths)
            decisions[kind] = torch.equal(trace.decisions.argmax(-1), got_trace.decisions.argmax(-1))
        else:
            got, got_lengths = runtime.encode(features, lengths)
        out["encoder"][kind] = _diff(enc_part, got) if torch.equal(enc_lengths, got_lengths) else float("inf")
        return enc, enc_lengths, enc_part

    def decoder(kind: str, labels: torch.Tensor, state: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            pred, new_state = model.predict(labels, state)
            if runtime.projects_joint:
                pred = model.joint_prediction(pred)
        got, got_state = runtime.predict(labels, state)
        out["decoder"][kind] = max(_diff(a, b) for a, b in zip((pred, *new_state), (got, *got_state)))

    def joiner(kind: str, enc_part: torch.Tensor, pred_part: torch.Tensor) -> None:
        with torch.no_grad():
            if runtime.projects_joint:
                logits = model.joint_output(enc_part, pred_part)
            else:
                logits = model.joint(enc_part, pred_part)
        out["joiner"][kind] = _diff(logits, runtime.joint_output(enc_part, pred_part))

    factor = runtime.time_reduction
    frames = 8 * factor + 3
    features = torch.randn(2, frames, model.feature_config.feature_dim, generator=g)
    enc_part = encoder("random", features, torch.tensor([frames, frames // 2]))[2]
    blank, size = model.vocabulary.blank, model.vocabulary.size
    labels = torch.randint(0, size, (3, 5), generator=g)
    labels[:, 0] = blank
    state = tuple(0.5 * torch.randn(t.shape, generator=g) for t in model.initial_state(3))
    decoder("random", labels, state)
    pred_size = enc_part.shape[-1] if runtime.projects_joint else model.initial_state(1)[0].shape[-1]
    joiner("random", torch.randn(5, enc_part.shape[-1], generator=g), torch.randn(5, pred_size, generator=g))
    tokens_equal = None
    if speech:
        features, lengths = featurize(model, speech)
        if amnet:  # one utterance alone: every frame's batch agrees on a branch, which the graph runs apart
            one = featurize(model, speech[:1])
            encoder("one utterance", *one)
        enc, enc_lengths, enc_part = encoder("speech", features, lengths)
        with torch.no_grad():
            tokens = greedy_decode(model, enc, enc_lengths)
        onnx_enc, onnx_lengths = runtime.encode(features, lengths)
        tokens_equal = greedy_decode(runtime, onnx_enc, onnx_lengths) == tokens
        # The decoder on each utterance's own greedy labels after the start symbol; the joiner on every frame
        # against the start symbol's prediction.
        longest = max(len(t) for t in tokens)
        labels = torch.full((len(tokens), longest + 1), blank)
        for i, t in enumerate(tokens):
            labels[i, 1:len(t) + 1] = torch.tensor(t, dtype=torch.long)
        decoder("speech", labels, model.initial_state(len(tokens)))
        with torch.no_grad():
            start = model.predict(labels[:, :1], model.initial_state(len(tokens)))[0]
            if runtime.projects_joint:
                start = model.joint_prediction(start)
        joiner("speech", enc_part, start)
    result = {"max_abs_diff": out, "greedy_tokens_equal": tokens_equal}
    if amnet:
        result["decisions_equal"] = decisions
    return result


def worst(diffs: dict[str, dict[str, float]]) -> tuple[str, float]:
    """The part and input kind with the largest difference, e.g. ("encoder on speech", 3e-6)."""
    return max(((f"{part} on {kind} input", value) for part, kinds in diffs.items() for kind, value in kinds.items()),
               key=lambda item: item[1])

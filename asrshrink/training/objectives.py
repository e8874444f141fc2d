"""Training objectives over a transducer: the transducer loss with an optional auxiliary CTC loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asrshrink.models.base import Transducer
from asrshrink.training.rnnt_loss import rnnt_loss


def transducer_ctc_loss(model: Transducer, batch: dict[str, torch.Tensor], *, ctc_head: nn.Module | None = None,
                        ctc_weight: float = 0.0, inter_ctc: dict[str, nn.Module] | None = None,
                        inter_weight: float = 0.3) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-label transducer loss (+ ``ctc_weight`` x per-label CTC loss on the model's auxiliary encoder output,
    + ``inter_weight`` x the same on the output of each encoder module named in ``inter_ctc``, through its head:
    intermediate CTC, which gives the lower layers of a deep encoder a gradient of their own).

    batch: features (B, T, F), feature_lengths (B,), labels (B, U), label_lengths (B,).
    Returns the scalar loss and float metrics for logging.
    """
    blank = model.vocabulary.blank
    labels, label_lengths = batch["labels"], batch["label_lengths"]
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out))
        for name in (inter_ctc or {})]
    try:
        enc, enc_lengths, aux, aux_lengths = model.encode_with_aux(batch["features"], batch["feature_lengths"])
    finally:
        for hook in hooks:
            hook.remove()
    start = torch.full((labels.shape[0], 1), blank, dtype=labels.dtype, device=labels.device)
    pred, _ = model.predict(torch.cat([start, labels], 1), model.initial_state(labels.shape[0]))
    logits = model.joint(enc.unsqueeze(2), pred.unsqueeze(1))           # (B, T', U+1, V)
    tokens = label_lengths.sum().clamp(min=1).to(logits.dtype)
    loss_rnnt = rnnt_loss(logits, labels, enc_lengths, label_lengths, blank=blank, reduction="sum") / tokens
    metrics = {"rnnt": float(loss_rnnt.detach())}
    loss = loss_rnnt
    if ctc_head is not None and ctc_weight > 0:
        log_probs = F.log_softmax(ctc_head(aux), dim=-1).transpose(0, 1)  # (T_aux, B, V)
        loss_ctc = F.ctc_loss(log_probs, labels, aux_lengths, label_lengths, blank=blank, reduction="sum",
                              zero_infinity=True) / tokens
        metrics["ctc"] = float(loss_ctc.detach())
        loss = loss + ctc_weight * loss_ctc
    for name, head in (inter_ctc or {}).items():
        hidden = captured[name]
        if hidden.shape[:2] != enc.shape[:2]:
            raise ValueError(f"intermediate CTC on {name}: its output {tuple(hidden.shape)} is not (B, T', D) at the "
                             f"encoder's frame rate {tuple(enc.shape[:2])}")
        log_probs = F.log_softmax(head(hidden), dim=-1).transpose(0, 1)
        inter = F.ctc_loss(log_probs, labels, enc_lengths, label_lengths, blank=blank, reduction="sum",
                           zero_infinity=True) / tokens
        metrics[f"ctc@{name}"] = float(inter.detach())
        loss = loss + inter_weight * inter
    metrics["loss"] = float(loss.detach())
    return loss, metrics

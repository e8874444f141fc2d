"""Training objectives over a transducer: the transducer loss with an optional auxiliary CTC loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asrshrink.models.base import Transducer
from asrshrink.training.rnnt_loss import rnnt_loss


def transducer_ctc_loss(model: Transducer, batch: dict[str, torch.Tensor], *, ctc_head: nn.Module | None = None,
                        ctc_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-label transducer loss (+ ``ctc_weight`` x per-label CTC loss on the model's auxiliary encoder output).

    batch: features (B, T, F), feature_lengths (B,), labels (B, U), label_lengths (B,).
    Returns the scalar loss and float metrics for logging.
    """
    blank = model.vocabulary.blank
    labels, label_lengths = batch["labels"], batch["label_lengths"]
    enc, enc_lengths, aux, aux_lengths = model.encode_with_aux(batch["features"], batch["feature_lengths"])
    start = torch.full((labels.shape[0], 1), blank, dtype=labels.dtype)
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
    metrics["loss"] = float(loss.detach())
    return loss, metrics

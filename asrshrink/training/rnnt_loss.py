"""Exact RNN-T (transducer) negative log-likelihood with an analytic gradient, in plain PyTorch.

Shapes: B batch, T frames, U labels (the longest target in the batch), V vocabulary.

How it works:

* The log-softmax over V and the gather of the two quantities the lattice needs are one custom
  :class:`torch.autograd.Function`: it returns the blank log-prob ``blank(t, u)`` (B, T, U+1) and the label
  log-prob ``label(t, u)`` = log P(y_{u+1} | t, u) (B, T, U), in float64, without materialising the
  (B, T, U+1, V) log-softmax.  Its one full-size buffer, ``exp(logits)``, is turned in place into the gradient
  of the logits (``onehot(g) - softmax * sum(g)``), so a training step allocates a single (B, T, U+1, V)
  tensor here.  Everything after that works on the small gathered tensors.
* The lattice itself is a custom :class:`torch.autograd.Function`.  Inside one frame t the forward variable
  obeys ``alpha(t, u) = logaddexp(a(u), alpha(t, u-1) + label(t, u-1))`` with
  ``a(u) = alpha(t-1, u) + blank(t-1, u)``: a linear recurrence in the log semiring whose solution is
  ``alpha(t, u) = C(t, u) + logcumsumexp_k(a(k) - C(t, k))`` with ``C(t, u) = sum_{j<u} label(t, j)``.
  Storing ``A(t, u) = alpha(t, u) - C(t, u)`` reduces each frame to one addition and one ``logcumsumexp``:
  ``A(t) = logcumsumexp(A(t-1) + E(t-1))`` with ``E(t, u) = C(t, u) + blank(t, u) - C(t+1, u)``.
  The backward variable uses the same ``E``: with ``Bt(t, u) = beta(t, u) + C(t, u)``,
  ``Bt(t) = reverse_logcumsumexp(Bt(t+1) + E(t))``.  So the Python loop runs over T only.
* Lattice arithmetic is float64.  Log-probs below ``LOG_PROB_FLOOR`` (in practice only ``-inf`` from masked
  logits) are raised to it, which keeps ``C`` finite; a path through such a position has probability at
  most ``exp(LOG_PROB_FLOOR)``.
* Per-utterance lengths: log-probs outside an utterance's ``T_b`` frames and ``U_b`` labels are replaced by 0
  before the lattice is run (so padding cannot inject NaN or inf), the backward variable is restarted at each
  utterance's own final state ``(T_b - 1, U_b)``, and gradients outside the valid region are exactly zero.
"""

from __future__ import annotations

import torch

__all__ = ["LOG_PROB_FLOOR", "rnnt_loss"]

# Lower bound applied to gathered log-probs inside the lattice.  Values this low never occur for finite float32
# logits of realistic range; the bound keeps cumulative label sums finite when a logit is -inf.
LOG_PROB_FLOOR = -1.0e4

_REDUCTIONS = ("none", "sum", "mean")


def _lattice_inputs(
    blank_lp: torch.Tensor,
    label_lp: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Builds the time-major float64 lattice tensors.

    blank_lp (B, T, U+1), label_lp (B, T, U); logit_lengths, target_lengths (B,) int64.
    Returns ``E`` (T, B, U+1), ``valid_blank`` (T, B, U+1) bool and ``valid_label`` (T, B, U) bool.
    Invalid positions of the log-probs are set to 0 before ``E`` is formed.
    """
    num_frames = blank_lp.shape[1]
    num_labels = label_lp.shape[2]
    device = blank_lp.device
    t_index = torch.arange(num_frames, device=device)
    u_index = torch.arange(num_labels + 1, device=device)
    valid_t = t_index[:, None] < logit_lengths[None, :]  # (T, B)
    valid_blank = valid_t[:, :, None] & (u_index[None, :] <= target_lengths[:, None])[None]  # (T, B, U+1)
    valid_label = valid_t[:, :, None] & (u_index[None, :num_labels] < target_lengths[:, None])[None]  # (T, B, U)

    zero = torch.zeros((), dtype=torch.float64, device=device)
    blank = blank_lp.detach().transpose(0, 1).to(torch.float64).clamp_min(LOG_PROB_FLOOR)
    label = label_lp.detach().transpose(0, 1).to(torch.float64).clamp_min(LOG_PROB_FLOOR)
    blank = torch.where(valid_blank, blank, zero)
    label = torch.where(valid_label, label, zero)

    # cumulative[t, b, u] = C(t, u) = sum_{j<u} label(t, j); row T is all zeros (past the last frame).
    batch = blank.shape[1]
    cumulative = torch.zeros((num_frames + 1, batch, num_labels + 1), dtype=torch.float64, device=device)
    torch.cumsum(label, dim=2, out=cumulative[:num_frames, :, 1:])
    step = cumulative[:-1] + blank - cumulative[1:]  # E(t, u), (T, B, U+1)
    return step.contiguous(), valid_blank, valid_label


def _forward_variable(step: torch.Tensor) -> torch.Tensor:
    """Normalised forward variable ``A(t, u) = alpha(t, u) - C(t, u)``.

    step: ``E`` (T, B, U+1) float64.  Returns (T, B, U+1) float64; ``A(0, .) = 0`` because
    ``alpha(0, u) = C(0, u)``.  Every entry is finite.
    """
    fwd = torch.empty_like(step)
    fwd[0].zero_()
    scratch = torch.empty_like(step[0])
    for t in range(1, step.shape[0]):
        torch.add(fwd[t - 1], step[t - 1], out=scratch)
        torch.logcumsumexp(scratch, dim=1, out=fwd[t])
    return fwd


def _backward_variable(
    step: torch.Tensor, logit_lengths: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """Normalised backward variable ``Bt(t, u) = beta(t, u) + C(t, u)``, stored with U reversed.

    step: ``E`` (T, B, U+1) float64; lengths (B,).  Returns (T+1, B, U+1) float64 where entry
    ``[t, b, U - u]`` holds ``Bt(t, u)`` for utterance b.  Row ``T_b`` of utterance b holds its final-state
    vector (0 at ``u = U_b``, -inf elsewhere), so ``beta(T_b - 1, u) = blank(T_b - 1, u)`` only at ``U_b``.
    Rows beyond ``T_b`` are scratch values that never reach the valid region.
    """
    num_frames, batch, width = step.shape
    device = step.device
    step_rev = step.flip(2).contiguous()
    bwd = torch.full((num_frames + 1, batch, width), float("-inf"), dtype=torch.float64, device=device)

    u_rev = torch.arange(width, device=device).flip(0)
    terminal = torch.where(
        u_rev[None, :] == target_lengths[:, None],
        torch.zeros((), dtype=torch.float64, device=device),
        torch.tensor(float("-inf"), dtype=torch.float64, device=device),
    )  # (B, U+1) in reversed U order

    # Utterances grouped by length, so the final-state row is written once per distinct length.
    ends: dict[int, list[int]] = {}
    for b, length in enumerate(logit_lengths.tolist()):
        ends.setdefault(int(length), []).append(b)

    def plant(row: int) -> None:
        members = ends.get(row)
        if members is not None:
            index = torch.tensor(members, dtype=torch.long, device=device)
            bwd[row].index_copy_(0, index, terminal.index_select(0, index))

    plant(num_frames)
    scratch = torch.empty_like(step[0])
    for t in range(num_frames - 1, -1, -1):
        torch.add(bwd[t + 1], step_rev[t], out=scratch)
        torch.logcumsumexp(scratch, dim=1, out=bwd[t])
        plant(t)
    return bwd


class _TransducerLattice(torch.autograd.Function):
    """Per-utterance ``-log P(y | x)`` from gathered log-probs, with the gradient from alpha and beta."""

    @staticmethod
    def forward(ctx, blank_lp, label_lp, logit_lengths, target_lengths):
        """blank_lp (B, T, U+1), label_lp (B, T, U) arc scores; lengths (B,) int64.  Returns (B,) float64."""
        step, valid_blank, valid_label = _lattice_inputs(blank_lp, label_lp, logit_lengths, target_lengths)
        fwd = _forward_variable(step)
        batch_index = torch.arange(step.shape[1], device=step.device)
        last_t = logit_lengths - 1
        # log P = alpha(T_b-1, U_b) + blank(T_b-1, U_b) = A(T_b-1, U_b) + E(T_b-1, U_b), since C(T_b, .) = 0.
        log_prob = fwd[last_t, batch_index, target_lengths] + step[last_t, batch_index, target_lengths]
        ctx.save_for_backward(step, fwd, log_prob, valid_blank, valid_label, logit_lengths, target_lengths)
        ctx.input_dtypes = (blank_lp.dtype, label_lp.dtype)
        return -log_prob

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        step, fwd, log_prob, valid_blank, valid_label, logit_lengths, target_lengths = ctx.saved_tensors
        num_labels = valid_label.shape[2]
        bwd = _backward_variable(step, logit_lengths, target_lengths).flip(2)  # (T+1, B, U+1), U in order
        scale = -grad_loss.to(torch.float64)[None, :, None]  # d loss / d log P = -1
        shift = log_prob[None, :, None]
        zero = torch.zeros((), dtype=torch.float64, device=step.device)

        # Occupancy of the blank arc (t, u) -> (t+1, u): exp(alpha + blank + beta(t+1) - log P).
        blank_occ = torch.exp(fwd + step + bwd[1:] - shift)
        grad_blank = torch.where(valid_blank, blank_occ * scale, zero)
        # Occupancy of the label arc (t, u) -> (t, u+1): exp(alpha + label + beta(t, u+1) - log P);
        # C cancels: alpha(t,u) + label(t,u) + beta(t,u+1) = A(t,u) + Bt(t,u+1).
        label_occ = torch.exp(fwd[:, :, :num_labels] + bwd[:-1, :, 1:] - shift)
        grad_label = torch.where(valid_label, label_occ * scale, zero)

        blank_dtype, label_dtype = ctx.input_dtypes
        return (
            grad_blank.transpose(0, 1).to(blank_dtype),
            grad_label.transpose(0, 1).to(label_dtype),
            None,
            None,
        )


class _NormalisedGather(torch.autograd.Function):
    """``log_softmax(logits)`` at a few ids per joint position, with its gradient formed in one buffer.

    The normaliser ``log(sum_v exp(logits))`` is summed without a shift whenever every row's sum lies within
    ``[sqrt(tiny), sqrt(max)]`` of the working dtype: then no term overflows and the largest term is a normal
    number, and a sum of positive terms each accurate to an ulp is accurate to a few ulps whatever its scale,
    so the shift (needed only for range) changes nothing.  Otherwise every row is shifted by its maximum.  The
    logarithm and the subtraction are done in float64, so the log-probs carry no rounding of large logits.
    """

    @staticmethod
    def forward(ctx, logits, index):
        """logits (B, T, U+1, V); index (B, T, U+1, K) int64 ids.  Returns (B, T, U+1, K) float64 log-probs."""
        work_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
        shift = None
        if logits.dtype == work_dtype:
            expd = torch.exp(logits)
        else:
            expd = logits.to(work_dtype).exp_()
        total = expd.sum(dim=-1)  # (B, T, U+1)
        info = torch.finfo(work_dtype)
        low, high = torch.aminmax(total)
        if not (float(low) >= info.tiny**0.5 and float(high) <= info.max**0.5):
            shift = logits.amax(dim=-1, keepdim=True).to(work_dtype)
            torch.sub(logits, shift, out=expd).exp_()
            total = expd.sum(dim=-1)
        log_norm = total.to(torch.float64, copy=True).log_()
        if shift is not None:
            log_norm += shift.squeeze(-1)
        picked = torch.gather(logits, 3, index).to(torch.float64) - log_norm[..., None]

        ctx.save_for_backward(logits, index, total)
        ctx.shift = shift
        ctx.expd = expd  # turned into the gradient by the first backward
        return picked

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_picked):
        logits, index, total = ctx.saved_tensors
        grad = ctx.expd
        ctx.expd = None
        if grad is None:  # a second backward through the same graph (retain_graph=True): rebuild the buffer
            grad = logits.to(total.dtype, copy=True)
            if ctx.shift is not None:
                grad -= ctx.shift
            grad.exp_()
        # d/dx_v sum_k g_k (x_{i_k} - lse) = sum_k g_k [v = i_k] - softmax_v * sum_k g_k
        coefficient = (grad_picked.sum(dim=-1) / total).neg_().to(total.dtype)
        grad.mul_(coefficient[..., None])
        grad.scatter_add_(3, index, grad_picked.to(total.dtype))
        return grad.to(logits.dtype), None


def _check_inputs(logits, targets, logit_lengths, target_lengths, blank, reduction) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 4 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float tensor of shape (B, T, U+1, V), got {tuple(logits.shape)}")
    batch, num_frames, width, vocab = logits.shape
    if targets.dim() != 2 or targets.shape[0] != batch or targets.shape[1] + 1 != width:
        raise ValueError(
            f"targets must have shape (B, U) = ({batch}, {width - 1}) to match logits, got {tuple(targets.shape)}"
        )
    if logit_lengths.shape != (batch,) or target_lengths.shape != (batch,):
        raise ValueError(
            f"logit_lengths and target_lengths must have shape ({batch},), "
            f"got {tuple(logit_lengths.shape)} and {tuple(target_lengths.shape)}"
        )
    if not 0 <= blank < vocab:
        raise ValueError(f"blank={blank} is outside the vocabulary of size {vocab}")
    if num_frames == 0 or batch == 0:
        raise ValueError(f"logits must have at least one frame and one utterance, got {tuple(logits.shape)}")
    if bool((logit_lengths < 1).any()) or bool((logit_lengths > num_frames).any()):
        raise ValueError(f"logit_lengths must lie in [1, {num_frames}], got {logit_lengths.tolist()}")
    if bool((target_lengths < 0).any()) or bool((target_lengths > width - 1).any()):
        raise ValueError(f"target_lengths must lie in [0, {width - 1}], got {target_lengths.tolist()}")


def rnnt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    blank: int,
    reduction: str = "mean",
) -> torch.Tensor:
    """Transducer negative log-likelihood of ``targets`` summed over all alignments.

    logits: (B, T, U+1, V) unnormalised joint outputs, any float dtype (float16/bfloat16 are normalised in
        float32).  targets: (B, U) int64 label ids; entries at or beyond ``target_lengths[b]`` are ignored
        (any value).  logit_lengths: (B,) int, each in [1, T].  target_lengths: (B,) int, each in [0, U].
    blank: id of the blank symbol.
    reduction: "none" gives the per-utterance losses (B,); "sum" their sum; "mean" their mean over the batch
        (not divided by target lengths).
    Returns a tensor in the dtype of ``logits`` (float32 for half-precision logits); the lattice runs in float64.
    Differentiable with respect to ``logits`` (first order).
    """
    _check_inputs(logits, targets, logit_lengths, target_lengths, blank, reduction)
    batch, num_frames, width, vocab = logits.shape
    num_labels = width - 1
    device = logits.device
    logit_lengths = logit_lengths.to(device=device, dtype=torch.long)
    target_lengths = target_lengths.to(device=device, dtype=torch.long)
    targets = targets.to(device=device, dtype=torch.long)

    real = torch.arange(num_labels, device=device)[None, :] < target_lengths[:, None]  # (B, U)
    if bool(((targets < 0) | (targets >= vocab))[real].any()):
        raise ValueError(f"targets hold ids outside [0, {vocab}) within target_lengths")
    # Padding ids are replaced by blank so the gather never reads out of range.
    labels = torch.where(real, targets, torch.full_like(targets, blank))

    # Two ids per joint position: channel 0 is blank at every (t, u); channel 1 is the next label y_{u+1}
    # (padded with blank at u = U, where no label arc exists).
    index = torch.empty((batch, width, 2), dtype=torch.long, device=device)
    index[:, :, 0] = blank
    index[:, :num_labels, 1] = labels
    index[:, num_labels, 1] = blank
    picked = _NormalisedGather.apply(logits, index[:, None].expand(batch, num_frames, width, 2))
    blank_lp = picked[..., 0]
    label_lp = picked[:, :, :num_labels, 1]

    result_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    losses = _TransducerLattice.apply(blank_lp, label_lp, logit_lengths, target_lengths).to(result_dtype)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.mean()

"""Tests for the transducer loss: brute-force enumeration, gradcheck, a naive autograd reference, padding."""

import itertools
import math

import numpy as np
import pytest
import torch

from asrshrink.training.rnnt_loss import _NormalisedGather, _TransducerLattice, rnnt_loss

F64 = torch.float64


def _random_batch(seed, batch, frames, labels, vocab, *, blank=0, scale=1.0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, frames, labels + 1, vocab, generator=gen, dtype=F64) * scale).to(dtype)
    ids = [v for v in range(vocab) if v != blank]
    targets = torch.tensor(ids)[torch.randint(0, len(ids), (batch, labels), generator=gen)]
    return logits, targets


def _brute_force_nll(logits, targets, frames, labels, blank):
    """-log sum over every alignment of one utterance, by explicit enumeration (float64 numpy)."""
    lp = torch.log_softmax(logits.to(F64), dim=-1).numpy()
    y = targets.tolist()
    # An alignment is T blanks and U labels in some order, ending with a blank at the last frame.
    scores = []
    for label_slots in itertools.combinations(range(frames + labels - 1), labels):
        t = u = 0
        score = 0.0
        slots = set(label_slots)
        for position in range(frames + labels):
            if position in slots:
                score += lp[t, u, y[u]]
                u += 1
            else:
                score += lp[t, u, blank]
                t += 1
        assert (t, u) == (frames, labels)
        scores.append(score)
    return -float(np.logaddexp.reduce(np.array(scores)))


def _naive_nll(logits, targets, frames, labels, blank):
    """Double loop over (t, u) in log space with autograd-visible torch ops; one utterance."""
    lp = torch.log_softmax(logits, dim=-1)
    alpha = {}
    for t in range(frames):
        for u in range(labels + 1):
            if t == 0 and u == 0:
                alpha[t, u] = lp.new_zeros(())
                continue
            terms = []
            if t > 0:
                terms.append(alpha[t - 1, u] + lp[t - 1, u, blank])
            if u > 0:
                terms.append(alpha[t, u - 1] + lp[t, u - 1, targets[u - 1]])
            alpha[t, u] = torch.logsumexp(torch.stack(terms), dim=0)
    return -(alpha[frames - 1, labels] + lp[frames - 1, labels, blank])


def _numpy_nll(logits, targets, frames, labels, blank):
    """Plain float64 double-loop recurrence (loss only), for larger and sharper cases."""
    lp = torch.log_softmax(logits.to(F64), dim=-1).numpy()
    alpha = np.full((frames, labels + 1), -np.inf)
    alpha[0, 0] = 0.0
    for t in range(frames):
        for u in range(labels + 1):
            if t > 0:
                alpha[t, u] = np.logaddexp(alpha[t, u], alpha[t - 1, u] + lp[t - 1, u, blank])
            if u > 0:
                alpha[t, u] = np.logaddexp(alpha[t, u], alpha[t, u - 1] + lp[t, u - 1, targets[u - 1]])
    return -(alpha[frames - 1, labels] + lp[frames - 1, labels, blank])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("blank", [0, 3])
def test_matches_brute_force_enumeration(seed, blank):
    vocab = 5
    logits, targets = _random_batch(seed, 3, 4, 3, vocab, blank=blank, scale=2.0)
    frame_lengths = torch.tensor([4, 1, 3])
    label_lengths = torch.tensor([3, 2, 0])
    losses = rnnt_loss(logits, targets, frame_lengths, label_lengths, blank=blank, reduction="none")
    assert losses.shape == (3,) and losses.dtype == F64
    for b in range(3):
        tb, ub = int(frame_lengths[b]), int(label_lengths[b])
        expected = _brute_force_nll(logits[b, :tb, : ub + 1], targets[b, :ub], tb, ub, blank)
        assert losses[b].item() == pytest.approx(expected, abs=1e-6, rel=0)


def test_brute_force_shapes_with_no_labels_and_single_frame():
    # U = 0 for the whole batch (targets of shape (B, 0)) and T = 1.
    logits, _ = _random_batch(5, 2, 3, 0, 4)
    targets = torch.zeros(2, 0, dtype=torch.long)
    losses = rnnt_loss(logits, targets, torch.tensor([3, 1]), torch.tensor([0, 0]), blank=0, reduction="none")
    for b, tb in enumerate([3, 1]):
        assert losses[b].item() == pytest.approx(_brute_force_nll(logits[b, :tb], targets[b], tb, 0, 0), abs=1e-9)
    logits, targets = _random_batch(6, 1, 1, 3, 4)
    loss = rnnt_loss(logits, targets, torch.tensor([1]), torch.tensor([3]), blank=0, reduction="none")
    assert loss.item() == pytest.approx(_brute_force_nll(logits[0], targets[0], 1, 3, 0), abs=1e-9)


def test_gradcheck_full_loss_with_variable_lengths():
    logits, targets = _random_batch(11, 3, 4, 3, 4, blank=1)
    logits.requires_grad_(True)
    frame_lengths = torch.tensor([4, 2, 1])
    label_lengths = torch.tensor([2, 3, 0])

    def fn(x):
        return rnnt_loss(x, targets, frame_lengths, label_lengths, blank=1, reduction="none")

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_lattice_on_unnormalised_scores():
    # The lattice's gradient formula holds for arbitrary arc scores, not only log-probs.
    gen = torch.Generator().manual_seed(12)
    blank_lp = torch.randn(3, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    label_lp = torch.randn(3, 4, 3, generator=gen, dtype=F64, requires_grad=True)
    frame_lengths = torch.tensor([3, 4, 1])
    label_lengths = torch.tensor([3, 1, 2])
    assert torch.autograd.gradcheck(
        lambda b, l: _TransducerLattice.apply(b, l, frame_lengths, label_lengths), (blank_lp, label_lp)
    )


@pytest.mark.parametrize("scale", [1.0, 400.0])
def test_gradcheck_normalised_gather_both_paths(scale):
    # scale 400 makes exp() overflow without a shift, exercising the max-shifted path.
    gen = torch.Generator().manual_seed(13)
    logits = (torch.randn(2, 3, 2, 5, generator=gen, dtype=F64) * scale).requires_grad_(True)
    index = torch.randint(0, 5, (2, 3, 2, 2), generator=gen)
    picked = _NormalisedGather.apply(logits, index)
    torch.testing.assert_close(picked, torch.gather(torch.log_softmax(logits, -1), 3, index), rtol=0, atol=1e-9)
    if scale == 1.0:
        assert torch.autograd.gradcheck(lambda x: _NormalisedGather.apply(x, index), (logits,))
    else:
        weights = torch.randn(2, 3, 2, 2, generator=gen, dtype=F64)
        (got,) = torch.autograd.grad((picked * weights).sum(), logits)
        reference = torch.gather(torch.log_softmax(logits, -1), 3, index)
        (expected,) = torch.autograd.grad((reference * weights).sum(), logits)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_gradient_equals_naive_autograd_reference():
    batch, frames, labels, vocab = 2, 7, 5, 6
    logits, targets = _random_batch(21, batch, frames, labels, vocab, scale=1.5)
    frame_lengths = torch.tensor([7, 5])
    label_lengths = torch.tensor([5, 3])
    weights = torch.tensor([0.7, -1.3], dtype=F64)

    x = logits.clone().requires_grad_(True)
    losses = rnnt_loss(x, targets, frame_lengths, label_lengths, blank=0, reduction="none")
    (grad,) = torch.autograd.grad((losses * weights).sum(), x)

    y = logits.clone().requires_grad_(True)
    reference = torch.stack(
        [
            _naive_nll(y[b, : frame_lengths[b], : label_lengths[b] + 1], targets[b], int(frame_lengths[b]),
                       int(label_lengths[b]), 0)
            for b in range(batch)
        ]
    )
    (expected,) = torch.autograd.grad((reference * weights).sum(), y)

    torch.testing.assert_close(losses.detach(), reference.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-10)
    # The gradient of each utterance's loss sums to zero over V at every joint position (softmax).
    torch.testing.assert_close(grad.sum(-1), torch.zeros_like(grad.sum(-1)), rtol=0, atol=1e-12)


def test_non_finite_padding_logits_do_not_leak():
    # Non-finite padding gives non-finite gradient entries there (as log_softmax would), but the loss and the
    # gradient on the real positions are unchanged.
    vocab = 4
    real, targets = _random_batch(35, 1, 3, 2, vocab)
    x = real.clone().requires_grad_(True)
    alone = rnnt_loss(x, targets, torch.tensor([3]), torch.tensor([2]), blank=0)
    (grad_alone,) = torch.autograd.grad(alone, x)
    for garbage in (math.nan, math.inf, -math.inf):
        padded = torch.full((1, 5, 5, vocab), garbage, dtype=F64)
        padded[0, :3, :3] = real[0]
        padded[0, 1, 4, 2] = 0.0  # mixed finite/non-finite rows as well
        y = padded.requires_grad_(True)
        loss = rnnt_loss(y, torch.tensor([[*targets[0].tolist(), 1, 2]]), torch.tensor([3]), torch.tensor([2]),
                         blank=0)
        (grad,) = torch.autograd.grad(loss, y)
        assert loss.item() == pytest.approx(alone.item(), abs=1e-12)
        torch.testing.assert_close(grad[0, :3, :3], grad_alone[0], rtol=0, atol=1e-12)


def test_padding_does_not_change_loss_or_gradient():
    vocab = 5
    real, real_targets = _random_batch(31, 1, 4, 3, vocab, scale=1.5)
    other, other_targets = _random_batch(32, 1, 9, 6, vocab)

    x = real.clone().requires_grad_(True)
    alone = rnnt_loss(x, real_targets, torch.tensor([4]), torch.tensor([3]), blank=0, reduction="none")
    (grad_alone,) = torch.autograd.grad(alone.sum(), x)

    # Embed the utterance in a batch padded to T=9, U=6 with large garbage logits and out-of-range padding ids.
    padded = torch.randn(2, 9, 7, vocab, dtype=F64, generator=torch.Generator().manual_seed(33)) * 300.0
    padded[0, :4, :4] = real[0]
    padded[1] = other[0]
    targets = torch.full((2, 6), -7)
    targets[0, :3] = real_targets[0]
    targets[0, 3:] = torch.tensor([vocab + 100, -1, 10**9])
    targets[1] = other_targets[0]
    y = padded.clone().requires_grad_(True)
    together = rnnt_loss(y, targets, torch.tensor([4, 9]), torch.tensor([3, 6]), blank=0, reduction="none")
    (grad_together,) = torch.autograd.grad(together[0], y)

    assert together[0].item() == pytest.approx(alone.item(), abs=1e-12)
    torch.testing.assert_close(grad_together[0, :4, :4], grad_alone[0], rtol=0, atol=1e-12)
    padding = torch.ones(9, 7, dtype=torch.bool)
    padding[:4, :4] = False
    assert torch.count_nonzero(grad_together[0][padding]) == 0
    assert torch.count_nonzero(grad_together[1]) == 0
    assert together[1].item() == pytest.approx(
        _numpy_nll(other[0], other_targets[0].tolist(), 9, 6, 0), abs=1e-9
    )


def test_reductions_are_consistent():
    logits, targets = _random_batch(41, 4, 5, 3, 6)
    args = (targets, torch.tensor([5, 3, 4, 1]), torch.tensor([3, 0, 2, 1]))
    none = rnnt_loss(logits, *args, blank=0, reduction="none")
    total = rnnt_loss(logits, *args, blank=0, reduction="sum")
    mean = rnnt_loss(logits, *args, blank=0, reduction="mean")
    default = rnnt_loss(logits, *args, blank=0)
    assert none.shape == (4,) and total.shape == () and mean.shape == ()
    assert total.item() == pytest.approx(none.sum().item(), abs=1e-12)
    assert mean.item() == pytest.approx(none.sum().item() / 4, abs=1e-12)
    assert default.item() == mean.item()

    x = logits.clone().requires_grad_(True)
    (grad_sum,) = torch.autograd.grad(rnnt_loss(x, *args, blank=0, reduction="sum"), x)
    (grad_mean,) = torch.autograd.grad(rnnt_loss(x, *args, blank=0, reduction="mean"), x)
    torch.testing.assert_close(grad_mean * 4, grad_sum, rtol=1e-12, atol=1e-14)


def test_long_sharp_lattice_is_accurate():
    # Confident logits make label cumulative sums reach thousands of nats; float64 keeps the result exact.
    logits, targets = _random_batch(51, 2, 40, 30, 8, scale=12.0)
    losses = rnnt_loss(logits, targets, torch.tensor([40, 33]), torch.tensor([30, 17]), blank=0, reduction="none")
    for b, (tb, ub) in enumerate([(40, 30), (33, 17)]):
        expected = _numpy_nll(logits[b], targets[b].tolist(), tb, ub, 0)
        assert losses[b].item() == pytest.approx(expected, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("scale", [2.0, 9.0, 60.0])
def test_float32_matches_float64_on_the_same_values(scale):
    # scale 9 gives logits up to ~34 (unshifted sums still in range); scale 60 needs the max-shifted path.
    logits, targets = _random_batch(61, 3, 12, 8, 10, scale=scale, dtype=torch.float32)
    args = (targets, torch.tensor([12, 9, 4]), torch.tensor([8, 5, 0]))
    exact = rnnt_loss(logits.double(), *args, blank=0, reduction="none")
    x32 = logits.clone().requires_grad_(True)
    loss32 = rnnt_loss(x32, *args, blank=0, reduction="none")
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), exact, rtol=2e-6, atol=2e-5)
    loss32.sum().backward()
    x64 = logits.double().requires_grad_(True)
    rnnt_loss(x64, *args, blank=0, reduction="none").sum().backward()
    assert x32.grad.dtype == torch.float32
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=0, atol=1e-5)


def test_float16_logits():
    logits, targets = _random_batch(62, 2, 6, 4, 7, scale=2.0, dtype=torch.float16)
    args = (targets, torch.tensor([6, 3]), torch.tensor([4, 2]))
    exact = rnnt_loss(logits.double(), *args, blank=0, reduction="none")
    x16 = logits.clone().requires_grad_(True)
    loss16 = rnnt_loss(x16, *args, blank=0, reduction="none")
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16.double(), exact, rtol=1e-6, atol=1e-5)
    loss16.sum().backward()
    assert x16.grad.dtype == torch.float16 and torch.isfinite(x16.grad).all()


def test_minus_infinity_logits():
    # -inf on an id no arc uses, and on some arcs of the lattice (blank and label) that other paths avoid.
    logits, targets = _random_batch(71, 1, 4, 3, 5, blank=0)
    y = [int(v) for v in targets[0]]
    unused = next(v for v in range(1, 5) if v not in y)
    logits[..., unused] = -math.inf
    logits[0, 1, 1, y[1]] = -math.inf  # label arc (t=1, u=1) -> (1, 2)
    logits[0, 2, 0, 0] = -math.inf  # blank arc (t=2, u=0) -> (3, 0)
    x = logits.clone().requires_grad_(True)
    loss = rnnt_loss(x, targets, torch.tensor([4]), torch.tensor([3]), blank=0)
    assert loss.item() == pytest.approx(_brute_force_nll(logits[0], targets[0], 4, 3, 0), abs=1e-9)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad[..., unused]) == 0
    assert x.grad[0, 1, 1, y[1]] == 0 and x.grad[0, 2, 0, 0] == 0


@pytest.mark.parametrize("scale", [1.0, 400.0])
def test_second_backward_through_retained_graph_matches_first(scale):
    logits, targets = _random_batch(81, 2, 5, 3, 4, scale=scale)
    x = logits.requires_grad_(True)
    loss = rnnt_loss(x, targets, torch.tensor([5, 4]), torch.tensor([3, 2]), blank=0)
    (first,) = torch.autograd.grad(loss, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(reduction="batchmean"), "reduction"),
        (dict(blank=9), "blank"),
        (dict(logit_lengths=torch.tensor([0, 3])), "logit_lengths"),
        (dict(logit_lengths=torch.tensor([4, 3])), "logit_lengths"),
        (dict(target_lengths=torch.tensor([3, 1])), "target_lengths"),
        (dict(targets=torch.tensor([[1, 7], [1, 1]])), "targets"),
        (dict(targets=torch.tensor([[1, 1, 1], [1, 1, 1]])), "targets"),
    ],
)
def test_rejects_malformed_inputs(change, message):
    logits, targets = _random_batch(91, 2, 3, 2, 4)
    kwargs = dict(
        logits=logits, targets=targets, logit_lengths=torch.tensor([3, 2]), target_lengths=torch.tensor([2, 1]),
        blank=0, reduction="mean",
    )
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        rnnt_loss(**kwargs)

"""Streaming calibration statistics, shared by every method: second moments and cross moments of rows
(``Moments``), a layer's relative output error (``OutputError``), and the Cholesky scale of a second moment.

Sums are float64 and independent of the number of rows. Under ``torch.distributed`` (torchrun), each process
accumulates its shard of the calibration set and ``reduce()`` sums the statistics over all processes before a
solve, so every process solves on the whole set.

Dimension letters: N rows, K regressors, S paired inputs of sizes I_s.
"""

from __future__ import annotations

import torch

from asrshrink.errors import AsrshrinkError


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(*tensors: torch.Tensor) -> None:
    """Sum each tensor in place over all processes (nothing without torch.distributed)."""
    if distributed():
        for t in tensors:
            torch.distributed.all_reduce(t)


class Moments:
    """Sums over rows a (N, K): ``gram`` = sum a a^T, and for each paired input b_s (N, I_s) ``cross[s]`` =
    sum a b_s^T; with ``affine`` each a carries a trailing 1 (so (K+1) x ... ), for fits with a bias. Products
    of a batch are formed in float64."""

    def __init__(self, size: int, *, affine: bool = False, paired: tuple[int, ...] = ()):
        k = size + int(affine)
        self.affine = affine
        self.gram = torch.zeros(k, k, dtype=torch.float64)
        self.cross = [torch.zeros(k, n, dtype=torch.float64) for n in paired]
        self.rows = torch.zeros((), dtype=torch.float64)
        self._reduced = False

    def add(self, a: torch.Tensor, paired: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> None:
        """a (N, K), paired[s] (N, I_s): one batch of rows."""
        a = a.double()
        if self.affine:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        self.gram += a.T @ a
        for cross, b in zip(self.cross, paired):
            cross += a.T @ b.double()
        self.rows += a.shape[0]

    def reduce(self) -> "Moments":
        """Sum over all processes, once (before a solve)."""
        if not self._reduced:
            all_reduce(self.gram, *self.cross, self.rows)
            self._reduced = True
        return self

    def mean(self) -> torch.Tensor:
        """The second moment gram / N."""
        self.reduce()
        return self.gram / max(float(self.rows), 1.0)

    value = mean


class OutputError:
    """sum ||y - y_ref||^2 / sum ||y_ref||^2 over valid rows, batch by batch: the relative output error of a
    layer or matrix against the uncompressed model's."""

    def __init__(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64)
        self._reduced = False

    def add(self, y: torch.Tensor, reference: torch.Tensor) -> None:
        """y, reference (N, D): the valid rows of one batch."""
        self.sums[0] += float((y - reference).double().square().sum())
        self.sums[1] += float(reference.double().square().sum())

    def value(self) -> float:
        """The error over all processes' rows (summed across processes once, on the first call)."""
        if not self._reduced:
            all_reduce(self.sums)
            self._reduced = True
        return float(self.sums[0] / self.sums[1].clamp(min=1e-30))


def matrix_error(weight: torch.Tensor, new: torch.Tensor, moment: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 from the inputs' second moment (I, I): a matrix's relative output error on
    those inputs, without running it."""
    w, delta, m = weight.double(), (weight - new).double(), moment.double()
    return float(((delta @ m) * delta).sum() / ((w @ m) * w).sum().clamp(min=1e-300))


def cholesky_scale(gram: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor of a second-moment matrix, damped by ``damping`` x its mean diagonal."""
    gram = gram.to(torch.float64)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    jitter = damping * float(gram.diagonal().mean().clamp(min=1e-30))
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(gram + jitter * eye)
        if int(info) == 0:
            return factor
        jitter *= 100
    raise AsrshrinkError("the calibration inputs' second moment is not positive definite (too few or constant "
                         "calibration frames); use more calibration utterances or drop --data-aware")

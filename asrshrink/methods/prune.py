"""Unstructured pruning of LSTM and Linear weight matrices after training: the pure per-matrix rules
(magnitude, SparseGPT, Wanda) and the model-level method (per-matrix or global sparsity, layer-sequential
calibration).

A pruned matrix keeps its shape and holds exact zeros; its module becomes a SparseLSTMLayer or SparseLinear,
which computes as before and records its non-zeros in the saved model's structure.

Dimension letters: O outputs (4H for an LSTM side: the four gates stacked as rows), I inputs, N rows (valid
frames).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from asrshrink.calibrate.stats import Moments, OutputError, matrix_error
from asrshrink.calibrate.walk import Capture, Solution, shift, valid_rows, walk, walked
from asrshrink.config import PruneConfig
from asrshrink.errors import AsrshrinkError
from asrshrink.models.base import Transducer
from asrshrink.models.layers import is_lstm_layer, matrices, sparse_storage_bytes, with_pruned_weights
from asrshrink.methods.registry import Context, Method, Outcome, register
from asrshrink.models.targets import WeightTarget, select_targets


# --- pure math ------------------------------------------------------------------------------------------------

def pruned_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights are set to zero at ``sparsity``: round(s n), halves rounded up."""
    return min(numel, math.floor(sparsity * numel + 0.5))


def split_count(count: int, sizes: list[int]) -> list[int]:
    """``count`` split over parts of the given sizes in proportion, by rounding the cumulative shares, so the
    parts add up to ``count`` exactly and none exceeds its size."""
    total = sum(sizes)
    bounds, cumulative = [0], 0
    for size in sizes:
        cumulative += size
        bounds.append(math.floor(count * cumulative / max(total, 1) + 0.5))
    return [b - a for a, b in zip(bounds, bounds[1:])]


def smallest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of exactly ``count`` entries of ``scores`` (any shape) with the smallest values; ties at the
    threshold go to the earliest positions."""
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count >= flat.numel():
        mask[:] = True
    elif count > 0:
        threshold = flat.kthvalue(count).values
        mask = flat < threshold
        ties = (flat == threshold).nonzero().flatten()[:count - int(mask.sum())]
        mask[ties] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask (O, I) of the entries an N:M pattern drops: in every run of ``m`` consecutive entries of a
    row, all but the ``n`` highest scores (a shorter last run keeps up to ``n``); ties go to earlier entries."""
    rows, cols = scores.shape
    pad = (-cols) % m
    padded = torch.cat([scores.double(), scores.new_full((rows, pad), -math.inf, dtype=torch.float64)], 1)
    groups = padded.view(rows, -1, m)                                        # (O, ceil(I / m), m)
    order = torch.sort(groups, dim=-1, stable=True).indices[..., :m - n]      # the m - n lowest per run
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.view(rows, -1)[:, :cols]


def magnitude_prune(weight: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """``weight`` (O, I) with its round(s O I) smallest-magnitude entries set to zero (or, with ``pattern``
    (N, M), all but the N largest of every M consecutive entries of a row)."""
    if pattern is not None:
        return weight.masked_fill(nm_mask(weight.abs(), *pattern), 0.0)
    return weight.masked_fill(smallest(weight.abs(), pruned_count(weight.numel(), sparsity)), 0.0)


def wanda_prune(weight: torch.Tensor, sparsity: float, moment: torch.Tensor,
                pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda's score (Sun et al., 2023): drop the round(s O I) smallest |W_oj| ||x_j|| of the matrix.

    weight (O, I); moment (I, I) the inputs' second moment (only its diagonal, mean x_j^2, is used). The paper
    compares scores within each output row; across the four stacked gates of an LSTM side, whose rows differ
    in scale, one comparison over the whole matrix gave lower output errors on the reference model."""
    scores = weight.abs().double() * moment.diagonal().double().clamp(min=0).sqrt()
    if pattern is not None:
        return weight.masked_fill(nm_mask(scores, *pattern), 0.0)
    return weight.masked_fill(smallest(scores, pruned_count(weight.numel(), sparsity)), 0.0)


def sparsegpt_prune(weight: torch.Tensor, moment: torch.Tensor, sparsity: float, *, block_size: int = 128,
                    damping: float = 0.01, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023): prune ``weight`` (O, I) to minimise ||(W - W') X||^2 on inputs
    with second moment ``moment`` (I, I) = X X^T / N, in float64.

    Columns are visited left to right in blocks of ``block_size``. At the start of a block its mask is chosen
    by w^2 / [U]_jj^2 (U the upper Cholesky factor of (H + damping mean(diag H) I)^-1), pruning the block's
    proportional share of round(s O I); then each column's pruning error is spread over the block's later
    columns by the OBS update, and the block's accumulated errors over all later columns in one product (lazy
    batch update). The pruned entries are exact zeros and the total count is exact. With ``pattern`` (N, M) the
    mask of each run of M columns is chosen when the run starts (by the same score on the updated weights),
    keeping N per row.
    """
    rows, cols = weight.shape
    w = weight.double().clone()
    h = moment.double().clone()
    mean = float(h.diagonal().mean())
    h.diagonal().add_(damping * mean if mean > 0 else 1.0)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (I, I)
    starts = list(range(0, cols, block_size))
    counts = split_count(pruned_count(weight.numel(), sparsity), [rows * (min(s + block_size, cols) - s)
                                                                  for s in starts])
    for start, count in zip(starts, counts):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()                                      # (O, b)
        u_block = u[start:end, start:end]
        d = u_block.diagonal()
        mask = smallest(block.square() / d.square(), count) if pattern is None else \
            torch.zeros_like(block, dtype=torch.bool)
        errors = torch.zeros_like(block)
        for i in range(end - start):
            if pattern is not None and (start + i) % pattern[1] == 0:
                run = slice(i, min(i + pattern[1], end - start))
                mask[:, run] = nm_mask(block[:, run].square() / d[run].square(), *pattern)
            column = block[:, i]
            kept = column.masked_fill(mask[:, i], 0.0)
            errors[:, i] = (column - kept) / d[i]
            block[:, i:] -= errors[:, i:i + 1] * u_block[i:i + 1, i:]
            block[:, i] = kept
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
    return w.to(weight.dtype)


relative_error = matrix_error
SecondMoment = Moments


def prune_matrix(weight: torch.Tensor, sparsity: float, method: str, moment: torch.Tensor | None = None, *,
                 block_size: int = 128, damping: float = 0.01, pattern: tuple[int, int] | None = None
                 ) -> torch.Tensor:
    """``weight`` (O, I) pruned to ``sparsity`` (or to an N:M ``pattern``) by ``method`` (sparsegpt and wanda
    need ``moment`` (I, I))."""
    if method == "magnitude":
        return magnitude_prune(weight, sparsity, pattern)
    if moment is None:
        raise ValueError(f"{method} pruning needs the inputs' second moment")
    if method == "wanda":
        return wanda_prune(weight, sparsity, moment, pattern)
    if method == "sparsegpt":
        return sparsegpt_prune(weight, moment, sparsity, block_size=block_size, damping=damping, pattern=pattern)
    raise ValueError(f"unknown pruning method {method!r}")


# --- the model-level method ---------------------------------------------------------------------------------

@dataclass
class MatrixReport:
    """What pruning did to one matrix. Errors are relative output errors of the matrix on its calibration inputs
    (None without calibration); ``layer_error`` is the relative error of the whole layer's output against the
    unpruned model's (its inputs from the already-pruned layers before it)."""

    layer: str
    side: str
    shape: tuple[int, int]
    status: str
    target_sparsity: float | None
    nonzeros: int
    error: float | None = None
    error_magnitude: float | None = None
    layer_error: float | None = None
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / (self.shape[0] * self.shape[1])

    def to_json(self) -> dict:
        numel = self.shape[0] * self.shape[1]
        pruned = self.target_sparsity is not None
        return {"layer": self.layer, "side": self.side, "shape": list(self.shape), "groups": 1, "rank": None,
                "status": self.status, "target_sparsity": self.target_sparsity, "sparsity": self.sparsity,
                "nonzeros": self.nonzeros, "bytes_dense": 4 * numel if pruned else None,
                "bytes_sparse": sparse_storage_bytes(numel, self.nonzeros) if pruned else None,
                "error": self.error, "error_magnitude": self.error_magnitude, "layer_error": self.layer_error}


def prune_targets(model: Transducer, components: list[str]) -> list[WeightTarget]:
    """Every weight target of the chosen components, in forward order (low-rank factors are not prunable)."""
    return model.weight_targets(components)


def matrix(model: nn.Module, target: WeightTarget) -> torch.Tensor:
    return matrices(model.get_submodule(target.layer))[target.side].weight


def allocate(model: Transducer, targets: list[WeightTarget], sparsity: float, global_threshold: bool = False
             ) -> dict[tuple[str, str], float]:
    """Each prunable matrix's sparsity: ``sparsity`` everywhere, or with ``global_threshold`` each matrix's
    share of the round(s N) smallest magnitudes over all of them (one threshold)."""
    prunable = [t for t in targets if t.prunable]
    if not global_threshold:
        return {(t.layer, t.side): sparsity for t in prunable}
    weights = [matrix(model, t).abs().flatten() for t in prunable]
    mask = smallest(torch.cat(weights), pruned_count(sum(w.numel() for w in weights), sparsity))
    shares, offset = {}, 0
    for t, w in zip(prunable, weights):
        shares[(t.layer, t.side)] = int(mask[offset:offset + w.numel()].sum()) / w.numel()
        offset += w.numel()
    return shares


MatrixHook = Callable[[MatrixReport], None]


class PruneSolver:
    """Walk solver: prunes the chosen matrices of one module on its calibration inputs' second moments (an
    LSTM layer's recurrent inputs are the hidden states it produces on them before it is pruned). For an LSTM
    layer it also measures the pruned layer's output error against the unpruned model's."""

    def __init__(self, module: nn.Module, targets: list[WeightTarget], goals: dict, config: PruneConfig,
                 done: Callable[[MatrixReport], None]):
        self.module, self.targets, self.goals, self.config, self.done = module, targets, goals, config, done
        self.moments = {t.side: Moments(t.cols) for t in targets}
        self.needs_original = is_lstm_layer(module)
        self.needs_compressed_output = True  # an LSTM layer's recurrent inputs are its own hidden states
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.references: list[torch.Tensor] = []
        self.started = time.perf_counter()

    def add_batch(self, capture: Capture) -> None:
        for side, moment in self.moments.items():
            moment.add(capture.rows(shift(capture.compressed_output) if side == "hh" else capture.compressed_input))
        if self.needs_original:
            self.inputs.append((capture.compressed_input, capture.lengths))
            self.references.append(capture.original_output)

    def solve(self) -> Solution:
        c = self.config
        current = matrices(self.module)
        new, rows = {}, []
        for t in self.targets:
            weight, moment = current[t.side].weight, self.moments[t.side].mean()
            goal = self.goals[t.key]
            new[t.side] = prune_matrix(weight, goal, c.method, moment, block_size=c.block_size, damping=c.damping,
                                       pattern=c.nm)
            rows.append(MatrixReport(t.layer, t.side, (t.rows, t.cols), f"pruned ({c.method})", goal,
                                     int(new[t.side].count_nonzero()), relative_error(weight, new[t.side], moment),
                                     relative_error(weight, magnitude_prune(weight, goal, c.nm), moment)))
        layer = with_pruned_weights(self.module, new)
        outputs, layer_error = None, None
        if self.needs_original:
            outputs, error = [], OutputError()
            for (x, lengths), h_o in zip(self.inputs, self.references):
                h, _ = layer(x)
                outputs.append(h)
                error.add(valid_rows(h, lengths), valid_rows(h_o, lengths))
            layer_error = error.value()
        seconds = time.perf_counter() - self.started
        for row in rows:
            row.layer_error = layer_error if layer_error is not None else row.error
            row.seconds = seconds / len(rows)
            self.done(row)
        return Solution(layer, outputs)

    def free(self) -> None:
        self.moments, self.inputs, self.references = {}, [], []


@torch.no_grad()
def prune_model(model: Transducer, config: PruneConfig, batches: list[dict[str, torch.Tensor]] | None = None, *,
                on_matrix: MatrixHook | None = None, targets: list[WeightTarget] | None = None
                ) -> tuple[Transducer, list[MatrixReport]]:
    """A pruned copy of ``model`` and one report per matrix of the chosen targets (default: every matrix of
    ``config.components``), in forward order.

    Calibrated methods (sparsegpt, wanda) walk the blocks first to last over ``batches`` (dicts with features
    (B, T, F), feature_lengths, labels, label_lengths), each matrix with its inputs from the already-pruned
    matrices before it. Matrices the walk does not reach (the joint's Linears) are pruned by magnitude.
    ``on_matrix`` is called as each matrix is done.
    """
    config.check()
    if targets is None:
        targets = prune_targets(model, list(config.components))
    goals = allocate(model, targets, config.sparsity, config.global_threshold)
    pruned = copy.deepcopy(model).eval()
    reports: dict[tuple[str, str], MatrixReport] = {}

    def done(report: MatrixReport) -> None:
        reports[(report.layer, report.side)] = report
        if on_matrix:
            on_matrix(report)

    prunable = [t for t in targets if t.prunable]
    if config.calibrated:
        if not batches:
            raise AsrshrinkError(f"--method {config.method} needs calibration speech (--calib)")
        walk(model, pruned, batches, walked(model, prunable),
             lambda layer, group, o_module, c_module, position: PruneSolver(
                 c_module, [t for t in group if t.prunable], goals, config, done))
    by_layer: dict[str, list[WeightTarget]] = {}
    for t in prunable:
        if t.key not in reports:
            by_layer.setdefault(t.layer, []).append(t)
    for name, rest in by_layer.items():
        started = time.perf_counter()
        layer = pruned.get_submodule(name)
        new = {t.side: magnitude_prune(matrix(pruned, t), goals[t.key], config.nm) for t in rest}
        pruned.set_submodule(name, with_pruned_weights(layer, new))
        status = "pruned (magnitude)" if not config.calibrated else "pruned by magnitude (no calibration walk)"
        for t in rest:
            done(MatrixReport(t.layer, t.side, (t.rows, t.cols), status, goals[t.key],
                              int(new[t.side].count_nonzero()), seconds=(time.perf_counter() - started) / len(rest)))
    for t in targets:
        if not t.prunable:
            done(MatrixReport(t.layer, t.side, (t.rows, t.cols), "low-rank factors: not pruned", None,
                              int(matrix(pruned, t).count_nonzero())))
    return pruned.eval(), [reports[t.key] for t in targets]


# --- the registered method ------------------------------------------------------------------------------------

def _prune_core(config: PruneConfig, ctx: Context) -> Outcome:
    original = ctx.original
    targets = select_targets(prune_targets(original, list(config.components)), config.targets, config.ignore)
    if not any(t.prunable for t in targets):
        raise AsrshrinkError(f"nothing to prune in {', '.join(config.components)} (only low-rank factors); "
                             f"choose other --components")
    if config.calibrated and not walked(original, [t for t in targets if t.prunable]):
        raise AsrshrinkError(f"--method {config.method} prunes on calibration speech the encoder or prediction "
                             f"network: --components must include encoder or prediction")

    def on_matrix(r: MatrixReport) -> None:
        errors = "" if r.error is None else (
            f", relative output error {r.error:.4f} (magnitude {r.error_magnitude:.4f}), layer {r.layer_error:.4f}")
        ctx.log(f"{r.layer} {r.side} {r.shape[0]}x{r.shape[1]}: " + (
            f"sparsity {r.sparsity:.3f}{errors} ({r.seconds:.1f} s)" if r.target_sparsity is not None else r.status))

    ctx.log(f"{config.method} pruning to " + (f"the {config.pattern} pattern" if config.pattern else
                                               f"sparsity {config.sparsity:g}")
            + (" (one magnitude threshold across all matrices)" if config.global_threshold else " per matrix"))
    pruned, rows = prune_model(original, config, ctx.batches, on_matrix=on_matrix, targets=targets)
    return Outcome(pruned, [r.to_json() for r in rows])


register(Method("prune", PruneConfig, _prune_core, calibrated=lambda config: config.calibrated,
                unused_calib="--calib is read only by --method sparsegpt or wanda; drop --calib or choose one"))

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

from asrshrink.config import PruneConfig
from asrshrink.errors import AsrshrinkError
from asrshrink.models.base import Transducer
from asrshrink.models.layers import (FactorizedLSTMLayer, LowRankLinear, LSTMLayer, SparseLinear, SparseLSTMLayer,
                                     lstm_side_weights, named_lstm_layers, sparse_storage_bytes)


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


def magnitude_prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """``weight`` (O, I) with its round(s O I) smallest-magnitude entries set to zero."""
    return weight.masked_fill(smallest(weight.abs(), pruned_count(weight.numel(), sparsity)), 0.0)


def wanda_prune(weight: torch.Tensor, sparsity: float, moment: torch.Tensor) -> torch.Tensor:
    """Wanda's score (Sun et al., 2023): drop the round(s O I) smallest |W_oj| ||x_j|| of the matrix.

    weight (O, I); moment (I, I) the inputs' second moment (only its diagonal, mean x_j^2, is used). The paper
    compares scores within each output row; across the four stacked gates of an LSTM side, whose rows differ
    in scale, one comparison over the whole matrix gave lower output errors on the reference model."""
    scores = weight.abs().double() * moment.diagonal().double().clamp(min=0).sqrt()
    return weight.masked_fill(smallest(scores, pruned_count(weight.numel(), sparsity)), 0.0)


def sparsegpt_prune(weight: torch.Tensor, moment: torch.Tensor, sparsity: float, *, block_size: int = 128,
                    damping: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023): prune ``weight`` (O, I) to minimise ||(W - W') X||^2 on inputs
    with second moment ``moment`` (I, I) = X X^T / N, in float64.

    Columns are visited left to right in blocks of ``block_size``. At the start of a block its mask is chosen
    by w^2 / [U]_jj^2 (U the upper Cholesky factor of (H + damping mean(diag H) I)^-1), pruning the block's
    proportional share of round(s O I); then each column's pruning error is spread over the block's later
    columns by the OBS update, and the block's accumulated errors over all later columns in one product (lazy
    batch update). The pruned entries are exact zeros and the total count is exact.
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
        mask = smallest(block.square() / d.square(), count)
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = block[:, i]
            kept = column.masked_fill(mask[:, i], 0.0)
            errors[:, i] = (column - kept) / d[i]
            block[:, i:] -= errors[:, i:i + 1] * u_block[i:i + 1, i:]
            block[:, i] = kept
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
    return w.to(weight.dtype)


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, moment: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 from the inputs' second moment (I, I): the pruned matrix's relative output
    error on those inputs."""
    w, delta, m = weight.double(), (weight - pruned).double(), moment.double()
    return float(((delta @ m) * delta).sum() / ((w @ m) * w).sum().clamp(min=1e-300))


class SecondMoment:
    """Streaming second moment X X^T / N of input rows, accumulated in float64 (memory independent of N)."""

    def __init__(self, size: int):
        self.sum = torch.zeros(size, size, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """x (N, I): one batch of rows."""
        x = x.double()
        self.sum += x.T @ x
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)


def prune_matrix(weight: torch.Tensor, sparsity: float, method: str, moment: torch.Tensor | None = None, *,
                 block_size: int = 128, damping: float = 0.01) -> torch.Tensor:
    """``weight`` (O, I) pruned to ``sparsity`` by ``method`` (sparsegpt and wanda need ``moment`` (I, I))."""
    if method == "magnitude":
        return magnitude_prune(weight, sparsity)
    if moment is None:
        raise ValueError(f"{method} pruning needs the inputs' second moment")
    if method == "wanda":
        return wanda_prune(weight, sparsity, moment)
    if method == "sparsegpt":
        return sparsegpt_prune(weight, moment, sparsity, block_size=block_size, damping=damping)
    raise ValueError(f"unknown pruning method {method!r}")


# --- the model-level method ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One weight matrix of a chosen component: an LSTM side ("ih", "hh") or a Linear ("linear")."""

    layer: str            # dotted module name in the model
    side: str
    rows: int             # O
    cols: int             # I
    prunable: bool        # False: low-rank factors, left as they are


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


def prune_targets(model: Transducer, components: list[str]) -> list[Target]:
    """Every LSTM side and Linear weight of the chosen components, in forward order."""
    known = model.components()
    unknown = [c for c in components if c not in known]
    if unknown:
        raise AsrshrinkError(f"unknown component(s) {unknown}; this model has {', '.join(known)}")
    paths = {id(m): n for n, m in model.named_modules()}
    targets = []
    for component in components:
        prefix = paths[id(known[component])]
        lstms = dict(named_lstm_layers(known[component]))
        inside = tuple(name + "." for name in lstms)
        for name, module in known[component].named_modules():
            full = f"{prefix}.{name}" if name else prefix
            if name in lstms:
                sides = {"ih": getattr(module, "ih", None), "hh": getattr(module, "hh", None)}
                for side, (weight, _) in lstm_side_weights(module).items():
                    targets.append(Target(full, side, *weight.shape, not isinstance(sides[side], LowRankLinear)))
            elif isinstance(module, nn.Linear) and not name.startswith(inside):
                targets.append(Target(full, "linear", module.out_features, module.in_features, True))
    return targets


def matrix(model: nn.Module, target: Target) -> torch.Tensor:
    layer = model.get_submodule(target.layer)
    return layer.weight.detach() if target.side == "linear" else lstm_side_weights(layer)[target.side][0]


def allocate(model: Transducer, targets: list[Target], sparsity: float, global_threshold: bool = False
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


def with_weights(layer: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``layer`` holding the pruned ``weights`` by side ("ih", "hh" or "linear") as a sparse module."""
    if isinstance(layer, LSTMLayer):
        current = lstm_side_weights(layer)
        return SparseLSTMLayer.from_weights(layer, weights.get("ih", current["ih"][0]),
                                            weights.get("hh", current["hh"][0]))
    if isinstance(layer, FactorizedLSTMLayer):
        sides = {s: SparseLinear.from_weight(getattr(layer, s), weights[s]) if s in weights else getattr(layer, s)
                 for s in ("ih", "hh")}
        return FactorizedLSTMLayer(sides["ih"], sides["hh"], layer.hidden_size)
    return SparseLinear.from_weight(layer, weights["linear"])


MatrixHook = Callable[[MatrixReport], None]


@torch.no_grad()
def prune_model(model: Transducer, config: PruneConfig, batches: list[dict[str, torch.Tensor]] | None = None, *,
                on_matrix: MatrixHook | None = None) -> tuple[Transducer, list[MatrixReport]]:
    """A pruned copy of ``model`` and one report per matrix of the chosen components, in forward order.

    Calibrated methods (sparsegpt, wanda) walk the LSTM layers first to last over ``batches`` (dicts with
    features (B, T, F), feature_lengths, labels, label_lengths): a layer's input-side statistics are its inputs
    from the already-pruned layers before it, its recurrent-side statistics the hidden states it produces on
    them (before it is pruned). Matrices the walk does not reach (the joint's Linears) are pruned by magnitude.
    ``on_matrix`` is called as each matrix is done.
    """
    from asrshrink.calibrate import shift, valid_rows, walk_layers

    config.check()
    targets = prune_targets(model, list(config.components))
    goals = allocate(model, targets, config.sparsity, config.global_threshold)
    pruned = copy.deepcopy(model).eval()
    reports: dict[tuple[str, str], MatrixReport] = {}

    def done(report: MatrixReport) -> None:
        reports[(report.layer, report.side)] = report
        if on_matrix:
            on_matrix(report)

    by_layer: dict[str, list[Target]] = {}
    for t in targets:
        if t.prunable:
            by_layer.setdefault(t.layer, []).append(t)

    def visit(o_layer, name, c_layer, orig_acts, comp_acts, index, orig_outputs):
        sides = {t.side: t for t in by_layer.get(name, [])}
        if not sides:
            return None
        started = time.perf_counter()
        moments = {side: SecondMoment(t.cols) for side, t in sides.items()}
        for x, lengths in comp_acts:
            if "ih" in moments:
                moments["ih"].add(valid_rows(x, lengths))
            if "hh" in moments:
                moments["hh"].add(valid_rows(shift(c_layer(x)[0]), lengths))
        current = lstm_side_weights(c_layer)
        new, rows = {}, []
        for side, t in sides.items():
            weight, moment = current[side][0], moments[side].value()
            goal = goals[(t.layer, side)]
            new[side] = prune_matrix(weight, goal, config.method, moment, block_size=config.block_size,
                                     damping=config.damping)
            rows.append(MatrixReport(t.layer, side, (t.rows, t.cols), f"pruned ({config.method})", goal,
                                     int(new[side].count_nonzero()), relative_error(weight, new[side], moment),
                                     relative_error(weight, magnitude_prune(weight, goal), moment)))
        layer = with_weights(c_layer, new)
        outputs, error, energy = [], 0.0, 0.0
        for (x, lengths), (h_o, _) in zip(comp_acts, orig_outputs):
            h, _ = layer(x)
            outputs.append(h)
            error += float(valid_rows(h - h_o, lengths).double().square().sum())
            energy += float(valid_rows(h_o, lengths).double().square().sum())
        seconds = time.perf_counter() - started
        for row in rows:
            row.layer_error, row.seconds = error / max(energy, 1e-30), seconds / len(rows)
            done(row)
        return layer, outputs

    if config.calibrated:
        if not batches:
            raise AsrshrinkError(f"--method {config.method} needs calibration speech (--calib)")
        walk_layers(model, pruned, batches, walked_components(model, targets), visit)
    for name, layer_targets in by_layer.items():
        rest = [t for t in layer_targets if (t.layer, t.side) not in reports]
        if not rest:
            continue
        started = time.perf_counter()
        layer = pruned.get_submodule(name)
        new = {t.side: magnitude_prune(matrix(pruned, t), goals[(t.layer, t.side)]) for t in rest}
        pruned.set_submodule(name, with_weights(layer, new))
        status = "pruned (magnitude)" if not config.calibrated else "pruned by magnitude (no calibration walk)"
        for t in rest:
            done(MatrixReport(t.layer, t.side, (t.rows, t.cols), status, goals[(t.layer, t.side)],
                              int(new[t.side].count_nonzero()), seconds=(time.perf_counter() - started) / len(rest)))
    for t in targets:
        if not t.prunable:
            done(MatrixReport(t.layer, t.side, (t.rows, t.cols), "low-rank factors: not pruned", None,
                              int(matrix(pruned, t).count_nonzero())))
    return pruned.eval(), [reports[(t.layer, t.side)] for t in targets]


def walked_components(model: Transducer, targets: list[Target]) -> tuple[str, ...]:
    """The components a calibrated method walks: those that run as blocks with a layer to prune among them."""
    layers = {t.layer for t in targets if t.prunable}
    walked = []
    for component in model.components():
        try:
            blocks = model.blocks(component)
        except AsrshrinkError:
            continue
        if any(b.name in layers for b in blocks):
            walked.append(component)
    return tuple(walked)

"""PSVD: layer-sequential least-squares post-training of an SVD-compressed LSTM stack, on calibration data,
without back-propagation.

For every factorised LSTM layer, first to last, the layer's pre-activations are fitted to the uncompressed
model's: the input side U_x (V_x x~) + b_x to W_x x + b_x, and the recurrent side U_h (V_h h~) + b_h to
W_h h + b_h, where x, h are the uncompressed model's inputs and hidden states and x~, h~ the compressed
model's (its inputs come from the already-compressed layers before it). The paper solves for an N x N matrix M
applied to the compressed pre-activation; M [U b] spans exactly the affine maps of V x~ (when [U b] has full
column rank), so this module solves for the left factor and bias directly: k + 1 unknowns per output instead
of N, the same optimum. ``variant="joint"`` fits both sides at once to the summed pre-activation (what the
gates see). Repeated for several iterations. Statistics are float64 and only the current layer's are alive.

Dimension letters: T frames, B batch, N rows (valid frames), I inputs, H hidden, O = 4H outputs, k rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from asrshrink.calibrate import Activations, shift, valid_rows, walk_layers
from asrshrink.models.base import Transducer
from asrshrink.models.layers import FactorizedLSTMLayer, LowRankLinear, lstm_side_weights

VARIANTS = ("paper", "joint")


# --- pure math ------------------------------------------------------------------------------------------------

@dataclass
class RegressionStats:
    """Sufficient statistics of a least-squares fit target = A z + c over rows (z regressors, float64).

    gram = sum [z;1][z;1]^T, cross = sum [z;1] target^T, energy = sum ||target||^2, rows = count.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    energy: float = 0.0
    rows: int = 0

    @classmethod
    def empty(cls, regressors: int, outputs: int) -> "RegressionStats":
        return cls(torch.zeros(regressors + 1, regressors + 1, dtype=torch.float64),
                   torch.zeros(regressors + 1, outputs, dtype=torch.float64))

    def add(self, z: torch.Tensor, target: torch.Tensor) -> None:
        """z (N, k), target (N, O): one batch of rows (products in float32, sums in float64)."""
        z1 = torch.cat([z, z.new_ones(z.shape[0], 1)], 1).double()
        self.gram += z1.T @ z1
        self.cross += z1.T @ target.double()
        self.energy += float(target.double().square().sum())
        self.rows += z.shape[0]


def solve_regression(stats: RegressionStats, ridge: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares A (O, k) and c (O,) minimising sum ||A z + c - target||^2 (+ ridge * mean diag * ||A||^2)."""
    gram = stats.gram.clone()
    k = gram.shape[0] - 1
    damp = ridge * float(gram.diagonal()[:k].mean()) if k else 0.0
    gram[range(k), range(k)] += damp
    try:
        solution = torch.linalg.solve(gram, stats.cross)  # (k+1, O)
    except torch.linalg.LinAlgError:  # singular (e.g. fewer rows than unknowns): the minimum-norm solution
        solution = torch.linalg.lstsq(gram, stats.cross, driver="gelsd").solution
    return solution[:k].T.contiguous(), solution[k].contiguous()


def regression_error(stats: RegressionStats, a: torch.Tensor, c: torch.Tensor) -> float:
    """sum ||A z + c - target||^2 / sum ||target||^2, from the statistics alone (with ``energy`` 0: the
    residual minus the unknown constant sum ||target||^2, still fine for comparing two fits)."""
    ac = torch.cat([a.double().T, c.double().unsqueeze(0)], 0)  # (k+1, O)
    residual = float((ac * (stats.gram @ ac)).sum() - 2 * (ac * stats.cross).sum()) + stats.energy
    if stats.energy == 0.0:
        return residual
    return max(residual, 0.0) / stats.energy


def fold_correction(up: torch.Tensor, bias: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's correction M (O, O) applied after U (V x) + b, folded into the factors: (M U, M b)."""
    return m @ up, m @ bias


# --- the layer-sequential driver ----------------------------------------------------------------------------

@dataclass
class LayerReport:
    """One line of the PSVD log: relative output error of the layer before and after its refit."""

    iteration: int
    layer: str
    ranks: dict[str, int]
    rows: int
    error_before: float
    error_after: float
    step: float
    seconds: float

    def to_json(self) -> dict:
        return {"iteration": self.iteration, "layer": self.layer, "ranks": self.ranks, "rows": self.rows,
                "error_before": self.error_before, "error_after": self.error_after, "step": self.step,
                "seconds": self.seconds}


@dataclass(frozen=True)
class PsvdConfig:
    """PSVD post-training: ``iterations`` passes over the layers, first to last; ``variant`` "paper" fits each
    side on its own, "joint" fits both sides to the summed pre-activation."""

    iterations: int = 3
    variant: str = "paper"
    ridge: float = 1e-7
    components: tuple[str, ...] = ("encoder",)
    #: Fits per layer and iteration. The recurrent fit's regressors are the hidden states of the layer's
    #: previous version; refitting with the refitted layer's own states approaches a fixed point (1: the paper).
    refits: int = 1


def _regressors(side: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, side.down)


def _sides(layer: FactorizedLSTMLayer) -> list[str]:
    return [s for s in ("ih", "hh") if isinstance(getattr(layer, s), LowRankLinear)]


class ProjectedStats:
    """Regression statistics for targets that are affine maps of known inputs, target = sum_s (W_s x_s + b_s),
    without forming the targets: cross = sum_s (sum [z;1] x_s^T) W_s^T + (sum [z;1]) (sum_s b_s)^T.

    Cost per row (k+1)(k + 1 + sum_s I_s) instead of (k+1) O plus the O x I_s products of the targets."""

    def __init__(self, regressors: int, maps: list[tuple[torch.Tensor, torch.Tensor]]):
        self.maps = [(w.double(), b.double()) for w, b in maps]
        self.gram = torch.zeros(regressors + 1, regressors + 1, dtype=torch.float64)
        self.moments = [torch.zeros(regressors + 1, w.shape[1], dtype=torch.float64) for w, _ in self.maps]
        self.rows = 0

    def add(self, z: torch.Tensor, inputs: list[torch.Tensor]) -> None:
        """z (N, k), inputs[s] (N, I_s) for each map s."""
        z1 = torch.cat([z, z.new_ones(z.shape[0], 1)], 1).double()
        self.gram += z1.T @ z1
        for moment, x in zip(self.moments, inputs):
            moment += z1.T @ x.double()
        self.rows += z.shape[0]

    def regression(self) -> RegressionStats:
        """The equivalent RegressionStats (energy unknown, set to 0: errors from it are offsets, not ratios)."""
        cross = sum(m @ w.T for m, (w, _) in zip(self.moments, self.maps))
        cross = cross + self.gram[:, -1:] @ sum(b for _, b in self.maps).unsqueeze(0)
        return RegressionStats(self.gram, cross, 0.0, self.rows)


#: Step sizes tried, in order, between the current factors (0) and the least-squares fit (1).
STEPS = (1.0, 0.5, 0.25)


@dataclass
class LayerFit:
    """One refit of one layer. Errors are relative squared errors of the layer's output (hidden states)
    against the uncompressed model's, on all calibration rows, measured by running the layer."""

    layer: FactorizedLSTMLayer
    rows: int
    error_before: float
    error_after: float
    step: float                                  # the step taken towards the fit (0: kept as it was)
    outputs: list[torch.Tensor] = field(default_factory=list)  # the kept layer's outputs (T, B, H) per batch


def _output_error(layer: nn.Module, comp_inputs: Activations, orig_outputs: list[torch.Tensor]
                  ) -> tuple[float, list[torch.Tensor]]:
    outputs, error, energy = [], 0.0, 0.0
    for (x, lengths), h_o in zip(comp_inputs, orig_outputs):
        h, _ = layer(x)
        outputs.append(h)
        error += float(valid_rows(h - h_o, lengths).double().square().sum())
        energy += float(valid_rows(h_o, lengths).double().square().sum())
    return error / max(energy, 1e-30), outputs


def _blend(old: LowRankLinear, up: torch.Tensor, bias: torch.Tensor, step: float) -> LowRankLinear:
    new = LowRankLinear(old.in_features, old.out_features, old.rank, groups=old.groups)
    new.down.copy_(old.down)
    new.up.copy_(old.up + step * (up - old.up))
    new.bias.copy_(old.bias + step * (bias - old.bias))
    return new


@torch.no_grad()
def fit_layer(original: nn.Module, compressed: FactorizedLSTMLayer, orig_inputs: Activations,
              comp_inputs: Activations, *, variant: str = "paper", ridge: float = 1e-7,
              orig_outputs: list[torch.Tensor] | None = None) -> LayerFit:
    """One PSVD step on one layer.

    The least-squares fits (one per side, "paper", or one for both sides, "joint"; per gate for rollout
    factors) use the hidden states of the layer's current version as recurrent regressors. The fitted layer
    then changes its own hidden states, so the fit is checked by running it: the largest step in STEPS towards
    the fit that lowers the layer's measured output error is kept, else the layer stays as it was. The error
    therefore never rises.
    """
    if orig_outputs is None:
        orig_outputs = [original(x)[0] for x, _ in orig_inputs]
    sides = _sides(compressed)
    members = [sides] if variant == "joint" else [[s] for s in sides]
    parts = {s: getattr(compressed, s) for s in ("ih", "hh")}
    groups = parts[sides[0]].groups
    units = [(m, g) for m in members for g in range(groups)]
    target_w = lstm_side_weights(original)
    out = parts[sides[0]].out_features // groups

    def gate_map(side: str, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = target_w[side]
        return w[g * out:(g + 1) * out], b[g * out:(g + 1) * out]

    stats = [ProjectedStats(sum(parts[s].rank for s in unit), [gate_map(s, g) for s in unit]) for unit, g in units]
    rows, error, energy = 0, 0.0, 0.0
    for (x_o, lengths), (x_c, _), h_o in zip(orig_inputs, comp_inputs, orig_outputs):
        h_c, _ = compressed(x_c)
        error += float(valid_rows(h_c - h_o, lengths).double().square().sum())
        energy += float(valid_rows(h_o, lengths).double().square().sum())
        inputs_o = {"ih": valid_rows(x_o, lengths), "hh": valid_rows(shift(h_o), lengths)}
        inputs_c = {"ih": valid_rows(x_c, lengths), "hh": valid_rows(shift(h_c), lengths)}
        rows += inputs_o["ih"].shape[0]
        z_all = {s: _regressors(parts[s], inputs_c[s]) for s in sides}                 # (N, G*r)
        for (unit, g), st in zip(units, stats):
            z = torch.cat([z_all[s][:, g * parts[s].rank:(g + 1) * parts[s].rank] for s in unit], 1)
            st.add(z, [inputs_o[s] for s in unit])
        del h_c, inputs_o, inputs_c, z_all
    before = error / max(energy, 1e-30)
    ups = {s: parts[s].up.detach().clone() for s in sides}
    biases = {s: parts[s].bias.detach().clone() for s in sides}
    for (unit, g), st in zip(units, stats):
        reg = st.regression()
        rows_g = slice(g * out, (g + 1) * out)
        a, c = solve_regression(reg, ridge)
        offset = 0
        for i, s in enumerate(unit):
            r = parts[s].rank
            ups[s][g] = a[:, offset:offset + r].to(ups[s].dtype)
            biases[s][rows_g] = c.to(biases[s].dtype) if i == 0 else 0.0
            offset += r
    for step in STEPS:
        candidate = FactorizedLSTMLayer(
            *[_blend(parts[s], ups[s], biases[s], step) if s in sides else parts[s] for s in ("ih", "hh")],
            compressed.hidden_size)
        after, outputs = _output_error(candidate, comp_inputs, orig_outputs)
        if after < before:
            return LayerFit(candidate, rows, before, after, step, outputs)
        del outputs
    return LayerFit(compressed, rows, before, before, 0.0, [])


def _block_up(up: torch.Tensor) -> torch.Tensor:
    """(G, O/G, r) per-group factors -> the (O, G*r) block-diagonal matrix."""
    return torch.block_diag(*up) if up.shape[0] > 1 else up[0]


LayerHook = Callable[[LayerReport, Transducer, int, int], None]


def psvd(original: Transducer, compressed: Transducer, batches: list[dict[str, torch.Tensor]],
         config: PsvdConfig, *, on_layer: LayerHook | None = None, start: tuple[int, int] = (0, 0)
         ) -> list[LayerReport]:
    """Refit every factorised LSTM layer of ``compressed`` (in place) to ``original`` on calibration batches.

    batches: dicts with features (B, T, F), feature_lengths, labels, label_lengths. ``on_layer(report, model,
    iteration, block)`` is called after each layer (for logging and resumable checkpoints); ``start`` =
    (iteration, block) skips the fits before it (their results are already in ``compressed``).
    """
    if config.variant not in VARIANTS:
        raise ValueError(f"unknown PSVD variant {config.variant!r}; choose one of {', '.join(VARIANTS)}")
    reports: list[LayerReport] = []
    for iteration in range(start[0], config.iterations):
        def visit(o_layer, name, c_layer, orig_acts, comp_acts, block, orig_outputs):
            if not isinstance(c_layer, FactorizedLSTMLayer) or not _sides(c_layer):
                return None
            started = time.perf_counter()
            targets = [x for x, _ in orig_outputs]
            fit = fit_layer(o_layer, c_layer, orig_acts, comp_acts, variant=config.variant, ridge=config.ridge,
                            orig_outputs=targets)
            first_error = fit.error_before
            for _ in range(config.refits - 1):
                if fit.step == 0:
                    break
                again = fit_layer(o_layer, fit.layer, orig_acts, comp_acts, variant=config.variant,
                                  ridge=config.ridge, orig_outputs=targets)
                if again.step == 0:
                    break
                fit = again
            fit.error_before = first_error
            report = LayerReport(iteration + 1, name, {s: getattr(fit.layer, s).rank for s in _sides(fit.layer)},
                                 fit.rows, fit.error_before, fit.error_after, fit.step,
                                 time.perf_counter() - started)
            reports.append(report)
            compressed.set_submodule(name, fit.layer)
            if on_layer:
                on_layer(report, compressed, iteration, block)
            return (fit.layer, fit.outputs) if fit.outputs else fit.layer

        walk_layers(original, compressed, batches, config.components, visit,
                    skip=lambda j, it=iteration: (it, j) < start)
    return reports

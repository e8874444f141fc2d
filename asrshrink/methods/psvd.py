"""PSVD: layer-sequential least-squares post-training of an SVD-compressed model, on calibration data,
without back-propagation: LSTM layers (the paper) and, carried to Conformers, every factorised Linear.

For every factorised LSTM layer, first to last, the layer's pre-activations are fitted to the uncompressed
model's: the input side U_x (V_x x~) + b_x to W_x x + b_x, and the recurrent side U_h (V_h h~) + b_h to
W_h h + b_h, where x, h are the uncompressed model's inputs and hidden states and x~, h~ the compressed
model's (its inputs come from the already-compressed layers before it). The paper solves for an N x N matrix M
applied to the compressed pre-activation; M [U b] spans exactly the affine maps of V x~ (when [U b] has full
column rank), so this module solves for the left factor and bias directly: k + 1 unknowns per output instead
of N, the same optimum. ``variant="joint"`` fits both sides at once to the summed pre-activation (what the
gates see). A factorised Linear (attention, feed-forward, pointwise convolution) is refitted the same way:
U (V x~) + b to W x + b, its inputs from the compressed model with the matrices before it already refitted.
Repeated for several iterations. Statistics are float64 and only the current matrix's are alive.

Dimension letters: T frames, B batch, N rows (valid frames), I inputs, H hidden, O = 4H outputs, k rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from asrshrink.calibrate import Activations
from asrshrink.config import PSVD_VARIANTS, PsvdConfig, PsvdRunConfig, to_json
from asrshrink.methods.registry import Context, Method, Outcome, register
from asrshrink.calibrate.stats import Moments, OutputError
from asrshrink.calibrate.walk import Capture, Solution, shift, valid_rows, walk, walked
from asrshrink.models.base import Transducer
from asrshrink.models.layers import FactorizedLSTMLayer, LowRankLinear, lstm_side_weights, matrices
from asrshrink.models.targets import WeightTarget, select_targets

VARIANTS = PSVD_VARIANTS


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
        """z (N, k), target (N, O): one batch of rows (sums in float64)."""
        batch = Moments(z.shape[1], affine=True, paired=(target.shape[1],))
        batch.add(z, [target])
        self.gram += batch.gram
        self.cross += batch.cross[0]
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


def _regressors(side: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, side.down)


def _sides(layer: nn.Module) -> list[str]:
    """The low-rank sides of a layer (an LSTM layer's "ih" / "hh"), by the matrix interface."""
    return [s for s, m in matrices(layer).items() if m.kind == "lowrank" and s != "linear"]


class ProjectedStats:
    """Regression statistics for targets that are affine maps of known inputs, target = sum_s (W_s x_s + b_s),
    without forming the targets: cross = sum_s (sum [z;1] x_s^T) W_s^T + (sum [z;1]) (sum_s b_s)^T.

    Cost per row (k+1)(k + 1 + sum_s I_s) instead of (k+1) O plus the O x I_s products of the targets."""

    def __init__(self, regressors: int, maps: list[tuple[torch.Tensor, torch.Tensor]]):
        self.maps = [(w.double(), b.double()) for w, b in maps]
        self.moments = Moments(regressors, affine=True, paired=tuple(w.shape[1] for w, _ in self.maps))

    def add(self, z: torch.Tensor, inputs: list[torch.Tensor]) -> None:
        """z (N, k), inputs[s] (N, I_s) for each map s."""
        self.moments.add(z, inputs)

    def regression(self, energy: float = 0.0) -> RegressionStats:
        """The equivalent RegressionStats (with ``energy`` 0, errors from it are offsets, not ratios)."""
        m = self.moments.reduce()
        cross = sum(c @ w.T for c, (w, _) in zip(m.cross, self.maps))
        cross = cross + m.gram[:, -1:] @ sum(b for _, b in self.maps).unsqueeze(0)
        return RegressionStats(m.gram, cross, energy, int(m.rows))


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
    outputs, error = [], OutputError()
    for (x, lengths), h_o in zip(comp_inputs, orig_outputs):
        h, _ = layer(x)
        outputs.append(h)
        error.add(valid_rows(h, lengths), valid_rows(h_o, lengths))
    return error.value(), outputs


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
    rows, error = 0, OutputError()
    for (x_o, lengths), (x_c, _), h_o in zip(orig_inputs, comp_inputs, orig_outputs):
        h_c, _ = compressed(x_c)
        error.add(valid_rows(h_c, lengths), valid_rows(h_o, lengths))
        inputs_o = {"ih": valid_rows(x_o, lengths), "hh": valid_rows(shift(h_o), lengths)}
        inputs_c = {"ih": valid_rows(x_c, lengths), "hh": valid_rows(shift(h_c), lengths)}
        rows += inputs_o["ih"].shape[0]
        z_all = {s: _regressors(parts[s], inputs_c[s]) for s in sides}                 # (N, G*r)
        for (unit, g), st in zip(units, stats):
            z = torch.cat([z_all[s][:, g * parts[s].rank:(g + 1) * parts[s].rank] for s in unit], 1)
            st.add(z, [inputs_o[s] for s in unit])
        del h_c, inputs_o, inputs_c, z_all
    before = error.value()
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


class LstmRefit:
    """Walk solver: PSVD of one factorised LSTM layer (``fit_layer``, ``refits`` times). It keeps the batches'
    inputs and the original layer's outputs (the walk's current activations) until it is solved."""

    needs_original = True
    needs_compressed_output = False  # fit_layer runs the compressed layer itself

    def __init__(self, original: nn.Module, compressed: FactorizedLSTMLayer, config: "PsvdConfig"):
        self.original, self.compressed, self.config = original, compressed, config
        self.orig_inputs: Activations = []
        self.comp_inputs: Activations = []
        self.targets: list[torch.Tensor] = []
        self.result: LayerFit | None = None

    def add_batch(self, capture: Capture) -> None:
        self.orig_inputs.append((capture.original_input, capture.lengths))
        self.comp_inputs.append((capture.compressed_input, capture.lengths))
        self.targets.append(capture.original_output)

    def solve(self) -> Solution:
        c = self.config
        fit = fit_layer(self.original, self.compressed, self.orig_inputs, self.comp_inputs, variant=c.variant,
                        ridge=c.ridge, orig_outputs=self.targets)
        first_error = fit.error_before
        for _ in range(c.refits - 1):
            if fit.step == 0:
                break
            again = fit_layer(self.original, fit.layer, self.orig_inputs, self.comp_inputs, variant=c.variant,
                              ridge=c.ridge, orig_outputs=self.targets)
            if again.step == 0:
                break
            fit = again
        fit.error_before = first_error
        self.result = fit
        ranks = {s: getattr(fit.layer, s).rank for s in _sides(fit.layer)}
        return Solution(fit.layer, fit.outputs or None), ranks

    def free(self) -> None:
        self.orig_inputs, self.comp_inputs, self.targets = [], [], []


class LinearRefit:
    """Walk solver: PSVD of one factorised Linear, U (V x~) + b fitted to W x + b by least squares, x the
    original model's inputs and x~ the compressed model's. A linear map's output error is a quadratic of its
    parameters, so the least-squares fit is the best step and both errors come from the statistics."""

    needs_original = True
    needs_compressed_output = True

    def __init__(self, original: nn.Module, compressed: LowRankLinear, config: "PsvdConfig"):
        target = matrices(original)["linear"]
        self.weight, self.bias = target.weight.double(), target.bias.double()
        self.compressed, self.ridge = compressed, config.ridge
        self.stats = ProjectedStats(compressed.rank, [(target.weight, target.bias)])
        self.before = OutputError()

    def add_batch(self, capture: Capture) -> None:
        x_c, x_o = capture.rows(capture.compressed_input), capture.rows(capture.original_input)
        self.stats.add(torch.nn.functional.linear(x_c, self.compressed.down), [x_o])
        self.before.add(capture.rows(capture.compressed_output),
                        torch.nn.functional.linear(x_o.double(), self.weight, self.bias))

    def solve(self) -> tuple[Solution, dict]:
        before = self.before.value()
        reg = self.stats.regression(energy=float(self.before.sums[1]))
        up, bias = solve_regression(reg, self.ridge)
        after = regression_error(reg, up, bias)
        old = self.compressed
        self.result = LayerFit(old, reg.rows, before, before, 0.0)
        if after < before:
            new = LowRankLinear(old.in_features, old.out_features, old.rank, bias=True)
            with torch.no_grad():
                new.down.copy_(old.down)
                new.up.copy_(up.unsqueeze(0).to(old.up.dtype))
                new.bias.copy_(bias.to(new.bias.dtype))
            self.result = LayerFit(new, reg.rows, before, after, 1.0)
        return Solution(self.result.layer if self.result.step else None), {"linear": old.rank}

    def free(self) -> None:
        self.stats = None


def refit_targets(compressed: Transducer, components: tuple[str, ...], include: tuple[str, ...] = (),
                  ignore: tuple[str, ...] = ()) -> list[WeightTarget]:
    """The factorised matrices PSVD refits: low-rank targets of ``components`` reached by the walk."""
    targets = select_targets(compressed.weight_targets(list(components)), include, ignore) if (include or ignore) \
        else compressed.weight_targets(list(components))
    return [t for t in walked(compressed, targets) if t.kind == "lowrank"]


LayerHook = Callable[[list[LayerReport], Transducer, int, tuple[int, int]], None]


def psvd(original: Transducer, compressed: Transducer, batches: list[dict[str, torch.Tensor]],
         config: PsvdConfig, *, on_layer: LayerHook | None = None, start: tuple[int, int, int] | None = None,
         targets: list[WeightTarget] | None = None) -> list[LayerReport]:
    """Refit every factorised matrix of ``compressed`` (in place) to ``original`` on calibration batches.

    batches: dicts with features (B, T, F), feature_lengths, labels, label_lengths. ``targets``: the matrices
    to refit (default: every low-rank matrix of ``config.components`` the walk reaches). ``on_layer(reports,
    model, iteration, position)`` is called after each group of matrices the walk solves (for logging and
    resumable checkpoints); ``start`` = the (iteration, block, group) last done skips the fits up to it (their
    results are already in ``compressed``).
    """
    if config.variant not in VARIANTS:
        raise ValueError(f"unknown PSVD variant {config.variant!r}; choose one of {', '.join(VARIANTS)}")
    if targets is None:
        targets = refit_targets(compressed, config.components)
    reports: list[LayerReport] = []
    first = 0 if start is None else start[0]
    for iteration in range(first, config.iterations):
        pending: list[LayerReport] = []

        def make_solver(layer, group, o_module, c_module, position, iteration=iteration):
            kinds = {side: m.kind for side, m in matrices(c_module).items()}
            if kinds.get("linear") == "lowrank":
                solver = LinearRefit(o_module, matrices(c_module)["linear"].factors, config)
            elif _sides(c_module):
                solver = LstmRefit(o_module, c_module, config)
            else:
                return None
            return _Reporting(solver, iteration + 1, layer, pending)

        def on_group(position, iteration=iteration):
            reports.extend(pending)
            if on_layer:
                on_layer(list(pending), compressed, iteration, position)
            pending.clear()

        walk(original, compressed, batches, targets, make_solver, on_group=on_group,
             skip=lambda position, it=iteration: start is not None and (it, *position) <= tuple(start))
    return reports


class _Reporting:
    """A refit solver that also times itself and adds its LayerReport to ``pending``."""

    needs_original = True

    def __init__(self, solver, iteration: int, layer: str, pending: list[LayerReport]):
        self.solver, self.iteration, self.layer, self.pending = solver, iteration, layer, pending
        self.needs_compressed_output = solver.needs_compressed_output
        self.started = time.perf_counter()

    def add_batch(self, capture: Capture) -> None:
        self.solver.add_batch(capture)

    def solve(self) -> Solution:
        solution, ranks = self.solver.solve()
        fit = self.solver.result
        self.pending.append(LayerReport(self.iteration, self.layer, ranks, fit.rows, fit.error_before,
                                        fit.error_after, fit.step, time.perf_counter() - self.started))
        return solution

    def free(self) -> None:
        self.solver.free()


# --- the registered method ------------------------------------------------------------------------------------

def _psvd_core(config: PsvdRunConfig, ctx: Context) -> Outcome:
    """SVD (plain or data-aware), then PSVD, checkpointing after every group of refitted matrices."""
    from asrshrink.methods.svd import apply_svd, plan_svd

    choices, targets = plan_svd(config.svd, ctx)
    saved = ctx.progress
    rows: list[dict] = list(saved["layers"]) if saved else []
    if saved is not None:
        compressed = ctx.resumed_model
        start = (saved["iteration"], *saved["position"])
        ctx.log(f"resuming in iteration {saved['iteration'] + 1} after block {saved['position'][0]}, "
                f"group {saved['position'][1]}")
    else:
        compressed, start = apply_svd(config.svd, choices, targets, ctx), None
    chosen = {c.layer for c in choices}
    refit = [t for t in refit_targets(compressed, config.psvd.components) if t.layer in chosen]

    def on_layer(reports: list[LayerReport], model, iteration: int, position: tuple[int, int]) -> None:
        for report in reports:
            rows.append(report.to_json())
            ctx.log(f"iteration {report.iteration} {report.layer} ranks {report.ranks} rows {report.rows}: "
                    f"relative output error {report.error_before:.4f} -> {report.error_after:.4f} "
                    f"(step {report.step:g}, {report.seconds:.1f} s)")
        if ctx.checkpoint:
            ctx.checkpoint(model, {"iteration": iteration, "position": list(position), "layers": rows})

    psvd(ctx.original, compressed, ctx.batches, config.psvd, on_layer=on_layer, start=start, targets=refit)
    return Outcome(compressed, [c.to_json() for c in choices], rows)


def _psvd_options(config: PsvdRunConfig) -> dict:
    return {**to_json(config.svd), "psvd": to_json(config.psvd)}


register(Method("psvd", PsvdRunConfig, _psvd_core, calibrated=lambda config: True, options=_psvd_options,
                resumable=True))

"""Truncated SVD of weight matrices (LSTM sides, Linears): the pure factorisation, rank rules, and the
model-level method (plain, or data-aware through the calibration walk).

Dimension letters: O outputs (4H for an LSTM side), I inputs, G row groups (1 stacked, 4 per gate), r rank.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from asrshrink.calibrate.stats import Moments, cholesky_scale
from asrshrink.calibrate.walk import Capture, Solution, shift, walk, walked
from asrshrink.config import SVD_MODES, SvdConfig
from asrshrink.methods.registry import Context, Method, Outcome, register
from asrshrink.errors import AsrshrinkError
from asrshrink.models.base import Transducer
from asrshrink.models.layers import FactorizedLSTMLayer, LowRankLinear, lstm_side_weights, matrices
from asrshrink.models.targets import WeightTarget, select_targets

MODES = SVD_MODES


def rank_for_threshold(rows: int, cols: int, threshold: float) -> int:
    """Keep the top ceil(threshold * min(rows, cols)) singular values (the PSVD paper's threshold)."""
    return max(1, math.ceil(threshold * min(rows, cols) - 1e-9))


def factorisation_saves(rows: int, cols: int, rank: int) -> bool:
    """Whether rank-r factors (r (rows + cols) numbers) are smaller than the dense (rows x cols) block."""
    return rank * (rows + cols) < rows * cols


def svd_factors(weight: torch.Tensor, rank: int, *, groups: int = 1, scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factors of each of ``groups`` row blocks of ``weight`` (O, I).

    Returns up (G, O/G, r) and down (G*r, I) with block g equal to up[g] @ down[g*r:(g+1)*r]. The singular
    values are split evenly (sqrt into each factor). With ``scale`` S (I, I) invertible, the truncation is
    optimal for W S instead of W, and down is mapped back by S^-1: with S the lower Cholesky factor of the
    inputs' second moment E[x x^T], this minimises the expected output error E||(W - W_r) x||^2 (data-aware).
    Computed in float64, returned in weight's dtype.
    """
    w = weight.to(torch.float64)
    blocks = w.unflatten(0, (groups, w.shape[0] // groups))                    # (G, O/G, I)
    if scale is not None:
        blocks = blocks @ scale.to(torch.float64)
    u, s, vh = torch.linalg.svd(blocks, full_matrices=False)                   # (G,O/G,k), (G,k), (G,k,I)
    root = s[:, :rank].sqrt()
    up = u[:, :, :rank] * root.unsqueeze(1)                                    # (G, O/G, r)
    down = root.unsqueeze(-1) * vh[:, :rank]                                   # (G, r, I)
    if scale is not None:  # down S^-1, by a triangular solve of S^T X^T = down^T
        down = torch.linalg.solve_triangular(scale.to(torch.float64).T, down.transpose(1, 2), upper=True
                                             ).transpose(1, 2)
    return up.to(weight.dtype), down.flatten(0, 1).to(weight.dtype)


def lowrank_from_svd(weight: torch.Tensor, bias: torch.Tensor, rank: int, *, groups: int = 1,
                     scale: torch.Tensor | None = None) -> LowRankLinear:
    out, inp = weight.shape
    module = LowRankLinear(inp, out, rank, groups=groups)
    up, down = svd_factors(weight, rank, groups=groups, scale=scale)
    with torch.no_grad():
        module.up.copy_(up)
        module.down.copy_(down)
        module.bias.copy_(bias)
    return module


def dense_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    module = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    return module


@dataclass(frozen=True)
class SideChoice:
    """What happens to one weight of one layer: an LSTM side ("ih", "hh") or a Linear ("linear")."""

    layer: str            # dotted module name in the model
    side: str
    rows: int             # O
    cols: int             # I
    groups: int           # 1, or 4 for per-gate (rollout) factors of an LSTM side
    rank: int | None      # None: kept dense
    reason: str

    @property
    def params(self) -> int:
        """Weight parameters after the choice (biases not counted)."""
        if self.rank is None:
            return self.rows * self.cols
        return self.rank * (self.groups * self.cols + self.rows)

    def to_json(self) -> dict:
        return {"layer": self.layer, "side": self.side, "shape": [self.rows, self.cols], "groups": self.groups,
                "rank": self.rank, "status": self.reason}


def choose_ranks(model: Transducer, components: list[str], *, threshold: float | None = None,
                 rank: int | None = None, mode: str = "stacked",
                 ranks: dict[tuple[str, str], int | None] | None = None,
                 targets: list[WeightTarget] | None = None) -> list[SideChoice]:
    """For each weight target of the chosen components (``targets``, default all of them; low-rank factors
    excepted): the rank to keep (by ``ranks``, else ``rank``, else ``threshold``), or None where factorising
    would not save parameters."""
    if mode not in MODES:
        raise AsrshrinkError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    if targets is None:
        targets = model.weight_targets(components)
    choices = []
    for t in targets:
        if t.kind == "lowrank":
            continue
        groups = MODES[mode] if t.lstm else 1
        rows = t.rows // groups
        if ranks is not None:
            r = ranks.get(t.key)
        elif rank is not None:
            r = min(rank, rows, t.cols)
        else:
            r = rank_for_threshold(rows, t.cols, threshold)
        if r is None:
            reason = "kept dense by the budget" if ranks is not None else "not factorised"
        elif not factorisation_saves(rows, t.cols, r):
            reason, r = f"rank {r} >= {rows}x{t.cols}/({rows}+{t.cols}): no saving, kept dense", None
        else:
            reason = "factorised" + (" (its pruned zeros are not kept)" if t.kind == "sparse" else "")
        choices.append(SideChoice(t.layer, t.side, t.rows, t.cols, groups, r, reason))
    return choices


def factorize_layer(layer: nn.Module, sides: dict[str, SideChoice],
                    scales: dict[str, torch.Tensor] | None = None) -> FactorizedLSTMLayer | None:
    """The factorised version of one LSTM layer (or Linear, side "linear") per its side choices (None when
    every side stays dense)."""
    if all(c.rank is None for c in sides.values()):
        return None
    if "linear" in sides:
        m = matrices(layer)["linear"]
        return lowrank_from_svd(m.weight, m.bias, sides["linear"].rank,
                                scale=None if scales is None else scales.get("linear"))
    weights = lstm_side_weights(layer)
    parts = {}
    for side in ("ih", "hh"):
        weight, bias = weights[side]
        choice = sides.get(side)
        if choice is None or choice.rank is None:
            parts[side] = dense_linear(weight, bias)
        else:
            scale = None if scales is None else scales.get(side)
            parts[side] = lowrank_from_svd(weight, bias, choice.rank, groups=choice.groups, scale=scale)
    return FactorizedLSTMLayer(parts["ih"], parts["hh"], layer.hidden_size)


def _by_layer(choices: list[SideChoice]) -> dict[str, dict[str, SideChoice]]:
    out: dict[str, dict[str, SideChoice]] = {}
    for choice in choices:
        out.setdefault(choice.layer, {})[choice.side] = choice
    return out


def svd_compress(model: Transducer, choices: list[SideChoice]) -> Transducer:
    """A copy of ``model`` whose chosen matrices are truncated-SVD factorised."""
    new = copy.deepcopy(model)
    _factorise_in_place(new, choices)
    return new.eval()


def _factorise_in_place(model: Transducer, choices: list[SideChoice]) -> None:
    for layer_name, sides in _by_layer(choices).items():
        replacement = factorize_layer(model.get_submodule(layer_name), sides)
        if replacement is not None:
            model.set_submodule(layer_name, replacement)


class ScaleSolver:
    """Data-aware SVD of one module (walk solver): the second moment of each chosen matrix's inputs on the
    compressed model, then the truncation of W S (S its Cholesky factor); with ``choices`` None, only the
    scales are kept (in ``found``) and the module is left as it is. An LSTM layer's recurrent inputs are the
    hidden states of the original layer on the compressed inputs."""

    needs_original = False

    def __init__(self, original: nn.Module, sides: dict[str, SideChoice] | None, targets: list[WeightTarget],
                 found: dict[tuple[str, str], torch.Tensor] | None = None):
        self.original, self.sides, self.found = original, sides, found
        self.needs_compressed_output = sides is None and any(t.side == "hh" for t in targets)
        self.layer = targets[0].layer
        self.moments = {t.side: Moments(t.cols) for t in targets}

    def add_batch(self, capture: Capture) -> None:
        for side, moment in self.moments.items():
            if side == "hh":
                hidden = capture.compressed_output if self.sides is None else self.original(capture.compressed_input)[0]
                moment.add(capture.rows(shift(hidden)))
            else:
                moment.add(capture.rows(capture.compressed_input))

    def solve(self) -> Solution:
        scales = {side: cholesky_scale(m.mean()) for side, m in self.moments.items()}
        if self.sides is None:
            self.found.update({(self.layer, side): scale for side, scale in scales.items()})
            return Solution(None)
        return Solution(factorize_layer(self.original, self.sides, scales))

    def free(self) -> None:
        self.moments = {}


def data_aware_svd_compress(model: Transducer, choices: list[SideChoice], batches: list[dict[str, torch.Tensor]],
                            targets: list[WeightTarget] | None = None) -> Transducer:
    """SVD truncation that minimises each matrix's output error on calibration inputs (SVD of W S).

    The walk factorises matrices in forward order; a matrix's input statistics come from the already-compressed
    matrices before it (an LSTM layer's recurrent statistics from the original layer's hidden states on
    those inputs). Matrices no walk reaches (the joint) get plain truncation.
    """
    by_layer = _by_layer(choices)
    chosen = {(c.layer, c.side) for c in choices if c.rank is not None}
    if targets is None:
        targets = model.weight_targets(list(dict.fromkeys(_component(model, c.layer) for c in choices)))
    reached = [t for t in walked(model, targets) if t.key in chosen]
    compressed = copy.deepcopy(model).eval()

    def make_solver(layer, group, o_module, c_module, position):
        sides = {t.side: by_layer[layer][t.side] for t in group if t.key in chosen}
        return ScaleSolver(o_module, sides, [t for t in group if t.key in chosen]) if sides else None

    walk(model, compressed, batches, reached, make_solver, original_inputs=False)
    done = {t.layer for t in reached}
    _factorise_in_place(compressed, [c for c in choices if c.layer not in done])
    return compressed.eval()


def _component(model: Transducer, layer: str) -> str:
    paths = {id(m): n for n, m in model.named_modules()}
    for name, module in model.components().items():
        prefix = paths[id(module)]
        if layer == prefix or layer.startswith(prefix + "."):
            return name
    raise AsrshrinkError(f"{layer} is in no component of this model")


# --- per-layer ranks under a global budget -------------------------------------------------------------------

def error_curve(weight: torch.Tensor, groups: int = 1, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Relative truncation error for every rank r = 0..min(O/G, I): sum of the dropped squared singular values
    (of W, or of W S when ``scale`` is given: the output error on the calibration inputs) over the total."""
    w = weight.to(torch.float64).unflatten(0, (groups, weight.shape[0] // groups))
    if scale is not None:
        w = w @ scale.to(torch.float64)
    energy = torch.linalg.svdvals(w).square()                              # (G, k)
    tail = energy.sum(0).flip(0).cumsum(0).flip(0)                          # dropped energy from rank r on
    curve = torch.cat([tail, tail.new_zeros(1)])
    return curve / curve[0].clamp(min=1e-30)


def allocate_ranks(curves: dict[tuple[str, str], torch.Tensor], shapes: dict[tuple[str, str], tuple[int, int, int]],
                   budget: int) -> dict[tuple[str, str], int | None]:
    """Ranks that minimise the summed relative error with at most ``budget`` weight parameters in total.

    shapes[(layer, side)] = (O, I, G). A side may also stay dense (error 0, O*I parameters). Solved by a
    Lagrange multiplier on parameters, bisected until the budget is met; each side then picks its best
    rank independently.
    """
    def options(key):
        rows, cols, groups = shapes[key]
        curve = curves[key]
        ranks = [r for r in range(1, len(curve)) if factorisation_saves(rows // groups, cols, r)]
        return [(r, float(curve[r]), r * (groups * cols + rows)) for r in ranks] + [(None, 0.0, rows * cols)]

    table = {key: options(key) for key in curves}

    def pick(lam: float):
        chosen = {key: min(opts, key=lambda o: o[1] + lam * o[2]) for key, opts in table.items()}
        return chosen, sum(o[2] for o in chosen.values())

    smallest = sum(min(o[2] for o in opts) for opts in table.values())
    if budget < smallest:
        raise AsrshrinkError(f"the budget of {budget:,} weight parameters is below the smallest factorisation "
                             f"({smallest:,} at rank 1 everywhere); ask for less compression")
    lo, hi = 0.0, 1.0
    while pick(hi)[1] > budget:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pick(mid)[1] > budget else (lo, mid)
    chosen, cost = pick(hi)
    # The multiplier only reaches points on each side's lower convex hull (a side near its no-saving rank
    # jumps to dense); spend what is left greedily, one rank step at a time, best error drop per parameter.
    while True:
        best = None
        for key, opts in table.items():
            current = chosen[key]
            for option in opts:
                extra = option[2] - current[2]
                gain = current[1] - option[1]
                if 0 < extra <= budget - cost and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, key, option)
        if best is None:
            break
        _, key, option = best
        cost += option[2] - chosen[key][2]
        chosen[key] = option
    return {key: option[0] for key, option in chosen.items()}


def input_scales(model: Transducer, batches: list[dict[str, torch.Tensor]], components: tuple[str, ...],
                 targets: list[WeightTarget] | None = None) -> dict[tuple[str, str], torch.Tensor]:
    """Cholesky factors of every walked matrix's input second moment on calibration data, in the original
    model."""
    scales: dict[tuple[str, str], torch.Tensor] = {}
    reached = walked(model, targets if targets is not None else model.weight_targets(list(components)))
    walk(model, model, batches, reached,
         lambda layer, group, o_module, c_module, position: ScaleSolver(o_module, None, group, scales),
         original_inputs=False)
    return scales


def budget_ranks(model: Transducer, components: list[str], *, mode: str, compression_ratio: float | None = None,
                 target_params: int | None = None, scales: dict[tuple[str, str], torch.Tensor] | None = None,
                 targets: list[WeightTarget] | None = None) -> dict[tuple[str, str], int | None]:
    """Per-side ranks meeting a global size: ``compression_ratio`` of the chosen components' parameters, or
    ``target_params`` parameters for the whole model. Errors are measured per side (data-aware with
    ``scales``) and the budget goes where it removes the most error per parameter."""
    full = choose_ranks(model, components, rank=1, mode=mode, targets=targets)  # every side, shape and groups
    shapes = {(c.layer, c.side): (c.rows, c.cols, c.groups) for c in full}
    weights = {(c.layer, c.side): matrices(model.get_submodule(c.layer))[c.side].weight for c in full}
    dense_weights = sum(rows * cols for rows, cols, _ in shapes.values())
    known = model.components()
    component_params = sum(p.numel() for name in components for p in known[name].parameters())
    model_params = sum(p.numel() for p in model.parameters())
    if compression_ratio is not None:
        if compression_ratio <= 1:
            raise AsrshrinkError(f"--compression-ratio must be above 1, got {compression_ratio}")
        budget = int(component_params / compression_ratio) - (component_params - dense_weights)
    elif target_params is not None:
        budget = int(target_params) - (model_params - dense_weights)
    else:
        raise AsrshrinkError("give --compression-ratio or --target-params")
    curves = {key: error_curve(w, shapes[key][2], None if scales is None else scales.get(key))
              for key, w in weights.items()}
    return allocate_ranks(curves, shapes, budget)


# --- the registered method ------------------------------------------------------------------------------------

def plan_svd(config: SvdConfig, ctx: Context) -> tuple[list[SideChoice], list[WeightTarget]]:
    """The rank of every chosen matrix (by the threshold, the rank, or the budget), logging what stays dense."""
    original = ctx.original
    targets = select_targets(original.weight_targets(list(config.components)), config.targets, config.ignore)
    ranks = None
    if config.budgeted:
        ctx.log("measuring per-layer truncation errors for the budget")
        scales = input_scales(original, ctx.batches, config.components, targets) if config.data_aware else None
        ranks = budget_ranks(original, list(config.components), mode=config.mode, scales=scales,
                             compression_ratio=config.compression_ratio, target_params=config.target_params,
                             targets=targets)
    choices = choose_ranks(original, list(config.components), threshold=config.threshold, rank=config.rank,
                           mode=config.mode, ranks=ranks, targets=targets)
    for choice in choices:
        if choice.rank is None:
            ctx.log(f"{choice.layer} {choice.side} {choice.rows}x{choice.cols}: {choice.reason}")
    return choices, targets


def apply_svd(config: SvdConfig, choices: list[SideChoice], targets: list[WeightTarget], ctx: Context) -> Transducer:
    ctx.log(("data-aware " if config.data_aware else "")
            + f"truncated SVD of {sum(c.rank is not None for c in choices)} matrices")
    if config.data_aware:
        return data_aware_svd_compress(ctx.original, choices, ctx.batches, targets)
    return svd_compress(ctx.original, choices)


def _svd_core(config: SvdConfig, ctx: Context) -> Outcome:
    if config.structure == "projection":
        from asrshrink.methods.projection import projection_core

        return projection_core(config, ctx)
    choices, targets = plan_svd(config, ctx)
    return Outcome(apply_svd(config, choices, targets, ctx), [c.to_json() for c in choices])


register(Method("svd", SvdConfig, _svd_core, calibrated=lambda config: config.data_aware))

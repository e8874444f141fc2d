"""Truncated SVD of LSTM weight matrices: the pure factorisation, rank rules, and the model-level method.

Dimension letters: O outputs (4H for an LSTM side), I inputs, G row groups (1 stacked, 4 per gate), r rank.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from asrshrink.errors import AsrshrinkError
from asrshrink.models.base import Transducer
from asrshrink.models.layers import (FactorizedLSTMLayer, LowRankLinear, lstm_side_weights, named_lstm_layers)

MODES = {"stacked": 1, "rollout": 4}


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
                 ranks: dict[tuple[str, str], int | None] | None = None) -> list[SideChoice]:
    """For each LSTM side and Linear of the chosen components: the rank to keep (by ``ranks``, else ``rank``,
    else ``threshold``), or None where factorising would not save parameters."""
    if mode not in MODES:
        raise AsrshrinkError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
    known = model.components()
    unknown = [c for c in components if c not in known]
    if unknown:
        raise AsrshrinkError(f"unknown component(s) {unknown}; this model has {', '.join(known)}")
    paths = {id(m): n for n, m in model.named_modules()}
    choices = []
    for component in components:
        prefix = paths[id(known[component])]
        lstm_names = {name for name, _ in named_lstm_layers(known[component])}
        for name, layer in _factorisable(known[component]):
            full = f"{prefix}.{name}" if name else prefix
            if name in lstm_names:
                sides = {side: w.shape for side, (w, _) in lstm_side_weights(layer).items()}
                groups = MODES[mode]
            else:
                sides, groups = {"linear": layer.weight.shape}, 1
            for side, (out_rows, cols) in sides.items():
                rows = out_rows // groups
                if ranks is not None:
                    r = ranks.get((full, side))
                elif rank is not None:
                    r = min(rank, rows, cols)
                else:
                    r = rank_for_threshold(rows, cols, threshold)
                if r is None:
                    reason = "kept dense by the budget" if ranks is not None else "not factorised"
                elif not factorisation_saves(rows, cols, r):
                    reason, r = f"rank {r} >= {rows}x{cols}/({rows}+{cols}): no saving, kept dense", None
                else:
                    reason = "factorised"
                choices.append(SideChoice(full, side, out_rows, cols, groups, r, reason))
    return choices


def _factorisable(component: nn.Module) -> list[tuple[str, nn.Module]]:
    """LSTM layers and plain Linear layers of a component (not the Linears inside factorised LSTM layers)."""
    lstms = named_lstm_layers(component)
    inside = tuple(name + "." for name, _ in lstms)
    linears = [(n, m) for n, m in component.named_modules()
               if type(m) is nn.Linear and not n.startswith(inside)]
    return sorted(lstms + linears, key=lambda item: [n for n, _ in component.named_modules()].index(item[0]))


def factorize_layer(layer: nn.Module, sides: dict[str, SideChoice],
                    scales: dict[str, torch.Tensor] | None = None) -> FactorizedLSTMLayer | None:
    """The factorised version of one LSTM layer (or Linear, side "linear") per its side choices (None when
    every side stays dense)."""
    if all(c.rank is None for c in sides.values()):
        return None
    if "linear" in sides:
        return lowrank_from_svd(layer.weight.detach(), _bias(layer), sides["linear"].rank,
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


def _bias(layer: nn.Linear) -> torch.Tensor:
    return layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features)


def _by_layer(choices: list[SideChoice]) -> dict[str, dict[str, SideChoice]]:
    out: dict[str, dict[str, SideChoice]] = {}
    for choice in choices:
        out.setdefault(choice.layer, {})[choice.side] = choice
    return out


def svd_compress(model: Transducer, choices: list[SideChoice]) -> Transducer:
    """A copy of ``model`` whose chosen LSTM sides are truncated-SVD factorised."""
    new = copy.deepcopy(model)
    for layer_name, sides in _by_layer(choices).items():
        replacement = factorize_layer(new.get_submodule(layer_name), sides)
        if replacement is not None:
            new.set_submodule(layer_name, replacement)
    return new.eval()


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


@torch.no_grad()
def data_aware_svd_compress(model: Transducer, choices: list[SideChoice], batches: list[dict[str, torch.Tensor]]
                            ) -> Transducer:
    """SVD truncation that minimises each layer's output error on calibration inputs (SVD of W S).

    Layers are factorised first to last; a layer's input statistics come from the already-compressed layers
    before it, its recurrent statistics from the original layer's hidden states on those inputs.
    """
    from asrshrink.calibrate import shift, valid_rows, walk_layers

    by_layer = _by_layer(choices)
    lstm_layers = {c.layer for c in choices if c.side != "linear"}
    components = tuple(name for name, module in model.components().items()
                       if any(n in lstm_layers for n, _ in _walkable(model, name)))
    compressed = copy.deepcopy(model).eval()

    def visit(o_layer, name, c_layer, orig_acts, comp_acts, index, orig_outputs):
        sides = {k: v for k, v in by_layer.get(name, {}).items() if k != "linear"}
        if not sides or all(c.rank is None for c in sides.values()):
            return None
        grams = {"ih": 0.0, "hh": 0.0}
        rows = 0
        for x, lengths in comp_acts:
            h, _ = o_layer(x)
            xs, hs = valid_rows(x, lengths), valid_rows(shift(h), lengths)
            grams["ih"] = grams["ih"] + (xs.T @ xs).double()
            grams["hh"] = grams["hh"] + (hs.T @ hs).double()
            rows += xs.shape[0]
        scales = {side: cholesky_scale(grams[side] / max(rows, 1)) for side in grams}
        return factorize_layer(o_layer, sides, scales)

    walk_layers(model, compressed, batches, components, visit)
    # Linear layers (the joint) have no calibration walk: they get plain truncation.
    for layer_name, sides in by_layer.items():
        if "linear" in sides:
            replacement = factorize_layer(compressed.get_submodule(layer_name), sides)
            if replacement is not None:
                compressed.set_submodule(layer_name, replacement)
    return compressed.eval()


def _walkable(model: Transducer, component: str) -> list[tuple[str, nn.Module]]:
    try:
        return [(b.name, b.layer) for b in model.blocks(component)]
    except AsrshrinkError:
        return []


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


@torch.no_grad()
def input_scales(model: Transducer, batches: list[dict[str, torch.Tensor]], components: tuple[str, ...]
                 ) -> dict[tuple[str, str], torch.Tensor]:
    """Cholesky factors of every LSTM side's input second moment on calibration data, in the original model."""
    from asrshrink.calibrate import shift, valid_rows, walk_layers

    scales: dict[tuple[str, str], torch.Tensor] = {}

    def visit(o_layer, name, c_layer, orig_acts, comp_acts, index, orig_outputs):
        grams = {"ih": 0.0, "hh": 0.0}
        rows = 0
        for (x, lengths), (h, _) in zip(orig_acts, orig_outputs):
            xs, hs = valid_rows(x, lengths), valid_rows(shift(h), lengths)
            grams["ih"] = grams["ih"] + (xs.T @ xs).double()
            grams["hh"] = grams["hh"] + (hs.T @ hs).double()
            rows += xs.shape[0]
        for side, gram in grams.items():
            scales[(name, side)] = cholesky_scale(gram / max(rows, 1))
        return None

    walkable = tuple(c for c in components if _walkable(model, c))
    walk_layers(model, model, batches, walkable, visit)
    return scales


def budget_ranks(model: Transducer, components: list[str], *, mode: str, compression_ratio: float | None = None,
                 target_params: int | None = None, scales: dict[tuple[str, str], torch.Tensor] | None = None
                 ) -> dict[tuple[str, str], int | None]:
    """Per-side ranks meeting a global size: ``compression_ratio`` of the chosen components' parameters, or
    ``target_params`` parameters for the whole model. Errors are measured per side (data-aware with
    ``scales``) and the budget goes where it removes the most error per parameter."""
    full = choose_ranks(model, components, rank=1, mode=mode)  # every side, with its shape and groups
    shapes = {(c.layer, c.side): (c.rows, c.cols, c.groups) for c in full}
    weights = {}
    for c in full:
        layer = model.get_submodule(c.layer)
        weights[(c.layer, c.side)] = (layer.weight.detach() if c.side == "linear"
                                      else lstm_side_weights(layer)[c.side][0])
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

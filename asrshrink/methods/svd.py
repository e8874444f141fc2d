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
                    reason = "kept dense by the budget"
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
    raise ValueError("calibration second moment is not positive definite")


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

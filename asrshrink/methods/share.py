"""Weight sharing after training: the shared weights chosen in closed form from calibration data, optional low
rank on the shared matrices (factors shared across the group, optionally a per-layer low-rank residual), and
layer-sequential refits of the per-layer parts, as PSVD refits.

The least-squares merge of the matrices W_l (O, I) with biases b_l of a group's members, each reading its own
inputs X_l in the original model: W* = argmin sum_l ||W X_l - W_l X_l||^2, solved from the members' Gram
matrices G_l = sum [x;1][x;1]^T (a bias is a weight on a constant 1). A shared bias is merged with the weight;
a per-layer bias (``--unshare misc``) absorbs each member's mean, so the weight is merged on centred inputs.
Damping lambda adds lambda ||W - W_l||^2 per member (lambda = ``damping`` x the mean diagonal of G_l), which
keeps identical members exact and moves towards the mean on scarce data.

Dimension letters: O outputs, I inputs, N rows, K rank, r residual rank.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from asrshrink.calibrate.stats import Moments, OutputError, cholesky_scale
from asrshrink.calibrate.walk import Capture, Solution, shift, walk, walked
from asrshrink.config import ShareConfig, to_json
from asrshrink.errors import AsrshrinkError
from asrshrink.methods.registry import Context, Method, Outcome, register
from asrshrink.models.layers import (BasisLinear, LowRankLinear, ResidualLinear, channel_features, channel_map,
                                     matrices, set_channel_map)
from asrshrink.training.loop import CHECKPOINT, read_training_progress
from asrshrink.models.sharing import (ShareLayout, SharingPlan, apply_plan, build_plan, get_tensor,
                                      layer_shapes_match, plan_aliases)

# --- pure math ------------------------------------------------------------------------------------------------


def _augmented(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.cat([weight.double(), bias.double().unsqueeze(1)], 1)            # (O, I+1)


def _damp(gram: torch.Tensor, damping: float) -> torch.Tensor:
    k = gram.shape[0]
    return damping * float(gram.diagonal()[: max(k - 1, 1)].mean().clamp(min=1e-12)) * torch.eye(
        k, dtype=torch.float64)


def centred(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From an augmented Gram sum [x;1][x;1]^T (I+1, I+1): the centred sum (x - mu)(x - mu)^T (I, I) and mu (I,)."""
    n = gram[-1, -1].clamp(min=1.0)
    mu = gram[:-1, -1] / n
    return gram[:-1, :-1] - n * torch.outer(mu, mu), mu


def merge_least_squares(weights: list[torch.Tensor], biases: list[torch.Tensor], grams: list[torch.Tensor], *,
                        shared_bias: bool = True, damping: float = 0.01
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The least-squares shared weight of a group: weights[l] (O, I), biases[l] (O,), grams[l] the augmented
    Gram (I+1, I+1) of member l's inputs. Returns W* (O, I) and each member's bias (O,): all the same merged
    bias when ``shared_bias``, else b_l + (W_l - W*) mu_l. float64 solves, results in the weights' dtype."""
    dtype = weights[0].dtype
    if shared_bias:
        lhs = sum(g.double() + _damp(g.double(), damping) for g in grams)
        rhs = sum(_augmented(w, b) @ (g.double() + _damp(g.double(), damping))
                  for w, b, g in zip(weights, biases, grams))
        merged = torch.linalg.solve(lhs, rhs.T).T                                      # (O, I+1)
        w, b = merged[:, :-1], merged[:, -1]
        return w.to(dtype), [b.to(dtype)] * len(weights)
    stats = [centred(g.double()) for g in grams]
    lhs = sum(c + _damp(c, damping) for c, _ in stats)
    rhs = sum(w.double() @ (c + _damp(c, damping)) for w, (c, _) in zip(weights, stats))
    w = torch.linalg.solve(lhs, rhs.T).T
    return w.to(dtype), [(b.double() + (wl.double() - w) @ mu).to(dtype)
                         for wl, b, (_, mu) in zip(weights, biases, stats)]


def merge_mean(weights: list[torch.Tensor], biases: list[torch.Tensor], *, shared_bias: bool = True
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The members' mean weight (and mean bias when shared, else each member's own)."""
    w = torch.stack(weights).mean(0)
    return w, [torch.stack(biases).mean(0)] * len(biases) if shared_bias else list(biases)


def merge_pick(weights: list[torch.Tensor], biases: list[torch.Tensor], *, shared_bias: bool = True
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The first member's weight (and bias when shared, else each member's own)."""
    return weights[0], [biases[0]] * len(biases) if shared_bias else list(biases)


def group_error(weights: list[torch.Tensor], biases: list[torch.Tensor], grams: list[torch.Tensor],
                new_weights: list[torch.Tensor], new_biases: list[torch.Tensor]) -> float:
    """sum_l ||[W'_l b'_l] [x;1] - [W_l b_l] [x;1]||^2 / sum_l ||[W_l b_l] [x;1]||^2 over each member's inputs
    (from their Gram matrices): the group's relative output error on the calibration data."""
    num = den = 0.0
    for w, b, g, nw, nb in zip(weights, biases, grams, new_weights, new_biases):
        a, d = _augmented(w, b), _augmented(nw, nb) - _augmented(w, b)
        g = g.double()
        num += float(((d @ g) * d).sum())
        den += float(((a @ g) * a).sum())
    return num / max(den, 1e-300)


def merge_channels(weights: list[torch.Tensor], biases: list[torch.Tensor], grams: list[torch.Tensor], *,
                   shared_bias: bool = True, damping: float = 0.01) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``merge_least_squares`` for per-channel affine maps (norms, depthwise convolutions): weights[l] (C, F),
    biases[l] (C,), grams[l] (C, F+1, F+1) the per-channel augmented Gram of member l's features; each channel
    is merged on its own. Returns the merged weight (C, F) and each member's bias (C,)."""
    dtype = weights[0].dtype

    def damp(g: torch.Tensor) -> torch.Tensor:  # (C, k, k) -> per channel damping x mean diagonal
        k = g.shape[-1]
        size = g.diagonal(dim1=-2, dim2=-1)[:, : max(k - 1, 1)].mean(-1).clamp(min=1e-12)
        return damping * size[:, None, None] * torch.eye(k, dtype=torch.float64)

    if shared_bias:
        lhs = sum(g.double() + damp(g.double()) for g in grams)
        rhs = sum((g.double() + damp(g.double())) @ torch.cat([w.double(), b.double()[:, None]], 1)[..., None]
                  for w, b, g in zip(weights, biases, grams))
        merged = torch.linalg.solve(lhs, rhs)[..., 0]                                   # (C, F+1)
        return merged[:, :-1].to(dtype), [merged[:, -1].to(dtype)] * len(weights)
    stats = []
    for g in grams:
        g = g.double()
        n = g[:, -1, -1].clamp(min=1.0)
        mu = g[:, :-1, -1] / n[:, None]                                                 # (C, F)
        stats.append((g[:, :-1, :-1] - n[:, None, None] * mu[:, :, None] * mu[:, None, :], mu))
    lhs = sum(c + damp(c) for c, _ in stats)
    rhs = sum((c + damp(c)) @ w.double()[..., None] for w, (c, _) in zip(weights, stats))
    merged = torch.linalg.solve(lhs, rhs)[..., 0]
    return merged.to(dtype), [(b.double() + ((w.double() - merged) * mu).sum(-1)).to(dtype)
                              for w, b, (_, mu) in zip(weights, biases, stats)]


def channel_error(weights: list[torch.Tensor], biases: list[torch.Tensor], grams: list[torch.Tensor],
                  new_weights: list[torch.Tensor], new_biases: list[torch.Tensor]) -> float:
    """``group_error`` of per-channel maps (C, F) with per-channel Grams (C, F+1, F+1)."""
    num = den = 0.0
    for w, b, g, nw, nb in zip(weights, biases, grams, new_weights, new_biases):
        a = torch.cat([w.double(), b.double()[:, None]], 1)
        d = torch.cat([nw.double(), nb.double()[:, None]], 1) - a
        g = g.double()
        num += float(torch.einsum("cf,cfg,cg->", d, g, d))
        den += float(torch.einsum("cf,cfg,cg->", a, g, a))
    return num / max(den, 1e-300)


def lowrank_factors(weight: torch.Tensor, rank: int, gram: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-aware rank-K factors up (O, K), down (K, I) of ``weight`` for inputs with Gram ``gram`` (I, I) (the
    SVD of W S, S its Cholesky factor; plain SVD without a Gram), each direction's two factors of equal norm."""
    from asrshrink.methods.svd import svd_factors

    scale = cholesky_scale(gram) if gram is not None else None
    up, down = svd_factors(weight, rank, scale=scale)
    # balanced: the Grams here are sums over the calibration frames, so the split of W S's singular values
    # would leave down smaller than up by about the square root of the frame count
    down, (up,) = _balanced(down.double(), [up[0].double()], weight.dtype)
    return up, down


def shared_basis(weights: list[torch.Tensor], biases: list[torch.Tensor], grams: list[torch.Tensor] | None,
                 rank: int, *, ridge: float = 1e-9) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Basis Sharing's factors of a group's matrices W_l (O, I): one input basis D (K, I) for all and per-layer
    coefficients U_l (O, K) with biases, W_l ~ U_l D. D spans the top-K right singular directions of the stacked
    [W_1; ...; W_n] S, S the Cholesky factor of the members' summed (centred) input second moments; each U_l,
    b_l is then the least-squares fit on member l's own inputs: U_l = W_l C_l D^T (D C_l D^T)^-1 (C_l its
    centred Gram) and b_l absorbing the mean. ``grams``: the members' augmented Grams (None: plain SVD of the
    stack, U_l = W_l D^+). Returns D, [U_l], [b_l]."""
    ws = [w.double() for w in weights]
    if grams is None:
        _, _, vh = torch.linalg.svd(torch.cat(ws, 0), full_matrices=False)
        basis = vh[:rank]                                                          # orthonormal rows
        return _balanced(basis, [w @ basis.T for w in ws], weights[0].dtype) + ([b.clone() for b in biases],)
    stats = [centred(g.double()) for g in grams]                                   # (C_l, mean_l)
    scale = cholesky_scale(sum(c for c, _ in stats))
    _, _, vh = torch.linalg.svd(torch.cat(ws, 0) @ scale, full_matrices=False)
    basis = torch.linalg.solve_triangular(scale.T, vh[:rank].T, upper=True).T     # V_K^T S^-1, (K, I)
    coefficients, new_biases = [], []
    for w, b, (c, mean) in zip(ws, biases, stats):
        gram = basis @ c @ basis.T
        gram = gram + ridge * float(gram.diagonal().mean().clamp(min=1e-30)) * torch.eye(rank, dtype=gram.dtype)
        u = torch.linalg.solve(gram, basis @ c @ w.T).T                           # (O, K)
        coefficients.append(u)
        new_biases.append((b.double() + (w - u @ basis) @ mean).to(b.dtype))
    return _balanced(basis, coefficients, weights[0].dtype) + (new_biases,)


def _balanced(basis: torch.Tensor, coefficients: list[torch.Tensor], dtype: torch.dtype
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same products U_l D with each basis row and its coefficient columns scaled to equal norms (the row's
    against the columns' root mean square over the layers), as an SVD splits its singular values: a whitened
    basis is otherwise orders of magnitude smaller than its coefficients, which makes gradient steps on it
    (a repair) far too large."""
    rows = basis.norm(dim=1).clamp(min=1e-30)                                      # (K,)
    columns = torch.stack([u.norm(dim=0) for u in coefficients]).pow(2).mean(0).sqrt().clamp(min=1e-30)
    s = (columns / rows).sqrt()
    return (basis * s.unsqueeze(1)).to(dtype), [(u / s).to(dtype) for u in coefficients]


# --- statistics: each member's input Gram in the original model --------------------------------------------------

class GramSolver:
    """Walk solver that keeps the augmented Gram of each chosen matrix's inputs (an LSTM layer's recurrent
    inputs are its hidden states h_{t-1}) and leaves the module as it is."""

    needs_original = False

    def __init__(self, targets, found: dict[tuple[str, str], torch.Tensor]):
        self.layer, self.found = targets[0].layer, found
        self.needs_compressed_output = any(t.side == "hh" for t in targets)
        self.moments = {t.side: Moments(t.cols, affine=True) for t in targets}

    def add_batch(self, capture: Capture) -> None:
        for side, moment in self.moments.items():
            x = shift(capture.compressed_output) if side == "hh" else capture.compressed_input
            moment.add(capture.rows(x))

    def solve(self) -> Solution:
        for side, moment in self.moments.items():
            self.found[(self.layer, side)] = moment.reduce().gram.clone()
        return Solution(None)

    def free(self) -> None:
        self.moments = {}


class ChannelGramSolver:
    """Walk solver that keeps the per-channel augmented Gram (C, F+1, F+1) of a per-channel affine module's
    features (``layers.channel_features``: a norm's normalised input, a depthwise convolution's windows)."""

    needs_original = False
    needs_compressed_output = False

    def __init__(self, module: nn.Module, layer: str, found: dict[tuple[str, str], torch.Tensor]):
        self.module, self.layer, self.found = module, layer, found
        weight, _ = channel_map(module)
        channels, features = weight.shape
        self.gram = torch.zeros(channels, features + 1, features + 1, dtype=torch.float64)

    def add_batch(self, capture: Capture) -> None:
        f = channel_features(self.module, capture.compressed_input)                   # (B, T, C, F)
        rows = capture.rows(f.flatten(2)).view(-1, f.shape[2], f.shape[3]).double()   # (N, C, F)
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], rows.shape[1], 1)], -1)
        self.gram += torch.einsum("ncf,ncg->cfg", rows, rows)

    def solve(self) -> Solution:
        from asrshrink.calibrate.stats import all_reduce

        all_reduce(self.gram)
        self.found[(self.layer, "channels")] = self.gram
        return Solution(None)

    def free(self) -> None:
        pass


def statistics_keys(model, layout: ShareLayout) -> set[tuple[str, str]]:
    """(module name, side) of every matrix and per-channel map of ``layout``'s layers that the merges read."""
    keys = {(_module_name(layer, rel), side) for layer in layout.layers for rel, side in layout.matrices.values()}
    keys |= {(_module_name(layer, rel), "channels") for layer in layout.layers for rel in layout.channels.values()
             if channel_map(model.get_submodule(_module_name(layer, rel))) is not None}
    return keys


def member_grams(model, batches: list, keys: set[tuple[str, str]]) -> dict[tuple[str, str], torch.Tensor]:
    """Augmented input Grams of ``keys`` ((module name, side)) in ``model``, streamed block by block over the
    calibration batches: (I+1, I+1) for a matrix, (C, F+1, F+1) for a per-channel map (side "channels")."""
    from asrshrink.methods.svd import _component
    from asrshrink.models.targets import WeightTarget

    found: dict[tuple[str, str], torch.Tensor] = {}
    components = list(model.components())
    targets = [t for t in walked(model, model.weight_targets(components)) if t.key in keys]
    channel_targets = []
    for name, side in sorted(keys):
        if side == "channels":  # features laid out (B, T, C, F): rows select as a batch-first input's
            weight, _ = channel_map(model.get_submodule(name))
            channel_targets.append(WeightTarget(name, "channels", weight.shape[0], weight.shape[1],
                                                _component(model, name), "dense", "batch_first"))
    targets += walked(model, channel_targets)

    def make_solver(layer, group, o, c, position):
        if group[0].side == "channels":
            return ChannelGramSolver(o, layer, found)
        return GramSolver(group, found)

    walk(model, model, batches, targets, make_solver, original_inputs=False)
    return found


# --- building the shared model ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Construction:
    """How the shared weights are made: ``init`` pick / mean / ls, ``low_rank`` K of the ``low_rank_parts``
    (``shared_basis``: only the input-side factor shared), ``residual_rank`` r per layer."""

    init: str = "ls"
    damping: float = 0.01
    low_rank: int | None = None
    low_rank_parts: tuple[tuple[str, str], ...] = ()
    residual_rank: int | None = None
    #: Low rank of a shared group as one input basis (K, I) with per-layer coefficients (O, K) and biases
    #: (Basis Sharing), instead of both factors shared.
    shared_basis: bool = False


def _module_name(layer: str, rel: str) -> str:
    return f"{layer}.{rel}" if rel else layer


def _without_bias(gram: torch.Tensor) -> torch.Tensor:
    """An augmented Gram whose constant row is decoupled from the inputs, so a merged bias stays 0."""
    out = gram.clone()
    out[:-1, -1] = 0
    out[-1, :-1] = 0
    return out


def _merge_channel_maps(original, model, plan: SharingPlan, layout: ShareLayout, c: "Construction",
                        grams: dict) -> list[dict]:
    """Every shared per-channel map (norms, batch norms, depthwise convolutions) merged as a map (pick, mean, or
    per channel by least squares), written into each member of ``model``; one report row per group."""
    rows = []
    for (kind, sub), rel in layout.channels.items():
        if channel_map(original.get_submodule(_module_name(plan.layers[0], rel))) is None:
            continue
        shared_w, shared_b = plan.shared(kind, sub, sub in layout.misc_parts), plan.shared(kind, sub, True)
        if not shared_w:
            continue
        for group in plan.groups(kind):
            if len(group) < 2:
                continue
            names = [_module_name(plan.layers[l], rel) for l in group]
            maps = [channel_map(original.get_submodule(n)) for n in names]
            ws, bs = [m[0] for m in maps], [m[1] for m in maps]
            gs = [grams[(n, "channels")] for n in names]
            if c.init == "ls":
                merged, new_bs = merge_channels(ws, bs, gs, shared_bias=shared_b, damping=c.damping)
            else:
                merged, new_bs = (merge_mean if c.init == "mean" else merge_pick)(ws, bs, shared_bias=shared_b)
            for name, bias in zip(names, new_bs):
                set_channel_map(model.get_submodule(name), merged, bias)
            error = channel_error(ws, bs, gs, [merged] * len(ws), new_bs)
            rows.append({"layer": names[0], "side": "channels", "shape": list(ws[0].shape), "groups": 1,
                         "rank": None, "status": f"shared by {len(group)} layers ({c.init}, per channel); calibration "
                                                 f"output error {error:.4g}", "module": kind, "part": sub,
                         "members": names, "init": c.init, "error": error, "residual_rank": None})
    return rows


def _write_linear(model, name: str, weight: torch.Tensor, bias: torch.Tensor | None, *, factors=None,
                  residual=None) -> None:
    """Replace the Linear ``name`` by one computing ``weight`` (or low-rank ``factors`` (up, down)) + ``bias``
    (None: no bias), plus a per-layer residual (up, down)."""
    out, inp = weight.shape
    if factors is not None:
        base = LowRankLinear(inp, out, factors[0].shape[1], bias=bias is not None)
        with torch.no_grad():
            base.up.copy_(factors[0].unsqueeze(0))
            base.down.copy_(factors[1])
    else:
        base = nn.Linear(inp, out, bias=bias is not None)
        with torch.no_grad():
            base.weight.copy_(weight)
    if bias is not None:
        with torch.no_grad():
            base.bias.copy_(bias)
    if residual is not None:
        res = LowRankLinear(inp, out, residual[0].shape[1], bias=False)
        with torch.no_grad():
            res.up.copy_(residual[0].unsqueeze(0))
            res.down.copy_(residual[1])
        base = ResidualLinear(base, res)
    model.set_submodule(name, base)


def _write_basis(model, names: list[str], side: str, ws, bs, gs, rank: int, has_bias: bool, kind: str,
                 sub: str) -> dict:
    """A group's matrices as one shared input basis and per-layer coefficients (``shared_basis``), written into
    ``model`` as ``BasisLinear`` modules (the plan ties their bases); the group's report row."""
    if side != "linear":
        raise AsrshrinkError(f"--shared-basis factorises Linear matrices; {names[0]} is an LSTM layer")
    basis, coefficients, new_bs = shared_basis(ws, bs, gs, rank)
    for name, u, b in zip(names, coefficients, new_bs):
        module = BasisLinear(ws[0].shape[1], ws[0].shape[0], rank, bias=has_bias)
        with torch.no_grad():
            module.basis.weight.copy_(basis)
            module.coefficients.weight.copy_(u)
            if has_bias:
                module.coefficients.bias.copy_(b)
        model.set_submodule(name, module)
    error = group_error(ws, bs, gs, [u @ basis for u in coefficients], new_bs) if gs is not None else None
    return {"layer": names[0], "side": side, "shape": list(ws[0].shape), "groups": 1, "rank": rank,
            "status": f"one basis for {len(names)} layers ({'data-aware' if gs is not None else 'plain'}), rank "
                      f"{rank}, coefficients per layer" + (f"; calibration output error {error:.4g}"
                                                           if error is not None else ""),
            "module": kind, "part": sub, "members": names, "init": "basis", "error": error, "residual_rank": None}


def _write_lstm_side(model, name: str, side: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    lstm = model.get_submodule(name).lstm
    with torch.no_grad():
        getattr(lstm, f"weight_{side}_l0").copy_(weight)
        getattr(lstm, f"bias_{side}_l0").copy_(bias)


def share_model(original, plan: SharingPlan, construction: Construction,
                grams: dict[tuple[str, str], torch.Tensor] | None) -> tuple[object, list[dict]]:
    """A copy of ``original`` sharing its weights by ``plan``, the shared values chosen by ``construction``
    (``grams``: ``member_grams`` of ``statistics_keys``, each matrix's and per-channel map's augmented input
    Grams in the original model, needed by ls and data-aware low rank; None: pick and mean tensor by tensor,
    plain SVD). Returns the model and one report row per matrix (or per-channel map) group."""
    c = construction
    layout: ShareLayout = original.sharing_layout(plan.component)
    plan.check(layout)
    layer_shapes_match(original, layout, plan)
    model = copy.deepcopy(original).eval()
    rows: list[dict] = []
    keys = list(original.state_dict(keep_vars=True))
    matrix_modules = {(kind, sub) for kind, sub in layout.matrices}
    if grams is not None:  # per-channel maps merged as maps below (and their calibration error reported)
        matrix_modules |= {part for part, rel in layout.channels.items()
                           if channel_map(original.get_submodule(_module_name(plan.layers[0], rel))) is not None}
        rows += _merge_channel_maps(original, model, plan, layout, c, grams)
    # tensors that are not matrices (norms, batch norm, depthwise convolutions, position biases): pick or mean
    for kind in layout.modules:
        for group in plan.groups(kind):
            if len(group) < 2:
                continue
            first = plan.layers[group[0]]
            for key in keys:
                if not key.startswith(first + "."):
                    continue
                rel = key[len(first) + 1:]
                part = layout.classify(rel)
                if part is None or part[0] != kind or (kind, part[1]) in matrix_modules or not plan.shared(*part):
                    continue
                values = [get_tensor(original, f"{plan.layers[l]}.{rel}").detach() for l in group]
                value = values[0] if c.init == "pick" else torch.stack(values).to(torch.float64).mean(0)
                with torch.no_grad():
                    get_tensor(model, key).copy_(value.to(values[0].dtype))
    for (kind, sub), (rel, side) in layout.matrices.items():
        shared_w, shared_b = plan.shared(kind, sub, False), plan.shared(kind, sub, True)
        low = c.low_rank if (kind, sub) in c.low_rank_parts else None
        for group in plan.groups(kind) if shared_w else [[i] for i in range(len(plan.layers))]:
            names = [_module_name(plan.layers[l], rel) for l in group]
            mats = [matrices(original.get_submodule(n))[side] for n in names]
            ws, bs = [m.weight for m in mats], [m.bias for m in mats]
            gs = [grams[(n, side)] for n in names] if grams is not None else None
            has_bias = side != "linear" or original.get_submodule(names[0]).bias is not None
            if not has_bias:  # no bias to merge: the weight alone, on the inputs' uncentred second moment
                shared_b = True
                gs = [_without_bias(g) for g in gs] if gs is not None else None
            if len(group) == 1 and low is None:
                continue
            if low is not None and c.shared_basis and len(group) > 1:
                rows.append(_write_basis(model, names, side, ws, bs, gs, min(low, *ws[0].shape), has_bias, kind,
                                         sub))
                continue
            if len(group) == 1:
                merged, new_bs = ws[0], list(bs)
            elif c.init == "ls":
                merged, new_bs = merge_least_squares(ws, bs, gs, shared_bias=shared_b, damping=c.damping)
            elif c.init == "mean":
                merged, new_bs = merge_mean(ws, bs, shared_bias=shared_b)
            else:
                merged, new_bs = merge_pick(ws, bs, shared_bias=shared_b)
            factors, base = None, merged
            if low is not None:
                whole = sum(centred(g.double())[0] if not shared_b else g.double()[:-1, :-1] for g in gs) \
                    if gs is not None else None
                rank = min(low, *merged.shape)
                factors = lowrank_factors(merged, rank, whole)
                base = factors[0] @ factors[1]
            residuals = [None] * len(group)
            if c.residual_rank is not None and len(group) > 1:
                for i, (w, g) in enumerate(zip(ws, gs or [None] * len(group))):
                    gram = centred(g.double())[0] if g is not None else None
                    residuals[i] = lowrank_factors(w - base, min(c.residual_rank, *w.shape), gram)
            effective = [base + (r[0] @ r[1] if r is not None else 0) for r in residuals]
            if c.init == "ls" and gs is not None and not shared_b and (low is not None or c.residual_rank):
                new_bs = [(b.double() + (w.double() - e.double()) @ centred(g.double())[1]).to(b.dtype)
                          for w, b, e, g in zip(ws, bs, effective, gs)]
            for i, name in enumerate(names):
                if side == "linear":
                    _write_linear(model, name, base, new_bs[i] if has_bias else None, factors=factors,
                                  residual=residuals[i])
                elif low is not None or residuals[i] is not None:
                    raise AsrshrinkError(f"--low-rank and --residual-rank factorise Linear matrices; {name} is an "
                                         f"LSTM layer")
                else:
                    _write_lstm_side(model, name, side, base, new_bs[i])
            error = group_error(ws, bs, gs, effective, new_bs) if gs is not None else None
            status = (f"shared by {len(group)} layers ({c.init})" if len(group) > 1 else "per layer") + \
                (f", rank {factors[0].shape[1]}" if factors else "") + \
                (f", residual rank {c.residual_rank}" if residuals[0] is not None else "") + \
                (f"; calibration output error {error:.4g}" if error is not None else "")
            rows.append({"layer": names[0], "side": side, "shape": list(ws[0].shape), "groups": 1,
                         "rank": factors[0].shape[1] if factors else None, "status": status,
                         "module": kind, "part": sub, "members": names, "init": c.init, "error": error,
                         "residual_rank": c.residual_rank if residuals[0] is not None else None})
    apply_plan(model, plan)
    return model.eval(), rows


# --- layer-sequential refits of the per-layer parts ---------------------------------------------------------------

class PartRefit:
    """Walk solver for one Linear of a shared model whose per-layer parts are refitted on the compressed model's
    own inputs x~ to the original's outputs W x + b: a per-layer dense matrix (weight and bias), a per-layer
    bias of a shared matrix, a per-layer residual's up factor (and bias), or the coefficients (and bias) on a
    shared basis. Least squares, in place; kept only where the calibration output error drops."""

    needs_original = True
    needs_compressed_output = True

    def __init__(self, original: nn.Module, compressed: nn.Module, fit_weight: bool, fit_bias: bool,
                 ridge: float = 1e-7):
        from asrshrink.methods.psvd import RegressionStats

        target = matrices(original)["linear"]
        self.weight, self.bias = target.weight.double(), target.bias.double()
        self.module, self.fit_weight, self.fit_bias, self.ridge = compressed, fit_weight, fit_bias, ridge
        self.residual = compressed.residual if isinstance(compressed, ResidualLinear) else None
        self.basis = compressed if isinstance(compressed, BasisLinear) else None
        k = self.residual.rank if self.residual is not None else self.basis.rank if self.basis is not None else (
            compressed.in_features if fit_weight else 0)
        self.stats = RegressionStats.empty(k, self.weight.shape[0])
        self.before = OutputError()
        self.result: tuple[float, float, int] | None = None

    def _fixed(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the module's output that is not refitted (shared weights; the shared bias)."""
        m = self.module
        if self.residual is not None:
            base = m.base
            out = base(x) - (base.bias if base.bias is not None and self.fit_bias else 0)
            return out
        if self.fit_weight or self.basis is not None:
            return torch.zeros(x.shape[0], self.weight.shape[0], dtype=x.dtype)
        return m(x) - m.bias

    def _regressors(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual is not None:
            return nn.functional.linear(x, self.residual.down)
        if self.basis is not None:
            return self.basis.basis(x)
        return x if self.fit_weight else x[:, :0]

    def add_batch(self, capture: Capture) -> None:
        x_c, x_o = capture.rows(capture.compressed_input), capture.rows(capture.original_input)
        reference = nn.functional.linear(x_o.double(), self.weight, self.bias)
        self.before.add(capture.rows(capture.compressed_output), reference)
        self.stats.add(self._regressors(x_c), reference - self._fixed(x_c).double())

    def solve(self) -> Solution:
        from asrshrink.methods.psvd import regression_error, solve_regression

        before = self.before.value()
        stats = self.stats
        reference_energy = float(self.before.sums[1])
        if self.fit_bias:
            a, c = solve_regression(stats, self.ridge)
        else:  # no intercept: the bias is shared
            k = stats.gram.shape[0] - 1
            gram = stats.gram[:k, :k] + self.ridge * float(stats.gram.diagonal()[:k].mean()) * torch.eye(
                k, dtype=torch.float64)
            a = torch.linalg.solve(gram, stats.cross[:k]).T
            c = torch.zeros(a.shape[0], dtype=torch.float64)
        # the fit's target is the reference less the fixed part: its residual over the reference's energy
        after = regression_error(stats, a, c) * stats.energy / max(reference_energy, 1e-300)
        self.result = (before, after, stats.rows)
        if after < before:
            m = self.module
            with torch.no_grad():
                if self.residual is not None:
                    self.residual.up.copy_(a.unsqueeze(0).to(self.residual.up.dtype))
                    if self.fit_bias:
                        m.base.bias.copy_(c.to(m.base.bias.dtype))
                elif self.basis is not None:
                    m.coefficients.weight.copy_(a.to(m.coefficients.weight.dtype))
                    if self.fit_bias:
                        m.coefficients.bias.copy_(c.to(m.coefficients.bias.dtype))
                else:
                    if self.fit_weight:
                        m.weight.copy_(a.to(m.weight.dtype))
                    if self.fit_bias:
                        m.bias.copy_(c.to(m.bias.dtype))
        else:
            self.result = (before, before, stats.rows)
        return Solution(None)

    def free(self) -> None:
        self.stats = None


def refit(original, model, plan: SharingPlan, batches: list, iterations: int, log=lambda line: None
          ) -> list[dict]:
    """``iterations`` layer-sequential passes over the per-layer parts of ``model``'s shared layers' Linears
    (in place); one report row per refitted matrix and pass."""
    layout = model.sharing_layout(plan.component)
    tied = plan_aliases(plan, layout, model.state_dict(keep_vars=True).keys())
    aliases = set(tied) | set(tied.values())  # every key of a shared tensor, its physical layer's included
    parts = {}
    for layer in plan.layers:
        for (kind, sub), (rel, side) in layout.matrices.items():
            if side != "linear":
                continue
            name = _module_name(layer, rel)
            module = model.get_submodule(name)
            if isinstance(module, ResidualLinear):
                parts[name] = (False, module.bias is not None and f"{name}.base.bias" not in aliases)
                continue
            if isinstance(module, BasisLinear):  # the coefficients and bias are this layer's own
                parts[name] = (False, module.bias is not None)
                continue
            weight_key = f"{name}.weight" if isinstance(module, nn.Linear) else f"{name}.down"
            own_weight = weight_key not in aliases and isinstance(module, nn.Linear)
            own_bias = module.bias is not None and f"{name}.bias" not in aliases
            if own_weight or own_bias and weight_key in aliases:
                parts[name] = (own_weight, own_bias)
    targets = [t for t in walked(model, model.weight_targets([plan.component])) if t.layer in parts]
    rows: list[dict] = []
    for iteration in range(iterations):
        def make_solver(layer, group, o_module, c_module, position, iteration=iteration):
            solver = PartRefit(o_module, c_module, *parts[layer])
            return _Timed(solver, iteration + 1, layer, rows, log)

        walk(original, model, batches, targets, make_solver)
    return rows


class _Timed:
    needs_original = True
    needs_compressed_output = True

    def __init__(self, solver: PartRefit, iteration: int, layer: str, rows: list, log):
        self.solver, self.iteration, self.layer, self.rows, self.log = solver, iteration, layer, rows, log
        self.started = time.perf_counter()

    def add_batch(self, capture: Capture) -> None:
        self.solver.add_batch(capture)

    def solve(self) -> Solution:
        solution = self.solver.solve()
        before, after, n = self.solver.result
        row = {"iteration": self.iteration, "layer": self.layer, "ranks": {}, "rows": n, "error_before": before,
               "error_after": after, "step": 1.0 if after < before else 0.0,
               "seconds": time.perf_counter() - self.started}
        self.rows.append(row)
        self.log(f"refit {self.iteration} {self.layer}: relative output error {before:.4f} -> {after:.4f}")
        return solution

    def free(self) -> None:
        self.solver.free()


# --- calibration error of a whole model, and the plans a budget allows ----------------------------------------

@torch.no_grad()
def encoder_error(original, model, batches: list) -> float:
    """The relative error of ``model``'s encoder output against ``original``'s on the calibration batches."""
    error = OutputError()
    for b in batches:
        ref, lengths = original.encode(b["features"], b["feature_lengths"])
        out, _ = model.encode(b["features"], b["feature_lengths"])
        mask = torch.arange(ref.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        error.add(out[mask], ref[mask])
    return error.value()


def params(model) -> int:
    """Physical parameters (a shared tensor counts once)."""
    return sum(p.numel() for p in model.parameters())


def candidate_plans(layout: ShareLayout, config: ShareConfig) -> list[tuple[str, SharingPlan]]:
    """The plans a budget search considers: every repeat factor R = 1..L (adjacent groups of R layers) of the
    configured modules and unshared parts."""
    out = []
    for r in range(1, len(layout.layers) + 1):
        out.append((f"repeat {r}", build_plan(layout, repeat=str(r), modules=config.share_modules,
                                              unshare=config.unshare)))
    return out


# --- the registered method ------------------------------------------------------------------------------------

def construction(config: ShareConfig, layout: ShareLayout) -> Construction:
    if config.refit_iterations and not any(side == "linear" for _, side in layout.matrices.values()):
        raise AsrshrinkError("--refit-iterations refits Linear matrices; this family's shared layers have none")
    for option, value in (("--low-rank", config.low_rank), ("--residual-rank", config.residual_rank)):
        if value is not None and not layout.low_rank_parts:
            raise AsrshrinkError(f"{option} factorises Linear matrices; this family's shared layers have none")
    parts = []
    for name in config.low_rank_parts if config.low_rank is not None else ():
        kind, _, sub = name.partition(".")
        chosen = [p for p in layout.low_rank_parts if p[0] == kind and (not sub or p[1] == sub)]
        if not chosen:
            known = sorted({k for k, _ in layout.low_rank_parts} | {f"{k}.{s}" for k, s in layout.low_rank_parts})
            raise AsrshrinkError(f"--low-rank-parts {name}: not a Linear sub-component of this model; choose from "
                                 f"{', '.join(known) or 'none (this family has no Linear sub-components)'}")
        parts += chosen
    if config.shared_basis and (config.low_rank is None or config.residual_rank is not None):
        raise AsrshrinkError("--shared-basis is a form of --low-rank K (one basis per group, coefficients per layer); "
                             "give --low-rank K and drop --residual-rank")
    return Construction(config.init, config.damping, config.low_rank, tuple(dict.fromkeys(parts)),
                        config.residual_rank, config.shared_basis)


def check_options(config: ShareConfig, model) -> None:
    """Refuse options that do not fit ``model`` (its layout, the plan, the low-rank parts) before calibration."""
    if model.sharing is not None:
        raise AsrshrinkError("the model already shares weights; run share on the unshared model")
    if config.data is not None and not Path(config.data).exists():
        raise AsrshrinkError(f"--data {config.data}: no such file or folder; pass the repair's training speech")
    layout = model.sharing_layout(config.component)
    construction(config, layout)
    if not config.budgeted:
        plan = build_plan(layout, repeat=config.repeat, groups=config.groups, modules=config.share_modules,
                          unshare=config.unshare)
        layer_shapes_match(model, layout, plan)


def _share_core(config: ShareConfig, ctx: Context) -> Outcome:
    original = ctx.original
    if original.sharing is not None:
        raise AsrshrinkError("the model already shares weights; run share on the unshared model")
    layout = original.sharing_layout(config.component)
    build = construction(config, layout)
    grams = None
    if ctx.batches:  # ls and data-aware low rank solve from them; every init reports its calibration error
        keys = statistics_keys(original, layout)
        ctx.log(f"input statistics of {len(keys)} matrices and per-channel maps on {len(ctx.batches)} calibration batches")
        grams = member_grams(original, ctx.batches, keys)
    figures: dict = {}
    if config.budgeted:
        budget = _budget(original, config)
        ctx.log(f"budget: {budget:,} parameters; measuring the candidate plans")
        tried = []
        best = None
        for label, plan in candidate_plans(layout, config):
            try:
                model, rows = share_model(original, plan, build, grams)
            except AsrshrinkError as exc:
                tried.append({"plan": label, "params": None, "error": None, "status": str(exc)})
                continue
            count = params(model)
            if count > budget:
                tried.append({"plan": label, "params": count, "error": None, "status": "over the budget"})
                continue
            error = encoder_error(original, model, ctx.batches)
            tried.append({"plan": label, "params": count, "error": error, "status": "meets the budget"})
            ctx.log(f"{label}: {count:,} parameters, encoder output error {error:.4f}")
            if best is None or error < best[0]:
                best = (error, label, model, rows, plan)
        if best is None:
            smallest = min((t["params"] for t in tried if t["params"] is not None), default=None)
            raise AsrshrinkError(f"no sharing plan meets the budget of {budget:,} parameters (the smallest has "
                                 f"{smallest:,}); add --low-rank, share more modules or ask for less compression"
                                 if smallest is not None else f"no sharing plan could be built: {tried[0]['status']}")
        _, label, model, rows, plan = best
        for t in tried:
            t["chosen"] = t["plan"] == label
        figures["candidates"] = tried
        ctx.log(f"chosen: {label}")
    else:
        plan = build_plan(layout, repeat=config.repeat, groups=config.groups, modules=config.share_modules,
                          unshare=config.unshare)
        model, rows = share_model(original, plan, build, grams)
    post = refit(original, model, plan, ctx.batches, config.refit_iterations, ctx.log) \
        if config.refit_iterations else None
    if config.finetune_steps:
        from asrshrink.training.distill import repair

        if ctx.source_path is None:
            raise AsrshrinkError("--finetune-steps needs MODEL's file as the teacher; run share through run_method")
        if ctx.batches:
            figures["calibration_encoder_error_before_repair"] = encoder_error(original, model, ctx.batches)
        ctx.log(f"repair: {config.finetune_steps} distillation steps on {config.data}, MODEL as the teacher"
                + (" (resumed)" if ctx.resume else ""))
        model = repair(model, config.distill_config(str(ctx.source_path)), ctx).model
    if ctx.batches:
        figures["calibration_encoder_error"] = encoder_error(original, model, ctx.batches)
        ctx.log(f"encoder output error on the calibration data: {figures['calibration_encoder_error']:.4f}")
    figures["plan"] = plan.summary()
    for row in rows:
        ctx.log(f"{row['layer']} ({row['module']}.{row['part']}): {row['status']}")
    return Outcome(model, rows, post, figures=figures)


def _budget(original, config: ShareConfig) -> int:
    if config.target_params is not None:
        return int(config.target_params)
    component = sum(p.numel() for p in original.components()[config.component].parameters())
    return params(original) - component + int(component / config.compression_ratio)


def _calibrated(config: ShareConfig) -> bool:
    """Every share run reads calibration data: ls and data-aware low rank solve from it, refits and budgets
    run on it, and every init's calibration output error is reported."""
    return True


def _options(config: ShareConfig) -> dict:
    data = to_json(config)
    if config.data:
        data["data"] = str(Path(config.data).resolve())
    return data


# resumable: the repair (--finetune-steps) checkpoints distill's training state; a resumed run builds the same
# shared model again from the same calibration data, then training continues from the checkpoint
register(Method("share", ShareConfig, _share_core, calibrated=_calibrated, options=_options,
                check_model=check_options, resumable=True, checkpoint_file=CHECKPOINT,
                read_progress=read_training_progress))

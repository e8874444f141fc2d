"""LSTM layers with a projection (``svd --structure projection``): the pure factorisation of a layer's stacked
readers, rank rules and budget, and the model-level conversion (plain, or data-aware through the calibration
walk).

A layer's hidden state h_t (H) is read by its own recurrence (W_hh, 4H x H) and by whatever reads the layer's
output (the next layer's W_ih, the joint's Linear; through a time stacking of k frames, k column blocks of the
next matrix). Stacking those readers as rows gives M (R x H); with M ~ A P (P: r x H) the layer becomes
``nn.LSTM(proj_size=r)`` with weight_hr = P and weight_hh = A's first 4H rows, and each reader reads m_t = P h_t
with its rows of A: eq. 11 of Prabhavalkar et al., "Compression of end-to-end models". Plain: P = V_r^T from the
SVD of M, A = M V_r. Data-aware: the SVD of M S (S the Cholesky factor of E[h h^T] on calibration data),
P = V_r^T S^-1, A = U_r Sigma_r, which minimises E||M h - A P h||^2 on those hidden states.

Dimension letters: H hidden (cell) size, r rank, R rows of the stacked readers (4H + the readers' rows times
their blocks), O a reader's outputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from asrshrink.calibrate.walk import Capture, Solution, walk, walked
from asrshrink.calibrate.stats import Moments, cholesky_scale
from asrshrink.config import SvdConfig
from asrshrink.errors import AsrshrinkError
from asrshrink.methods.registry import Context, Outcome
from asrshrink.methods.svd import (SideChoice, allocate_ranks, error_curve, factorisation_saves, input_scales,
                                   rank_for_threshold)
from asrshrink.models.base import Transducer
from asrshrink.models.layers import input_matrix, projectable, with_input_matrix, with_projection
from asrshrink.models.targets import WeightTarget, select_targets

SIDE = "projection"  # the report rows' side of a projected layer


def projection_factors(stacked: torch.Tensor, rank: int, *, scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-r projection of the inputs of ``stacked`` M (R, H): P (r, H) and A (R, r) with M ~ A P.

    Plain: P = V_r^T (orthonormal rows) and A = M V_r, the truncated SVD of M. With ``scale`` S (H, H), the
    lower Cholesky factor of the inputs' second moment, the truncation of M S instead: P = V_r^T S^-1 and
    A = U_r Sigma_r, minimising E||(M - A P) h||^2. Computed in float64, returned in stacked's dtype."""
    m = stacked.to(torch.float64)
    target = m if scale is None else m @ scale.to(torch.float64)
    u, s, vh = torch.linalg.svd(target, full_matrices=False)              # (R, k), (k,), (k, H)
    if scale is None:
        p = vh[:rank]                                                       # (r, H)
        a = m @ p.T                                                         # (R, r)
    else:  # V_r^T S^-1, by a triangular solve of S^T X = V_r
        p = torch.linalg.solve_triangular(scale.to(torch.float64).T, vh[:rank].T, upper=True).T
        a = u[:, :rank] * s[:rank]
    return p.to(stacked.dtype), a.to(stacked.dtype)


def readers(model: Transducer, layer: str) -> list[tuple[str, nn.Module, int]]:
    """(name, module, column blocks) of every module reading ``layer``'s output (the family says which)."""
    return [(name, model.get_submodule(name), blocks) for name, blocks in model.projection_readers(layer)]


def stacked_readers(model: Transducer, layer: str) -> tuple[torch.Tensor, list[int]] | None:
    """M (R, H): the layer's W_hh over each reader's column blocks, and the row count of each part; None when
    the layer or a reader is not dense (pruned, factorised, already projected)."""
    module = model.get_submodule(layer)
    if not projectable(module):
        return None
    parts = [module.weight_hh.detach()]
    for _, reader, blocks in readers(model, layer):
        weight = input_matrix(reader)
        if weight is None or weight.shape[1] != blocks * module.hidden_size:
            return None
        parts += list(weight.chunk(blocks, dim=1))                          # k blocks (O, H)
    return torch.cat(parts, 0), [p.shape[0] for p in parts]


def project_layer(model: Transducer, layer: str, rank: int, scale: torch.Tensor | None = None
                  ) -> tuple[nn.Module, dict[str, nn.Module]]:
    """``layer`` of ``model`` with a rank-r projection, and its readers rewritten to read m_t = P h_t."""
    found = stacked_readers(model, layer)
    if found is None:
        raise AsrshrinkError(f"{layer}: not a dense LSTM layer with dense readers; it cannot be projected")
    stacked, rows = found
    p, a = projection_factors(stacked, rank, scale=scale)
    pieces = list(a.split(rows, 0))
    new = with_projection(model.get_submodule(layer), pieces.pop(0), p)
    rewritten = {}
    for name, reader, blocks in readers(model, layer):
        rewritten[name] = with_input_matrix(reader, torch.cat(pieces[:blocks], 1))   # (O, k r)
        del pieces[:blocks]
    return new, rewritten


def project_model(model: Transducer, choices: list[SideChoice], scales: dict[str, torch.Tensor] | None = None) -> Transducer:
    """A copy of ``model`` with each chosen layer projected (forward order; plain, or by ``scales``)."""
    new = copy.deepcopy(model)
    for choice in choices:
        if choice.rank is None:
            continue
        layer, rewritten = project_layer(new, choice.layer, choice.rank, None if scales is None else
                                         scales.get(choice.layer))
        new.set_submodule(choice.layer, layer)
        for name, module in rewritten.items():
            new.set_submodule(name, module)
    return new.eval()


class ProjectionSolver:
    """Data-aware projection of one LSTM layer (walk solver): the second moment of its hidden states h_t on
    the compressed model (its inputs from the already-projected layers before it), then the projection of the
    SVD of M S; the layer's readers are swapped along with it."""

    needs_original = False
    needs_compressed_output = True

    def __init__(self, compressed: Transducer, layer: str, rank: int, hidden: int):
        self.compressed, self.layer, self.rank = compressed, layer, rank
        self.moments = Moments(hidden)

    def add_batch(self, capture: Capture) -> None:
        self.moments.add(capture.rows(capture.compressed_output))

    def solve(self) -> Solution:
        module, rewritten = project_layer(self.compressed, self.layer, self.rank, cholesky_scale(self.moments.mean()))
        return Solution(module, replacements=rewritten)

    def free(self) -> None:
        self.moments = None


def data_aware_project(model: Transducer, choices: list[SideChoice], batches: list[dict[str, torch.Tensor]],
                       targets: list[WeightTarget]) -> Transducer:
    """Projection of each chosen layer in forward order, each minimising its readers' output error on the
    hidden states it has in the already-projected model."""
    ranks = {c.layer: c.rank for c in choices if c.rank is not None}
    reached = [t for t in walked(model, targets) if t.side == "hh" and t.layer in ranks]
    compressed = copy.deepcopy(model).eval()

    def make_solver(layer, group, o_module, c_module, position):
        return ProjectionSolver(compressed, layer, ranks[layer], c_module.hidden_size) if layer in ranks else None

    walk(model, compressed, batches, reached, make_solver, original_inputs=False)
    missed = [c for c in choices if c.rank is not None and c.layer not in {t.layer for t in reached}]
    return project_model(compressed, missed)


# --- the plan: one rank per LSTM layer ------------------------------------------------------------------------

def plan_projection(config: SvdConfig, ctx: Context) -> tuple[list[SideChoice], list[WeightTarget]]:
    """The rank of every chosen LSTM layer (by the threshold of min(R, H) = H, the rank, or the budget), None
    where a projection would not save parameters (r (R + H) >= R H) or the layer cannot be projected."""
    original = ctx.original
    targets = select_targets(original.weight_targets(list(config.components)), config.targets, config.ignore)
    layers = list(dict.fromkeys(t.layer for t in targets if t.lstm))
    if not layers:
        shown = targets[0].layer if targets else "nothing"
        raise AsrshrinkError(f"--structure projection converts LSTM layers and the chosen matrices are in none "
                             f"(e.g. {shown}); use the default --structure factors")
    stacks = {name: stacked_readers(original, name) for name in layers}
    ranks = None
    if config.budgeted:
        ctx.log("measuring per-layer projection errors for the budget")
        scales = None
        if config.data_aware:
            found = input_scales(original, ctx.batches, config.components, [t for t in targets if t.side == "hh"])
            scales = {layer: scale for (layer, side), scale in found.items() if side == "hh"}
        ranks = _budget_ranks(original, config, {k: v[0] for k, v in stacks.items() if v is not None}, scales)
    choices = []
    for name in layers:
        hidden = original.get_submodule(name).hidden_size
        if stacks[name] is None:
            choices.append(SideChoice(name, SIDE, 4 * hidden, hidden, 1, None,
                                      "not a dense LSTM layer with dense readers: left as it is"))
            continue
        rows = stacks[name][0].shape[0]
        if ranks is not None:
            r = ranks.get(name)
        elif config.rank is not None:
            r = min(config.rank, hidden)
        else:
            r = rank_for_threshold(rows, hidden, config.threshold)
        if r is None:
            reason = "kept dense by the budget"
        elif not factorisation_saves(rows, hidden, r):
            reason, r = f"rank {r} >= {rows}x{hidden}/({rows}+{hidden}): no saving, kept dense", None
        else:
            reason = "projected"
        choices.append(SideChoice(name, SIDE, rows, hidden, 1, r, reason))
    for target in targets:
        if not target.lstm:
            choices.append(SideChoice(target.layer, target.side, target.rows, target.cols, 1, None,
                                      "not an LSTM layer: left as it is"))
    for choice in choices:
        if choice.rank is None:
            ctx.log(f"{choice.layer} {choice.side} {choice.rows}x{choice.cols}: {choice.reason}")
    return choices, targets


def _budget_ranks(model: Transducer, config: SvdConfig, stacks: dict[str, torch.Tensor],
                  scales: dict[str, torch.Tensor] | None) -> dict[str, int | None]:
    """Per-layer ranks meeting ``--compression-ratio`` (of the chosen components' parameters and of the
    readers outside them that a projection rewrites) or ``--target-params`` (the whole model)."""
    shapes = {name: (m.shape[0], m.shape[1], 1) for name, m in stacks.items()}
    curves = {name: error_curve(m, 1, None if scales is None else scales.get(name)) for name, m in stacks.items()}
    dense = sum(rows * cols for rows, cols, _ in shapes.values())
    model_params = sum(p.numel() for p in model.parameters())
    if config.compression_ratio is not None:
        known = model.components()
        scope = {id(p): p for name in config.components for p in known[name].parameters()}
        for layer in stacks:
            for _, reader, _ in readers(model, layer):
                scope.update({id(p): p for p in reader.parameters()})
        scope_params = sum(p.numel() for p in scope.values())
        budget = int(scope_params / config.compression_ratio) - (scope_params - dense)
    else:
        budget = int(config.target_params) - (model_params - dense)
    chosen = allocate_ranks({(k, SIDE): v for k, v in curves.items()}, {(k, SIDE): v for k, v in shapes.items()},
                            budget)
    return {layer: rank for (layer, _), rank in chosen.items()}


def projection_core(config: SvdConfig, ctx: Context) -> Outcome:
    choices, targets = plan_projection(config, ctx)
    chosen = [c for c in choices if c.side == SIDE]
    ctx.log(("data-aware " if config.data_aware else "")
            + f"projection of {sum(c.rank is not None for c in chosen)} LSTM layers")
    if config.data_aware:
        model = data_aware_project(ctx.original, chosen, ctx.batches, targets)
    else:
        model = project_model(ctx.original, chosen)
    return Outcome(model, [c.to_json() for c in choices])

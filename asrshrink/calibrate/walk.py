"""The block walk: one driver for every calibrated method and family.

An original and a compressed model run side by side over calibration batches, block by block (an LSTM
layer, a Conformer layer). Inside a block, the weight targets are visited in forward order, in the family's
input groups ("true sequential": a matrix sees the inputs that the already-compressed matrices before it
produce). For each group, one pass over the batches runs the compressed block (and, when a solver asks, the
original block) with hooks that hand each target module's input and output to its solver (``add_batch``);
then each solver ``solve``s, the walk alone swaps the replacement into the compressed model, and the solver
is ``free``d. Only the current block's activations are alive: each list is replaced batch by batch.

Dimension letters: T frames, B batch, D features, N valid rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from asrshrink.errors import AsrshrinkError
from asrshrink.models.base import Transducer
from asrshrink.models.targets import WeightTarget, block_targets

Position = tuple[int, int]  # (block, group), blocks numbered across the walked components in order


@dataclass
class Capture:
    """One calibration batch as seen by one target module.

    ``compressed_input`` is the module's input in the compressed model; ``original_input`` and
    ``original_output`` the original module's input and output in the original model (None unless the
    solver ``needs_original``). An LSTM layer's output is its hidden states (T, B, H). ``rows(t)`` gives the
    valid rows (N, D) of any tensor laid out like this module's input; ``lengths`` are the input's frame
    counts (B,) for a time-first input."""

    batch: int
    compressed_input: torch.Tensor
    compressed_output: torch.Tensor
    original_input: torch.Tensor | None
    original_output: torch.Tensor | None
    lengths: torch.Tensor
    rows: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Solution:
    """A solver's result: the replacement module (None keeps the current one) and, when it computed them,
    the replacement's outputs on the compressed inputs per batch (an LSTM layer's hidden states), so the walk
    need not run it again; ``replacements``: other modules of the compressed model to swap by dotted name (those
    that read the module's output, when its output size changed)."""

    module: nn.Module | None
    outputs: list[torch.Tensor] | None = None
    replacements: dict[str, nn.Module] = field(default_factory=dict)


class Solver(Protocol):
    """Per-module statistics, accumulated batch by batch, then solved once and freed. ``needs_original``: the
    captures carry the original module's input and output; ``needs_compressed_output``: they carry the
    compressed module's output (when no solver of a group needs it and the module is the block's layer
    itself, the walk hands over the block input without running the compressed block)."""

    needs_original: bool
    needs_compressed_output: bool

    def add_batch(self, capture: Capture) -> None: ...

    def solve(self) -> Solution: ...

    def free(self) -> None: ...


#: make_solver(layer name, its targets in this group, original module, compressed module, position)
SolverFactory = Callable[[str, list[WeightTarget], nn.Module, nn.Module, Position], "Solver | None"]


def valid_rows(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rows of (T, B, D) at valid frames -> (N, D)."""
    mask = torch.arange(x.shape[0]).unsqueeze(1) < lengths.unsqueeze(0)
    return x[mask]


def shift(h: torch.Tensor) -> torch.Tensor:
    """Hidden states h_{t-1} for every t: (T, B, H) shifted by one step, zeros first."""
    return torch.cat([torch.zeros_like(h[:1]), h[:-1]], 0)


def _row_selector(layout: str, frames: dict[int, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Valid rows of a tensor in ``layout``; ``frames`` maps a frame count to its lengths (B,) (the block's
    input and output rates). A tensor whose time axis matches neither counts all its rows."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        if layout == "relative" and t.dim() == 3 and t.shape[1] % 2:
            steps = (t.shape[1] + 1) // 2                                 # (1, 2T - 1, D): positions T-1..-(T-1)
            lengths = frames.get(steps)
            if lengths is not None:  # each utterance's own 2L - 1 positions, whatever the batch's padding
                return torch.cat([t[0, steps - n:steps + n - 1] for n in lengths.tolist()])
        if layout not in ("all", "relative") and t.dim() >= 3:
            steps = t.shape[0] if layout == "time_first" else t.shape[1]
            lengths = frames.get(steps)
            if lengths is not None:
                if layout == "time_first":
                    return valid_rows(t, lengths)
                return t[torch.arange(steps).unsqueeze(0) < lengths.unsqueeze(1)]
        return t.reshape(-1, t.shape[-1])
    return rows


def _run_caught(block, model: nn.Module, layers: list[str], x: torch.Tensor, lengths: torch.Tensor):
    """Run ``block`` on one batch with hooks that keep each named module's first input and its output."""
    caught: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def store(module, args, output):
            if name in caught:
                raise AsrshrinkError(f"{name} runs twice in one block; the walk cannot calibrate a module that "
                                     f"is reused")
            caught[name] = (args[0], output[0] if isinstance(output, tuple) else output)
        return store

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in layers]
    try:
        y, out_lengths = block.run(x, lengths)
    finally:
        for h in handles:
            h.remove()
    return caught, y, out_lengths


def walked(model: Transducer, targets: list[WeightTarget]) -> list[WeightTarget]:
    """The targets a walk reaches: those inside a block of a component that runs as blocks (not the joint)."""
    out = []
    for component in dict.fromkeys(t.component for t in targets):
        try:
            names = [b.name for b in model.blocks(component)]
        except AsrshrinkError:
            continue
        mine = [t for t in targets if t.component == component]
        out += [t for name in names for t in block_targets(mine, name)]
    return out


@torch.no_grad()
def walk(original: Transducer, compressed: Transducer, batches: list[dict[str, torch.Tensor]],
         targets: list[WeightTarget], make_solver: SolverFactory, *,
         skip: Callable[[Position], bool] = lambda position: False,
         on_group: Callable[[Position], None] | None = None, original_inputs: bool = True) -> None:
    """Walk ``targets`` (of components that run as blocks) block by block over ``batches``, solving each
    module with the solver ``make_solver`` gives it (None: left as it is) and swapping its replacement into
    ``compressed`` in place. ``skip(position)`` skips a group (already solved in a resumed run);
    ``on_group(position)`` is called after each group whose solvers ran. With ``original_inputs`` False (no
    solver will need the original model's activations) the original model is not run."""
    index = -1
    for component in original.components():
        mine = [t for t in targets if t.component == component]
        if not mine:
            continue
        try:
            count = len(original.blocks(component))
        except AsrshrinkError:
            continue
        orig_acts = [original.block_inputs(component, b) for b in batches] if original_inputs else None
        comp_acts = [compressed.block_inputs(component, b) for b in batches]
        for j in range(count):
            index += 1
            name = original.blocks(component)[j].name
            inside = block_targets(mine, name)
            orig_next: list = [None] * len(batches)
            provided = None
            for g, group in enumerate(original.input_groups(inside) if inside else []):
                if skip((index, g)):
                    continue
                solvers = {}
                for layer in dict.fromkeys(t.layer for t in group):
                    solver = make_solver(layer, [t for t in group if t.layer == layer], original.get_submodule(layer),
                                         compressed.get_submodule(layer), (index, g))
                    if solver is not None:
                        solvers[layer] = solver
                if not solvers:
                    continue
                layouts = {t.layer: t.layout for t in group}
                need_original = any(s.needs_original for s in solvers.values())
                if need_original and not original_inputs:
                    raise ValueError("a solver needs the original model's activations; walk with original_inputs")
                direct = list(solvers) == [name] and not any(s.needs_compressed_output for s in solvers.values())
                o_block, c_block = original.blocks(component)[j], compressed.blocks(component)[j]
                for i in range(len(batches)):
                    x, lengths = comp_acts[i]
                    if direct:  # the block is the module: its input is the module's, its output not needed
                        c_caught, y, out_lengths = {name: (x, None)}, x, lengths
                    else:
                        c_caught, y, out_lengths = _run_caught(c_block, compressed, list(solvers), x, lengths)
                    o_caught = {}
                    if need_original:
                        o_caught, o_y, o_lengths = _run_caught(o_block, original, list(solvers), *orig_acts[i])
                        orig_next[i] = (o_y, o_lengths)
                    frames = {y.shape[0]: out_lengths, x.shape[0]: lengths}
                    for layer, solver in solvers.items():
                        c_in, c_out = c_caught[layer]
                        o_in, o_out = o_caught.get(layer, (None, None))
                        solver.add_batch(Capture(i, c_in, c_out, o_in, o_out, lengths,
                                                 _row_selector(layouts[layer], frames)))
                    del c_caught, o_caught, y
                provided = None
                for layer, solver in solvers.items():
                    solution = solver.solve()
                    solver.free()
                    if solution.module is not None:
                        compressed.set_submodule(layer, solution.module)
                    for other, module in solution.replacements.items():
                        compressed.set_submodule(other, module)
                    provided = solution.outputs if layer == name else None
                if on_group:
                    on_group((index, g))
            o_block, c_block = original.blocks(component)[j], compressed.blocks(component)[j]
            for i in range(len(batches)):
                if orig_next[i] is None and original_inputs:
                    orig_next[i] = o_block.run(*orig_acts[i])
                x, lengths = comp_acts[i]
                comp_acts[i] = (provided[i], lengths) if provided is not None else c_block.run(x, lengths)
                if provided is not None:
                    provided[i] = None  # hand the tensor over
            orig_acts = orig_next
            del orig_next

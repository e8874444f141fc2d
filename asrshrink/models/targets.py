"""Weight targets: the one enumeration of a model's compressible matrices that every method reads.

A target is one matrix of one module: an LSTM layer's input ("ih") or recurrent ("hh") matrix, or a Linear's
weight ("linear"), in the order the forward pass uses them. Families refine the default (``Transducer.
weight_targets``): forward order where registration order differs, the row layout of each module's inputs,
and which matrices read the same input (solved from one calibration pass). Users pick targets by component
and by name patterns (``--targets``, ``--ignore``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from asrshrink.errors import AsrshrinkError
from asrshrink.models.layers import is_lstm_layer, matrices

#: How the rows of a module's input are laid out: (T, B, ...) time first, (B, T, ...) batch first, relative
#: position encodings (1, 2T - 1, ...) of which each utterance of L frames counts its 2L - 1 positions, or rows
#: that are none of these (every row counts).
LAYOUTS = ("time_first", "batch_first", "relative", "all")


@dataclass(frozen=True)
class WeightTarget:
    """One compressible matrix."""

    layer: str            # dotted module name in the model
    side: str             # "ih", "hh" (an LSTM layer's matrices) or "linear"
    rows: int             # O
    cols: int             # I
    component: str        # "encoder", "prediction" or "joint"
    kind: str             # "dense", "lowrank" or "sparse" (see models.layers.Matrix)
    layout: str = "time_first"

    @property
    def key(self) -> tuple[str, str]:
        return (self.layer, self.side)

    @property
    def lstm(self) -> bool:
        return self.side != "linear"

    @property
    def prunable(self) -> bool:
        """Low-rank factors (and shared bases with residuals) are left as they are by pruning."""
        return self.kind not in ("lowrank", "residual")


def holders(component: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that holds compressible matrices itself, outermost only, in registration
    order (the Linears inside a factorised LSTM layer belong to the layer)."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in component.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue
        if matrices(module):
            found.append((name, module))
    return found


def enumerate_targets(model: nn.Module, components: list[str] | tuple[str, ...], *, linear_layout: str = "batch_first"
                      ) -> list[WeightTarget]:
    """Every compressible matrix of the chosen components, in registration order."""
    known = model.components()
    unknown = [c for c in components if c not in known]
    if unknown:
        raise AsrshrinkError(f"unknown component(s) {unknown}; this model has {', '.join(known)}")
    paths = {id(m): n for n, m in model.named_modules()}
    targets = []
    for component in components:
        prefix = paths[id(known[component])]
        for name, module in holders(known[component]):
            full = f"{prefix}.{name}" if name else prefix
            layout = "time_first" if is_lstm_layer(module) else linear_layout
            for side, m in matrices(module).items():
                targets.append(WeightTarget(full, side, *m.weight.shape, component, m.kind, layout))
    return targets


def select_targets(targets: list[WeightTarget], include: tuple[str, ...] = (), ignore: tuple[str, ...] = ()
                   ) -> list[WeightTarget]:
    """The targets whose module name matches one of ``include`` (all when empty) and none of ``ignore``
    (shell patterns; ``*`` also matches dots). A pattern that matches nothing is refused, naming it."""
    def matches(pattern: str, t: WeightTarget) -> bool:
        return fnmatch.fnmatchcase(t.layer, pattern) or fnmatch.fnmatchcase(f"{t.layer}.{t.side}", pattern)

    for option, patterns in (("--targets", include), ("--ignore", ignore)):
        for pattern in patterns:
            if not any(matches(pattern, t) for t in targets):
                names = ", ".join(dict.fromkeys(t.layer for t in targets[:4]))
                raise AsrshrinkError(f"{option} {pattern!r} matches no weight matrix of the chosen components "
                                     f"(they are named like {names}, ...); see asrshrink info MODEL")
    chosen = [t for t in targets if not include or any(matches(p, t) for p in include)]
    return [t for t in chosen if not any(matches(p, t) for p in ignore)]


def block_targets(targets: list[WeightTarget], block_name: str) -> list[WeightTarget]:
    """The targets inside the block (module) named ``block_name``."""
    return [t for t in targets if t.layer == block_name or t.layer.startswith(block_name + ".")]

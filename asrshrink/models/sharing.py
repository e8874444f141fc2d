"""Weight sharing across layers: a plan that maps virtual layers to physical weights, and the ties that make
several virtual layers use one physical tensor (one ``nn.Parameter``, one storage).

A plan names a component's virtual layers in forward order and, per module kind of the family (a Conformer's
ff1, attn, conv, ff2; an LSTM layer), the physical index each virtual layer uses: the sharing indices I_FS,
I_A, I_C, I_FE of eq. 4 of "Sharing low rank Conformer weights" (repeating full blocks, eq. 1-3, is every kind
with the same indices). Sub-components named in ``unshare`` (``attn.key``, ``conv.depthwise``, ``misc``: norms,
biases, batch norm, position biases) stay per layer. The family declares which tensors of a layer form which
module kind and sub-component (``ShareLayout``, from ``Transducer.sharing_layout``); nothing here knows a layer
name.

A physical weight lives in the first virtual layer that uses it; the others hold the same tensor object. A saved
model stores each shared tensor once (under the first layer's name) and the plan in its metadata; loading ties
the others again (``plan_aliases`` gives both sides the same map).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from asrshrink.errors import AsrshrinkError, CheckpointError

#: The sub-component that names every "small" tensor of a layer (norms, biases, batch norm, position biases).
MISC = "misc"
#: Tensors under a module of one of these names are per-layer parts (``layers.ResidualLinear``'s correction,
#: ``layers.BasisLinear``'s coefficients): never shared.
PER_LAYER = ("residual", "coefficients")


@dataclass(frozen=True)
class ShareLayout:
    """A family's sharing knowledge for one component.

    ``layers``: the virtual layers a plan may share, dotted names in forward order. ``modules``: the module
    kinds, in forward order. ``parts``: relative tensor-name prefix -> (module kind, sub-component), longest
    prefix wins. ``misc_parts``: sub-components whose tensors are all "misc"; a tensor whose leaf name starts
    with "bias" is misc too. ``matrices``: (module kind, sub-component) -> (relative module name, side) of a
    weight matrix (a Linear's "linear", an LSTM layer's "ih"/"hh") that the least-squares merge and low rank
    treat as a matrix."""

    component: str
    layers: tuple[str, ...]
    modules: tuple[str, ...]
    parts: dict[str, tuple[str, str]]
    misc_parts: tuple[str, ...] = ()
    matrices: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    #: Sub-components --low-rank may factorise (Linear weights); empty: none (e.g. LSTM layers).
    low_rank_parts: tuple[tuple[str, str], ...] = ()
    #: (module kind, sub-component) -> relative module name of a per-channel affine map (a norm, a batch norm,
    #: a depthwise convolution: ``layers.channel_map``), which the least-squares merge fits per channel.
    channels: dict[tuple[str, str], str] = field(default_factory=dict)

    def classify(self, name: str) -> tuple[str, str, bool] | None:
        """(module kind, sub-component, misc) of a tensor named relative to its layer; None for a per-layer
        part (residual factors, basis coefficients) or a tensor of no module kind."""
        if any(f".{part}." in f".{name}" for part in PER_LAYER):
            return None
        best = None
        for prefix, part in self.parts.items():
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
                best = (prefix, part)
        if best is None:
            return None
        kind, sub = best[1]
        return kind, sub, sub in self.misc_parts or name.rsplit(".", 1)[-1].startswith("bias")

    def subcomponents(self) -> list[str]:
        """Every name --unshare accepts: "misc" and "kind.sub" for each sub-component."""
        return [MISC] + list(dict.fromkeys(f"{k}.{s}" for k, s in self.parts.values()))


@dataclass(frozen=True)
class SharingPlan:
    """Which physical weights each virtual layer of ``component`` uses (see the module docstring).

    ``indices[kind][l]`` is the physical index of virtual layer ``layers[l]``'s module ``kind``; the physical
    indices of a kind are 0..N-1, each used at least once."""

    component: str
    layers: tuple[str, ...]
    indices: dict[str, tuple[int, ...]]
    unshare: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "layers": list(self.layers),
                "indices": {k: list(v) for k, v in self.indices.items()}, "unshare": list(self.unshare)}

    @classmethod
    def from_json(cls, data: Any, source: str = "the sharing plan") -> "SharingPlan":
        """A plan from JSON (untrusted: every field's type is checked; ``check`` checks it against a model)."""
        fix = "write the model again with asrshrink share"
        if not isinstance(data, dict) or not isinstance(data.get("component"), str):
            raise CheckpointError(f"{source}: invalid sharing plan (expected an object with a component); {fix}")
        layers, indices, unshare = data.get("layers"), data.get("indices"), data.get("unshare", [])
        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
            raise CheckpointError(f"{source}: invalid sharing plan: layers must be a list of layer names; {fix}")
        if not isinstance(unshare, list) or not all(isinstance(n, str) for n in unshare):
            raise CheckpointError(f"{source}: invalid sharing plan: unshare must be a list of names; {fix}")
        if not isinstance(indices, dict) or not all(
                isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
                for v in indices.values()):
            raise CheckpointError(f"{source}: invalid sharing plan: indices must map module kinds to lists of "
                                  f"integers; {fix}")
        return cls(data["component"], tuple(layers), {k: tuple(v) for k, v in indices.items()}, tuple(unshare))

    def check(self, layout: ShareLayout, source: str = "the sharing plan", error: type = AsrshrinkError) -> None:
        """Refuse a plan that does not fit ``layout`` (the model's layers, kinds and sub-components)."""
        if self.component != layout.component or self.layers != layout.layers:
            raise error(f"{source}: the sharing plan names the layers {_short(self.layers)} of {self.component}; "
                        f"this model's are {_short(layout.layers)}")
        unknown = [k for k in self.indices if k not in layout.modules]
        if unknown:
            raise error(f"{source}: the sharing plan shares unknown module kind(s) {unknown}; this model's are "
                        f"{', '.join(layout.modules)}")
        for kind, values in self.indices.items():
            if len(values) != len(self.layers):
                raise error(f"{source}: the sharing indices of {kind} have {len(values)} entries for "
                            f"{len(self.layers)} layers")
            if values and (min(values) < 0 or set(values) != set(range(max(values) + 1))):
                raise error(f"{source}: the sharing indices of {kind} ({_short(values)}) must use each of "
                            f"0..N-1 (N physical modules), none out of range")
        bad = [n for n in self.unshare if n not in layout.subcomponents()]
        if bad:
            raise error(f"{source}: cannot unshare {bad}; choose from {', '.join(layout.subcomponents())}")

    def physical(self, kind: str) -> int:
        """Physical modules of ``kind`` (a kind the plan does not share has one per layer)."""
        values = self.indices.get(kind)
        return len(self.layers) if values is None else (max(values) + 1 if values else 0)

    def groups(self, kind: str) -> list[list[int]]:
        """The virtual layers (indices into ``layers``) of each physical module of ``kind``, in order."""
        values = self.indices.get(kind, tuple(range(len(self.layers))))
        out: dict[int, list[int]] = {}
        for layer, index in enumerate(values):
            out.setdefault(index, []).append(layer)
        return [out[i] for i in sorted(out)]

    def source(self, kind: str, layer: int) -> int:
        """The virtual layer that holds layer ``layer``'s physical module of ``kind`` (its group's first)."""
        for group in self.groups(kind):
            if layer in group:
                return group[0]
        raise IndexError(layer)

    def shared(self, kind: str, sub: str, misc: bool) -> bool:
        """Whether the tensors of ``kind.sub`` (misc or not) follow the plan's indices."""
        return kind in self.indices and f"{kind}.{sub}" not in self.unshare and not (misc and MISC in self.unshare)

    def summary(self) -> dict[str, Any]:
        """Virtual layers and physical modules per kind (for ``info`` and reports)."""
        return {"component": self.component, "virtual_layers": len(self.layers),
                "physical": {k: self.physical(k) for k in self.indices}, "indices": {k: list(v) for k, v in
                                                                                     self.indices.items()},
                "unshare": list(self.unshare)}


def _short(values) -> str:
    values = list(values)
    return ", ".join(map(str, values[:6])) + (", ..." if len(values) > 6 else "")


def plan_aliases(plan: SharingPlan, layout: ShareLayout, keys) -> dict[str, str]:
    """{alias key: physical key} for state-dict ``keys`` (parameters and buffers): every tensor of a virtual
    layer that the plan shares, mapped to the same tensor of its group's first layer. A shared tensor whose
    physical counterpart is not among ``keys`` is an error (the layers' structures differ)."""
    keys = list(keys)
    present = set(keys)
    out: dict[str, str] = {}
    for layer_index, layer in enumerate(plan.layers):
        prefix = layer + "."
        for key in keys:
            if not key.startswith(prefix):
                continue
            rel = key[len(prefix):]
            kind = layout.classify(rel)
            if kind is None or not plan.shared(*kind):
                continue
            src = plan.source(kind[0], layer_index)
            if src == layer_index:
                continue
            target = f"{plan.layers[src]}.{rel}"
            if target not in present:
                raise AsrshrinkError(f"{key} is shared with {plan.layers[src]}, which has no tensor {rel}: the "
                                     f"layers of a group must have the same structure")
            out[key] = target
    return out


def _owner(model: nn.Module, key: str) -> tuple[nn.Module, str]:
    module_name, _, leaf = key.rpartition(".")
    return model.get_submodule(module_name), leaf


def get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    owner, leaf = _owner(model, key)
    if leaf in owner._parameters:
        return owner._parameters[leaf]
    return owner._buffers[leaf]


def tie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make every alias key hold its physical key's tensor object (parameters and buffers), in place."""
    for alias, target in aliases.items():
        owner, leaf = _owner(model, alias)
        source = get_tensor(model, target)
        if tuple(source.shape) != tuple(get_tensor(model, alias).shape):
            raise AsrshrinkError(f"{alias} {tuple(get_tensor(model, alias).shape)} cannot share "
                                 f"{target} {tuple(source.shape)}: shapes differ")
        if leaf in owner._parameters:
            setattr(owner, leaf, source)  # nn.LSTM's __setattr__ refreshes its flat weights
        else:
            owner._buffers[leaf] = source


def check_tied(model: nn.Module, aliases: dict[str, str]) -> None:
    """Refuse a model whose tensors are not tied as its plan says (a method replaced a shared module)."""
    for alias, target in aliases.items():
        if get_tensor(model, alias) is not get_tensor(model, target):
            raise AsrshrinkError(f"{alias} should share {target} by the model's sharing plan but holds its own "
                                 f"tensor; a method replaced a shared module (compress before sharing)")


def apply_plan(model: nn.Module, plan: SharingPlan) -> dict[str, str]:
    """Tie ``model``'s tensors as ``plan`` says (the physical values are the group's first layer's) and record
    the plan on the model; returns the aliases."""
    layout = model.sharing_layout(plan.component)
    plan.check(layout)
    aliases = plan_aliases(plan, layout, model.state_dict(keep_vars=True).keys())
    tie(model, aliases)
    model.sharing = plan
    return aliases


def model_aliases(model: nn.Module) -> dict[str, str]:
    """The aliases of a shared model (its ``sharing`` plan), {} for an unshared one."""
    plan = getattr(model, "sharing", None)
    if plan is None:
        return {}
    return plan_aliases(plan, model.sharing_layout(plan.component), model.state_dict(keep_vars=True).keys())


def layer_shapes_match(model: nn.Module, layout: ShareLayout, plan: SharingPlan) -> None:
    """Refuse a plan that shares tensors of different shapes (one line naming the first pair)."""
    keys = model.state_dict(keep_vars=True)
    aliases = plan_aliases(plan, layout, keys.keys())
    for alias, target in aliases.items():
        if tuple(keys[alias].shape) != tuple(keys[target].shape):
            raise AsrshrinkError(f"cannot share {alias} {tuple(keys[alias].shape)} with {target} "
                                 f"{tuple(keys[target].shape)}: only layers of equal shape can share weights")


# --- building plans from options ------------------------------------------------------------------------------

def parse_indices(text: str, layers: int) -> tuple[int, ...]:
    """``--repeat``: "R" (adjacent groups of R layers, the last possibly shorter) or an index list "0,0,1,1"."""
    text = text.strip()
    if text.isdigit():
        r = int(text)
        if not 1 <= r <= layers:
            raise AsrshrinkError(f"--repeat {r}: each physical block is used R times, 1 <= R <= {layers} layers")
        return tuple(i // r for i in range(layers))
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise AsrshrinkError(f"--repeat takes a count R or an index list such as 0,0,1,1; got {text!r}")
    values = tuple(int(p) for p in parts)
    if len(values) != layers:
        raise AsrshrinkError(f"--repeat {text}: {len(values)} indices for {layers} layers; give one per layer")
    if set(values) != set(range(max(values) + 1)):
        raise AsrshrinkError(f"--repeat {text}: the indices must use each of 0..N-1 (N physical blocks)")
    return values


def parse_groups(text: str, layers: int) -> tuple[int, ...]:
    """``--groups``: ranges of layers that share, e.g. "0-1,2-3" (layers in no group keep their own)."""
    owner = [-1] * layers
    for g, part in enumerate(p.strip() for p in text.split(",")):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise AsrshrinkError(f"--groups takes ranges of layers such as 0-1,2-3; got {part!r}")
        a, b = int(lo), int(hi or lo)
        if not 0 <= a <= b < layers:
            raise AsrshrinkError(f"--groups {part}: layers must lie in 0..{layers - 1} (low-high)")
        for i in range(a, b + 1):
            if owner[i] >= 0:
                raise AsrshrinkError(f"--groups: layer {i} is in two groups")
            owner[i] = g
    # number physical modules in order of first use
    numbers: dict[Any, int] = {}
    out = []
    for i, g in enumerate(owner):
        key = ("g", g) if g >= 0 else ("own", i)
        out.append(numbers.setdefault(key, len(numbers)))
    return tuple(out)


def build_plan(layout: ShareLayout, *, repeat: str | None = None, groups: str | None = None,
               modules: tuple[str, ...] = (), unshare: tuple[str, ...] = ()) -> SharingPlan:
    """The plan of the share options: the layer grouping from ``repeat`` or ``groups`` (default: adjacent
    pairs), applied to ``modules`` (default: every kind of the family)."""
    n = len(layout.layers)
    if repeat is not None and groups is not None:
        raise AsrshrinkError("give either --repeat or --groups, not both")
    indices = parse_groups(groups, n) if groups is not None else parse_indices(repeat or "2", n)
    unknown = [m for m in modules if m not in layout.modules]
    if unknown:
        raise AsrshrinkError(f"--share-modules {','.join(unknown)}: unknown module kind; this model's are "
                             f"{', '.join(layout.modules)}")
    plan = SharingPlan(layout.component, layout.layers, {k: indices for k in (modules or layout.modules)},
                       tuple(unshare))
    plan.check(layout, "--unshare")
    return plan

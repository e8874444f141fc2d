"""Checks every model passes before any work is done on it, whatever file it came from: tensors (floating
dtype, finite values, no empty or oversized dimensions), configs (sizes bounded before anything is built),
compression structures (known layer types, ranks within bounds, the replaced module's interface unchanged).

Every failure is a one-line :class:`~asrshrink.errors.CheckpointError` naming the file and the tensor, config
field or module. Nothing here knows a family's layer names: families are checked through the modules they
build (on the ``meta`` device, which allocates nothing) against the shapes a file holds.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from asrshrink.errors import CheckpointError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Largest size (dimension, count) any config field may hold before a network is built from it.
MAX_SIZE = 1 << 16
#: Featurizer fields that size a buffer built from the config alone (the mel filterbank, the window).
FEATURE_BOUNDS = {"sample_rate": 384_000, "n_fft": 16_384, "n_mels": 1024, "frame_splicing": 16}
MAX_DIMS = 4
REWRITE = "write the model again with asrshrink"


#: Integer buffers PyTorch modules keep beside their weights (BatchNorm's step counter): scalars, any dtype.
COUNTERS = (".num_batches_tracked",)


def check_dtype(name: str, dtype: torch.dtype | str, source: str, fix: str = REWRITE) -> None:
    """Refuse a non-floating tensor (integer, bool, complex): weights are floating point (COUNTERS aside)."""
    if name.endswith(COUNTERS):
        return
    floating = dtype in FLOAT_DTYPES if isinstance(dtype, torch.dtype) else dtype in ("F16", "BF16", "F32", "F64")
    if not floating:
        raise CheckpointError(f"{source}: tensor {name} has dtype {_dtype_name(dtype)}, expected a floating-point "
                              f"tensor (float16/32/64); {fix}")


def check_shape(name: str, shape: tuple[int, ...], source: str, fix: str = REWRITE) -> None:
    """Refuse a tensor with no elements along some dimension, or with more than MAX_DIMS dimensions (a scalar,
    0 dimensions, is fine)."""
    if len(shape) > MAX_DIMS or any(int(n) <= 0 for n in shape):
        raise CheckpointError(f"{source}: tensor {name} has shape {tuple(shape)}, expected at most {MAX_DIMS} "
                              f"non-empty dimensions; {fix}")


def check_finite(name: str, tensor: torch.Tensor, source: str, fix: str = REWRITE) -> None:
    """Refuse NaN or infinite values, counting them."""
    if not tensor.is_floating_point():
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int((~finite).sum()) - nan
        what = ", ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if part)
        raise CheckpointError(f"{source}: tensor {name} holds {what} value(s) of {tensor.numel()}; a model with "
                              f"non-finite weights cannot be evaluated or compressed; {fix}")


def check_tensors(tensors: Mapping[str, torch.Tensor], source: str, fix: str = REWRITE) -> None:
    """Every tensor of a state dict: floating dtype, sane shape, finite values."""
    for name, tensor in tensors.items():
        check_dtype(name, tensor.dtype, source, fix)
        check_shape(name, tuple(tensor.shape), source, fix)
        check_finite(name, tensor, source, fix)


def check_config(config: Any, source: str, *, tensors: int) -> None:
    """Bound every size in a JSON config before anything is built from it.

    Integers must lie in [0, MAX_SIZE]; fields counting layers (their name contains "layers") at most the
    file's number of tensors; featurizer fields within FEATURE_BOUNDS; floats finite; lists at most MAX_SIZE
    long. ``tensors`` is the number of tensors in the file."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: invalid asrshrink metadata: config is {type(config).__name__}, expected "
                              f"an object; {REWRITE}")

    def walk(value: Any, path: str) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, int):
            field = path.rsplit(".", 1)[-1]
            limit = min(MAX_SIZE, tensors) if "layers" in field else FEATURE_BOUNDS.get(field, MAX_SIZE)
            if not 0 <= value <= limit:
                raise CheckpointError(f"{source}: invalid asrshrink metadata: config field {path} is {value}, "
                                      f"outside 0..{limit}; {REWRITE}")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise CheckpointError(f"{source}: invalid asrshrink metadata: config field {path} is {value}; "
                                      f"{REWRITE}")
        elif isinstance(value, list):
            if len(value) > MAX_SIZE:
                raise CheckpointError(f"{source}: invalid asrshrink metadata: config field {path} has "
                                      f"{len(value)} entries, more than {MAX_SIZE}; {REWRITE}")
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
        else:
            raise CheckpointError(f"{source}: invalid asrshrink metadata: config field {path} is a "
                                  f"{type(value).__name__}; {REWRITE}")

    walk(config, "")


def _positive(spec: dict, key: str, name: str, source: str) -> int:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        raise CheckpointError(f"{source}: invalid compression structure for {name}: {key} is {value!r}, expected "
                              f"an integer in 1..{MAX_SIZE}; {REWRITE}")
    return value


def _side(spec: Any, name: str, source: str) -> tuple[int, int]:
    """(in, out) of a checked side spec (lowrank / dense / sparse)."""
    if not isinstance(spec, dict) or spec.get("type") not in ("lowrank", "dense", "sparse"):
        kind = spec.get("type") if isinstance(spec, dict) else spec
        raise CheckpointError(f"{source}: invalid compression structure for {name}: unknown layer type {kind!r} "
                              f"(known: lowrank, dense, sparse, basis, residual, factorized_lstm, sparse_lstm, "
                              f"projected_lstm, projected_input_linear); {REWRITE}")
    n_in, n_out = _positive(spec, "in", name, source), _positive(spec, "out", name, source)
    if not isinstance(spec.get("bias", True), bool):
        raise CheckpointError(f"{source}: invalid compression structure for {name}: bias is {spec['bias']!r}, "
                              f"expected true or false; {REWRITE}")
    if spec["type"] == "lowrank":
        groups = _positive(spec, "groups", name, source)
        rank = _positive(spec, "rank", name, source)
        if n_out % groups or rank > min(n_in, n_out // groups):
            raise CheckpointError(f"{source}: invalid compression structure for {name}: rank {rank} with "
                                  f"{groups} group(s) of a {n_out}x{n_in} matrix (the rank must be at most "
                                  f"{min(n_in, n_out // groups) if n_out % groups == 0 else 'n/a'} and the "
                                  f"groups must divide {n_out}); {REWRITE}")
    return n_in, n_out


def _interface(module: nn.Module) -> tuple[str, int, int] | None:
    """What a module computes, in sizes: ("lstm", input, hidden) or ("linear", in, out); None otherwise."""
    if isinstance(module, nn.Linear):
        return ("linear", module.in_features, module.out_features)
    if isinstance(getattr(module, "hidden_size", None), int) and isinstance(getattr(module, "input_size", None), int):
        return ("lstm", module.input_size, module.hidden_size)
    from asrshrink.models.layers import LowRankLinear

    if isinstance(module, LowRankLinear):
        return ("linear", module.in_features, module.out_features)
    return None


def check_structure(structure: Any, model: nn.Module, source: str) -> None:
    """A saved compression structure must replace existing modules by ones with the same interface (input and
    output sizes), with known layer types and ranks within bounds. ``model`` is the family's own build (it may
    live on the meta device)."""
    if not isinstance(structure, dict):
        raise CheckpointError(f"{source}: invalid compression structure ({type(structure).__name__}, expected an "
                              f"object); {REWRITE}")
    kinds = {spec.get("type") for spec in structure.values() if isinstance(spec, dict)}
    if "branched_lstm" in kinds or "arbitrator" in kinds:
        _check_amnet(structure, model, source)
    for name, spec in structure.items():
        if isinstance(spec, dict) and spec.get("type") == "arbitrator":
            continue  # a module the AmNet adds (checked by _check_amnet)
        try:
            original = model.get_submodule(name) if isinstance(name, str) and name else None
        except AttributeError:
            original = None
        want = _interface(original) if original is not None else None
        if want is None:
            raise CheckpointError(f"{source}: invalid compression structure: {name!r} is not a layer of this "
                                  f"{getattr(model, 'family', 'model')} model; {REWRITE}")
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "branched_lstm":
            got = ("lstm", _positive(spec, "input_size", name, source), _positive(spec, "hidden_size", name, source))
        elif kind in ("factorized_lstm", "sparse_lstm"):
            hidden = _positive(spec, "hidden_size", name, source)
            ih, hh = _side(spec.get("ih"), name, source), _side(spec.get("hh"), name, source)
            got = ("lstm", ih[0], hidden)
            if ih[1] != 4 * hidden or hh != (hidden, 4 * hidden):
                raise CheckpointError(f"{source}: invalid compression structure for {name}: sides {ih[1]}x{ih[0]} "
                                      f"and {hh[1]}x{hh[0]} do not fit hidden size {hidden}; {REWRITE}")
        elif kind == "projected_lstm":
            hidden = _positive(spec, "hidden_size", name, source)
            got = ("lstm", _positive(spec, "input_size", name, source), hidden)
            proj = spec.get("proj_size")
            if isinstance(proj, bool) or not isinstance(proj, int) or not 0 <= proj < hidden:
                raise CheckpointError(f"{source}: invalid compression structure for {name}: proj_size is "
                                      f"{proj!r}, expected an integer in 0..{hidden - 1}; {REWRITE}")
        elif kind == "residual":
            n_in, n_out = _side(spec.get("base"), name, source)
            if (spec.get("in"), spec.get("out")) != (n_in, n_out):
                raise CheckpointError(f"{source}: invalid compression structure for {name}: a residual of "
                                      f"{spec.get('out')!r}x{spec.get('in')!r} on a {n_out}x{n_in} base; {REWRITE}")
            _side({"type": "lowrank", "in": n_in, "out": n_out, "rank": spec.get("rank"), "groups": 1}, name, source)
            got = ("linear", n_in, n_out)
        elif kind == "basis":  # the checks of a low-rank side of one group
            n_in, n_out = _side({**spec, "type": "lowrank", "groups": 1}, name, source)
            got = ("linear", n_in, n_out)
        elif kind == "projected_input_linear":
            n_in, n_out = _side({**spec, "type": "dense"}, name, source)
            got = ("linear", n_in, n_out)
        else:
            n_in, n_out = _side(spec, name, source)
            got = ("linear", n_in, n_out)
        # A module may read fewer inputs than the family's build: those that read a projected LSTM layer's
        # output (``svd --structure projection``); the family checks that the sizes chain.
        if got[0] != want[0] or got[2] != want[2] or got[1] > want[1]:
            raise CheckpointError(f"{source}: invalid compression structure for {name}: it would take {got[1]} "
                                  f"inputs and give {got[2]} where the model's layer has {want[1]} and {want[2]}; "
                                  f"{REWRITE}")


def _check_amnet(structure: dict, model: nn.Module, source: str) -> None:
    """An AmNet's structure: one arbitrator in the family's slot, reading the family's decision-rate input, and
    branched LSTM layers of known kind whose branch counts agree with it and whose ranks (mf) fall from the slow
    branch to the fast one within the matrix sizes."""
    fix = "the AmNet structure is damaged; rewrite the model with asrshrink amnet-finetune"
    slot = getattr(model, "arbitrator_slot", None)
    arbitrators = {n: s for n, s in structure.items() if isinstance(s, dict) and s.get("type") == "arbitrator"}
    branched = {n: s for n, s in structure.items() if isinstance(s, dict) and s.get("type") == "branched_lstm"}
    if slot is None:
        raise CheckpointError(f"{source}: invalid compression structure: an AmNet of a "
                              f"{getattr(model, 'family', 'model')} model, which has no AmNet support; {fix}")
    if list(arbitrators) != [slot] or not branched:
        raise CheckpointError(f"{source}: invalid compression structure: an AmNet needs one arbitrator at {slot!r} "
                              f"and branched layers (found arbitrators {sorted(arbitrators)} and "
                              f"{len(branched)} branched layers); {fix}")
    arb = arbitrators[slot]
    for key in ("input_size", "hidden_size", "num_layers", "branches"):
        _positive(arb, key, slot, source)
    if not isinstance(arb.get("feedback"), bool) or arb["num_layers"] > 8 or arb["branches"] != 2:
        raise CheckpointError(f"{source}: invalid compression structure for {slot}: feedback {arb.get('feedback')!r}, "
                              f"{arb['num_layers']} layers, {arb['branches']} branches (expected true/false, at most "
                              f"8 layers, 2 branches); {fix}")
    if arb["input_size"] != model.arbitrator_input_size:
        raise CheckpointError(f"{source}: invalid compression structure for {slot}: it reads {arb['input_size']} "
                              f"inputs where this model's decision frames have {model.arbitrator_input_size}; {fix}")
    for name, spec in branched.items():
        size, hidden = _positive(spec, "input_size", name, source), _positive(spec, "hidden_size", name, source)
        if spec.get("kind") not in ("mf", "sparse") or spec.get("branches") != arb["branches"]:
            raise CheckpointError(f"{source}: invalid compression structure for {name}: kind {spec.get('kind')!r} "
                                  f"with {spec.get('branches')!r} branches (expected mf or sparse with "
                                  f"{arb['branches']}); {fix}")
        if spec["kind"] == "mf":
            ranks = spec.get("ranks")
            for side, cols in (("ih", size), ("hh", hidden)):
                values = ranks.get(side) if isinstance(ranks, dict) else None
                if not isinstance(values, list) or len(values) != arb["branches"] or not all(
                        isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= min(cols, 4 * hidden)
                        for r in values) or values != sorted(values, reverse=True):
                    raise CheckpointError(f"{source}: invalid compression structure for {name}: {side} ranks "
                                          f"{values!r} (expected {arb['branches']} non-increasing ranks in 1.."
                                          f"{min(cols, 4 * hidden)}); {fix}")


def _dtype_name(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return {"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool"}.get(
        dtype, dtype.lower())

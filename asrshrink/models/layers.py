"""Building blocks shared by model families: single LSTM layers, LSTM stacks, time stacking.

Dimension letters: T time, B batch, I input features, H hidden size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

# PyTorch notes on every process's first projected LSTM that oneDNN has no kernel for it (it runs its own).
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")

LSTMState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (1, B, H)


class LSTMLayer(nn.Module):
    """One unidirectional LSTM layer with two bias vectors (PyTorch gate order: input, forget, cell, output).

    Each layer is its own module so that a compression method can reach its input, output and weights.
    """

    def __init__(self, input_size: int, hidden_size: int, *, forget_gate_bias: float | None = 1.0):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=1)
        if forget_gate_bias is not None:
            with torch.no_grad():
                self.lstm.bias_ih_l0[hidden_size:2 * hidden_size].fill_(forget_gate_bias)
                self.lstm.bias_hh_l0[hidden_size:2 * hidden_size].fill_(0.0)

    @property
    def weight_ih(self) -> torch.Tensor:  # (4H, I)
        return self.lstm.weight_ih_l0

    @property
    def weight_hh(self) -> torch.Tensor:  # (4H, H)
        return self.lstm.weight_hh_l0

    @property
    def output_size(self) -> int:
        """Features of the layer's output y and of its state h (H)."""
        return self.hidden_size

    def forward(self, x: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """x (T, B, I), state (h, c) each (1, B, H) or None for zeros -> y (T, B, H), new state."""
        return self.lstm(x, state)

    def flops_per_step(self) -> int:
        """Multiply-adds of one time step counted as 2 FLOPs (gate matmuls only)."""
        return 2 * 4 * self.hidden_size * (self.input_size + self.hidden_size)


class SparseLSTMLayer(LSTMLayer):
    """An LSTMLayer whose pruned weights are exact zeros (unstructured sparsity).

    It computes exactly as LSTMLayer (dense kernels, zeros included); the class marks the layer as pruned, so
    its structure spec records each matrix's non-zeros, a saved model reloads as the same class, and sizes
    can count its matrices as sparse storage (``sparse_matrices``).
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size, forget_gate_bias=None)

    @classmethod
    def from_weights(cls, layer: LSTMLayer, weight_ih: torch.Tensor, weight_hh: torch.Tensor) -> "SparseLSTMLayer":
        """A copy of ``layer`` with the given (pruned) weights (4H, I) and (4H, H) and its own biases."""
        new = cls(layer.input_size, layer.hidden_size)
        with torch.no_grad():
            new.lstm.weight_ih_l0.copy_(weight_ih)
            new.lstm.weight_hh_l0.copy_(weight_hh)
            new.lstm.bias_ih_l0.copy_(layer.lstm.bias_ih_l0)
            new.lstm.bias_hh_l0.copy_(layer.lstm.bias_hh_l0)
        return new


class ProjectedLSTMLayer(LSTMLayer):
    """An LSTM layer with a projection of rank r (``proj_size``): exactly ``torch.nn.LSTM(I, H, proj_size=r)``,
    m_t = W_hr h_t (W_hr (r, H)) is its output and the recurrent input (W_hh (4H, r)); the cell c_t keeps H.
    Eq. 11 of Prabhavalkar et al., "Compression of end-to-end models".

    ``proj_size`` 0 is a plain LSTM layer (nn.LSTM without projection) built by a projection run because its
    input size I changed: it reads a projected layer's output. Either way the layer records its sizes in the
    saved structure. Parameters: 4H (I + r) + r H (+ 8H biases).
    """

    def __init__(self, input_size: int, hidden_size: int, proj_size: int = 0):
        nn.Module.__init__(self)
        self.input_size, self.hidden_size, self.proj_size = input_size, hidden_size, proj_size
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=1, proj_size=proj_size)

    @property
    def weight_hr(self) -> torch.Tensor | None:  # (r, H), or None without a projection
        return self.lstm.weight_hr_l0 if self.proj_size else None

    @property
    def output_size(self) -> int:
        return self.proj_size or self.hidden_size

    @classmethod
    def from_weights(cls, weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias_ih: torch.Tensor,
                     bias_hh: torch.Tensor, weight_hr: torch.Tensor | None = None) -> "ProjectedLSTMLayer":
        """The layer with weight_ih (4H, I), weight_hh (4H, r or H), biases (4H,) and weight_hr (r, H) or None."""
        hidden = weight_ih.shape[0] // 4
        new = cls(weight_ih.shape[1], hidden, 0 if weight_hr is None else weight_hr.shape[0])
        with torch.no_grad():
            new.lstm.weight_ih_l0.copy_(weight_ih)
            new.lstm.weight_hh_l0.copy_(weight_hh)
            new.lstm.bias_ih_l0.copy_(bias_ih)
            new.lstm.bias_hh_l0.copy_(bias_hh)
            if weight_hr is not None:
                new.lstm.weight_hr_l0.copy_(weight_hr)
        return new

    def forward(self, x: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """x (T, B, I), state (h (1, B, r), c (1, B, H)) or None -> y (T, B, r), new state."""
        return self.lstm(x, state)

    def flops_per_step(self) -> int:
        r = self.output_size
        return 2 * 4 * self.hidden_size * (self.input_size + r) + (2 * r * self.hidden_size if self.proj_size else 0)


class ProjectedInputLinear(nn.Linear):
    """An nn.Linear built by a projection run because its input is a projected LSTM layer's output (its
    in_features are the projection's r, times the time stacking); computes as nn.Linear. The class marks the
    changed size for the structure spec, so a saved model rebuilds it."""


def input_matrix(module: nn.Module) -> torch.Tensor | None:
    """The dense matrix (O, I) with which ``module`` reads its input: a dense LSTM layer's W_ih (projected or
    not), a dense Linear's weight; None for any other module (pruned, low-rank, factorised)."""
    if isinstance(module, LSTMLayer) and not isinstance(module, SparseLSTMLayer):
        return module.weight_ih.detach()
    if type(module) in (nn.Linear, ProjectedInputLinear):
        return module.weight.detach()
    return None


def projectable(module: nn.Module) -> bool:
    """Whether ``module`` is a dense LSTM layer without a projection (one that a projection run can convert)."""
    return (isinstance(module, LSTMLayer) and not isinstance(module, SparseLSTMLayer)
            and not getattr(module, "proj_size", 0))


def with_projection(layer: LSTMLayer, weight_hh: torch.Tensor, weight_hr: torch.Tensor) -> ProjectedLSTMLayer:
    """``layer`` (dense, no projection) as a ProjectedLSTMLayer with weight_hh (4H, r) and weight_hr (r, H);
    its input side and biases are kept."""
    lstm = layer.lstm
    return ProjectedLSTMLayer.from_weights(lstm.weight_ih_l0.detach(), weight_hh, lstm.bias_ih_l0.detach(),
                                           lstm.bias_hh_l0.detach(), weight_hr)


def with_input_matrix(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A copy of the dense reader ``module`` (see ``input_matrix``) that reads its input with ``weight``
    (O, I'): an LSTM layer becomes a ProjectedLSTMLayer (its own projection, if any, kept), a Linear a
    ProjectedInputLinear."""
    if isinstance(module, LSTMLayer):
        lstm = module.lstm
        return ProjectedLSTMLayer.from_weights(weight, lstm.weight_hh_l0.detach(), lstm.bias_ih_l0.detach(),
                                               lstm.bias_hh_l0.detach(), getattr(module, "weight_hr", None))
    new = ProjectedInputLinear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if module.bias is not None:
            new.bias.copy_(module.bias)
    return new


class LSTMStack(nn.Module):
    """LSTM layers run in sequence, with dropout after every layer in training (identity in eval).

    The stack's state h is (L, B, H) whatever the layers' output sizes: a projected layer's h (1, B, r) is held
    in the first r features of its row, zeros after them, so decoders and exports keep one state shape."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, *, dropout: float = 0.0,
                 forget_gate_bias: float | None = 1.0):
        super().__init__()
        sizes = [input_size] + [hidden_size] * num_layers
        self.layers = nn.ModuleList(
            LSTMLayer(sizes[i], hidden_size, forget_gate_bias=forget_gate_bias) for i in range(num_layers))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (T, B, I), state (h, c) each (L, B, H) or None -> y (T, B, H), state (h, c) each (L, B, H)."""
        hs, cs = [], []
        width = state[0].shape[-1] if state is not None else max(layer.hidden_size for layer in self.layers)
        for i, layer in enumerate(self.layers):
            size = layer.output_size
            layer_state = None if state is None else (state[0][i:i + 1, :, :size], state[1][i:i + 1])
            x, (h, c) = layer(x, layer_state)
            x = self.dropout(x)
            hs.append(h if size == width else nn.functional.pad(h, (0, width - size)))
            cs.append(c)
        return x, (torch.cat(hs, 0), torch.cat(cs, 0))


def mask_time(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x (T, B, D) with the frames at or past each utterance's length (B,) set to zero."""
    return x * (torch.arange(x.shape[0], device=x.device).unsqueeze(1) < lengths.to(x.device).unsqueeze(0)
                ).unsqueeze(-1).to(x.dtype)


def stack_time(x: torch.Tensor, lengths: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each run of ``factor`` consecutive frames, zero-padding the end.

    x (T, B, D), lengths (B,) -> (ceil(T / factor), B, factor * D), ceil(lengths / factor).
    """
    t, b, d = x.shape
    pad = (-t) % factor
    if pad:
        x = torch.cat([x, x.new_zeros(pad, b, d)], dim=0)
    x = x.transpose(0, 1).reshape(b, (t + pad) // factor, factor * d).transpose(0, 1)
    return x, torch.div(lengths + factor - 1, factor, rounding_mode="floor")


class LowRankLinear(nn.Module):
    """y = up(down(x)) + bias with ``down`` (G*r, I) and ``up`` (G, O/G, r): a rank-r factorisation of each
    of G row blocks of an (O, I) weight. G = 1 factorises the whole matrix; G = 4 factorises each LSTM gate
    separately ("rollout"). Parameters: G*r*I + O*r (+ O for the bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, groups: int = 1, bias: bool = True):
        super().__init__()
        if out_features % groups:
            raise ValueError(f"{out_features} outputs do not split into {groups} groups")
        self.in_features, self.out_features, self.rank, self.groups = in_features, out_features, rank, groups
        self.down = nn.Parameter(torch.zeros(groups * rank, in_features))
        self.up = nn.Parameter(torch.zeros(groups, out_features // groups, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.linear(x, self.down)                      # (..., G*r)
        if self.groups == 1:
            y = torch.nn.functional.linear(z, self.up[0])                 # (..., O)
        else:
            z = z.unflatten(-1, (self.groups, self.rank))                 # (..., G, r)
            y = torch.einsum("...gr,gor->...go", z, self.up).flatten(-2)  # (..., O)
        return y if self.bias is None else y + self.bias

    def weight(self) -> torch.Tensor:
        """The (O, I) matrix this factorisation stands for."""
        down = self.down.unflatten(0, (self.groups, self.rank))           # (G, r, I)
        return torch.bmm(self.up, down).flatten(0, 1)

    def flops(self) -> int:
        return 2 * (self.groups * self.rank * self.in_features + self.out_features * self.rank)


class ResidualLinear(nn.Module):
    """y = base(x) + residual(x): a Linear (dense or low-rank) whose weights a sharing plan may share across
    layers, plus a per-layer low-rank correction ``residual`` (a LowRankLinear without bias) that is never
    shared. Parameters: the base's + r (I + O)."""

    def __init__(self, base: nn.Module, residual: LowRankLinear):
        super().__init__()
        self.base, self.residual = base, residual
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.residual(x)

    def weight(self) -> torch.Tensor:
        """The (O, I) matrix this module stands for."""
        base = self.base.weight() if isinstance(self.base, LowRankLinear) else self.base.weight
        return base + self.residual.weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def flops(self) -> int:
        base = self.base.flops() if isinstance(self.base, LowRankLinear) else 2 * self.in_features * self.out_features
        return base + self.residual.flops()


class BasisLinear(nn.Module):
    """y = coefficients(basis(x)): a rank-r factorisation whose input-side factor ``basis`` (r, I) a sharing
    plan may share across layers (one basis for a group, as Basis Sharing does), and whose output-side factor
    ``coefficients`` (O, r) with the bias stays per layer (a module of this name is never shared).
    Parameters: r I + O r (+ O)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.basis = nn.Linear(in_features, rank, bias=False)
        self.coefficients = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficients(self.basis(x))

    def weight(self) -> torch.Tensor:
        """The (O, I) matrix this factorisation stands for."""
        return self.coefficients.weight @ self.basis.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.coefficients.bias

    def flops(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)


class SparseLinear(nn.Linear):
    """An nn.Linear whose pruned weights are exact zeros; computes as nn.Linear. Like SparseLSTMLayer, the
    class marks the weight as pruned for the structure spec and the sparse storage size."""

    @classmethod
    def from_weight(cls, layer: nn.Linear, weight: torch.Tensor) -> "SparseLinear":
        """A copy of ``layer`` with the given (pruned) weight (O, I) and its own bias."""
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            new.weight.copy_(weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new


class FactorizedLSTMLayer(nn.Module):
    """An LSTM layer whose input-side and recurrent-side maps are arbitrary modules (dense ``nn.Linear`` or
    ``LowRankLinear``), computed as W x via the factors, so a low-rank saving is real in FLOPs and parameters.

    Same interface and gate order as LSTMLayer; the input side runs for all time steps at once, the recurrence
    step by step.
    """

    def __init__(self, ih: nn.Module, hh: nn.Module, hidden_size: int):
        super().__init__()
        self.ih, self.hh = ih, hh
        self.input_size = ih.in_features
        self.hidden_size = hidden_size

    @property
    def output_size(self) -> int:
        return self.hidden_size

    def forward(self, x: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """x (T, B, I), state (h, c) each (1, B, H) or None -> y (T, B, H), new state."""
        steps, batch = x.shape[:2]
        pre = self.ih(x)                                                  # (T, B, 4H)
        if state is None:
            h = x.new_zeros(batch, self.hidden_size)
            c = x.new_zeros(batch, self.hidden_size)
        else:
            h, c = state[0][0], state[1][0]
        outputs = []
        for t in range(steps):
            i, f, g, o = (pre[t] + self.hh(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        y = torch.stack(outputs) if outputs else x.new_zeros(0, batch, self.hidden_size)
        return y, (h.unsqueeze(0), c.unsqueeze(0))

    def flops_per_step(self) -> int:
        def cost(m: nn.Module) -> int:
            return m.flops() if isinstance(m, LowRankLinear) else 2 * m.in_features * m.out_features

        return cost(self.ih) + cost(self.hh)


# --- compression structure: which modules a method replaced, as JSON, so a saved model rebuilds itself -------

def _side_spec(m: nn.Module) -> dict:
    if isinstance(m, LowRankLinear):
        return {"type": "lowrank", "in": m.in_features, "out": m.out_features, "rank": m.rank,
                "groups": m.groups, "bias": m.bias is not None}
    if isinstance(m, SparseLinear):
        return {"type": "sparse", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                "nonzeros": int(m.weight.count_nonzero())}
    return {"type": "dense", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}


def _build_side(spec: dict) -> nn.Module:
    if spec["type"] == "lowrank":
        return LowRankLinear(spec["in"], spec["out"], spec["rank"], groups=spec["groups"], bias=spec["bias"])
    if spec["type"] == "dense":
        return nn.Linear(spec["in"], spec["out"], bias=spec["bias"])
    if spec["type"] == "sparse":
        return SparseLinear(spec["in"], spec["out"], bias=spec["bias"])
    raise ValueError(f"unknown layer side type {spec['type']!r}")


def layer_spec(module: nn.Module) -> dict | None:
    """JSON description of a replaced (compressed) module, or None for a module of the family's own build.

    Pruned modules record the non-zeros of each matrix ("sparse" sides); a pruned LSTM layer is described by
    its two sides, like a factorised one."""
    if isinstance(module, ProjectedLSTMLayer):
        return {"type": "projected_lstm", "input_size": module.input_size, "hidden_size": module.hidden_size,
                "proj_size": module.proj_size}
    if isinstance(module, ProjectedInputLinear):
        return {"type": "projected_input_linear", "in": module.in_features, "out": module.out_features,
                "bias": module.bias is not None}
    if isinstance(module, FactorizedLSTMLayer):
        return {"type": "factorized_lstm", "hidden_size": module.hidden_size, "ih": _side_spec(module.ih),
                "hh": _side_spec(module.hh)}
    if isinstance(module, SparseLSTMLayer):
        def side(weight: torch.Tensor) -> dict:
            return {"type": "sparse", "in": weight.shape[1], "out": weight.shape[0], "bias": True,
                    "nonzeros": int(weight.count_nonzero())}

        return {"type": "sparse_lstm", "hidden_size": module.hidden_size, "ih": side(module.weight_ih),
                "hh": side(module.weight_hh)}
    if isinstance(module, ResidualLinear):
        return {"type": "residual", "in": module.in_features, "out": module.out_features,
                "base": _side_spec(module.base), "rank": module.residual.rank}
    if isinstance(module, BasisLinear):
        return {"type": "basis", "in": module.in_features, "out": module.out_features, "rank": module.rank,
                "bias": module.bias is not None}
    if isinstance(module, (LowRankLinear, SparseLinear)):
        return _side_spec(module)
    from asrshrink.models.branched import branched_spec

    return branched_spec(module)


def build_layer(spec: dict) -> nn.Module:
    """The module a ``layer_spec`` describes, with uninitialised weights (a state dict fills them)."""
    if spec["type"] == "factorized_lstm":
        return FactorizedLSTMLayer(_build_side(spec["ih"]), _build_side(spec["hh"]), spec["hidden_size"])
    if spec["type"] == "sparse_lstm":
        return SparseLSTMLayer(spec["ih"]["in"], spec["hidden_size"])
    if spec["type"] == "projected_lstm":
        return ProjectedLSTMLayer(spec["input_size"], spec["hidden_size"], spec["proj_size"])
    if spec["type"] == "projected_input_linear":
        return ProjectedInputLinear(spec["in"], spec["out"], bias=spec["bias"])
    if spec["type"] == "residual":
        return ResidualLinear(_build_side(spec["base"]), LowRankLinear(spec["in"], spec["out"], spec["rank"],
                                                                       bias=False))
    if spec["type"] == "basis":
        return BasisLinear(spec["in"], spec["out"], spec["rank"], bias=spec["bias"])
    if spec["type"] in ("branched_lstm", "arbitrator"):
        from asrshrink.models.branched import build_branched

        return build_branched(spec)
    return _build_side(spec)


def sparse_matrices(module: nn.Module) -> list[torch.Tensor]:
    """The pruned weight matrices held directly by ``module`` (not by its children): both matrices of a
    SparseLSTMLayer, the weight of a SparseLinear; none for any other module."""
    if isinstance(module, SparseLSTMLayer):
        return [module.weight_ih, module.weight_hh]
    if isinstance(module, SparseLinear):
        return [module.weight]
    return []


def sparse_storage_bytes(numel: int, nonzeros: int, element_size: int = 4) -> int:
    """Bytes of a pruned matrix stored as a bit mask (one bit per element, rounded up to whole bytes) plus its
    non-zero values: ceil(n / 8) + e z. Against e n dense bytes this is eq. 13 of Prabhavalkar et al.,
    "Compression of end-to-end models" (for float32, ratio 1 / (1 - s + 1/32) at sparsity s)."""
    return -(-numel // 8) + element_size * nonzeros


def model_structure(model: nn.Module) -> dict[str, dict]:
    """Every replaced module of ``model`` by its dotted name (outermost only)."""
    found: dict[str, dict] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in found):
            continue
        spec = layer_spec(module)
        if spec is not None:
            found[name] = spec
    return found


# --- one interface over every compressible matrix: dense, low-rank or pruned, inside an LSTM layer or a Linear --

@dataclass(frozen=True)
class Matrix:
    """One compressible weight matrix as methods and exports see it, whatever module holds it.

    ``weight`` (O, I) is the effective matrix (for low-rank factors, up @ down), ``bias`` (O,) its bias (zeros
    if the module has none); ``kind`` is "dense", "lowrank", "sparse" or "residual" (a shared part plus a
    per-layer part: ``ResidualLinear``, ``BasisLinear``); ``factors`` the low-rank module, and
    ``mask`` (O, I) bool the kept entries of a pruned matrix."""

    weight: torch.Tensor
    bias: torch.Tensor
    kind: str
    factors: "LowRankLinear | None" = None
    mask: torch.Tensor | None = None


def _linear_matrix(m: nn.Module) -> Matrix:
    bias = m.bias.detach() if m.bias is not None else torch.zeros(m.out_features)
    if isinstance(m, LowRankLinear):
        return Matrix(m.weight().detach(), bias, "lowrank", factors=m)
    weight = m.weight.detach()
    if isinstance(m, SparseLinear):
        return Matrix(weight, bias, "sparse", mask=weight != 0)
    return Matrix(weight, bias, "dense")


def matrices(module: nn.Module) -> dict[str, Matrix]:
    """The compressible matrices ``module`` holds itself, by side: an LSTM layer's input ("ih") and recurrent
    ("hh") matrices (4H, I) and (4H, H); a Linear's (dense, low-rank or pruned) weight ("linear"); nothing for
    any other module; nothing for a projected LSTM layer (no method compresses it further)."""
    if getattr(module, "proj_size", 0):
        return {}
    if isinstance(module, LSTMLayer):
        lstm, kind = module.lstm, "sparse" if isinstance(module, SparseLSTMLayer) else "dense"
        out = {}
        for side, weight, bias in (("ih", lstm.weight_ih_l0, lstm.bias_ih_l0), ("hh", lstm.weight_hh_l0,
                                                                                 lstm.bias_hh_l0)):
            weight = weight.detach()
            out[side] = Matrix(weight, bias.detach(), kind, mask=weight != 0 if kind == "sparse" else None)
        return out
    if isinstance(module, FactorizedLSTMLayer):
        return {side: _linear_matrix(getattr(module, side)) for side in ("ih", "hh")}
    if isinstance(module, (nn.Linear, LowRankLinear)):
        return {"linear": _linear_matrix(module)}
    if isinstance(module, (ResidualLinear, BasisLinear)):  # shared and per-layer parts: no method refactors it
        bias = module.bias.detach() if module.bias is not None else torch.zeros(module.out_features)
        return {"linear": Matrix(module.weight().detach(), bias, "residual")}
    return {}


# --- per-channel affine maps: normalisations and depthwise convolutions, as a merge sees them --------------------

def channel_map(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The per-channel affine map y_c = w_c . f_c + b_c that ``module`` computes in eval mode, as (weight (C, F),
    bias (C,)) over the per-channel features of ``channel_features``: a LayerNorm over one dimension (F = 1,
    the normalised input), a BatchNorm1d (F = 1, the raw input), a depthwise Conv1d (F = the kernel, the input
    window); None for any other module."""
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 and module.weight is not None:
        return module.weight.detach().unsqueeze(1), module.bias.detach()
    if isinstance(module, nn.BatchNorm1d) and module.affine and module.running_var is not None:
        scale = module.weight.detach() / torch.sqrt(module.running_var + module.eps)
        return scale.unsqueeze(1), module.bias.detach() - module.running_mean * scale
    if _depthwise(module):
        bias = module.bias.detach() if module.bias is not None else torch.zeros(module.out_channels)
        return module.weight.detach()[:, 0, :], bias
    return None


def _depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv1d) and module.groups == module.in_channels == module.out_channels
            and module.stride == (1,) and module.dilation == (1,) and isinstance(module.padding, tuple))


def channel_features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The per-channel features (B, T, C, F) of ``module``'s input ``x`` (a LayerNorm's (B, T, C); a BatchNorm1d's
    or depthwise Conv1d's (B, C, T)), time on dim 1, so rows select like a batch-first input."""
    if isinstance(module, nn.LayerNorm):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return ((x - mean) / torch.sqrt(var + module.eps)).unsqueeze(-1)
    if isinstance(module, nn.BatchNorm1d):
        return x.transpose(1, 2).unsqueeze(-1)
    pad = module.padding[0]
    windows = nn.functional.pad(x, (pad, pad)).unfold(2, module.kernel_size[0], 1)   # (B, C, T, K)
    return windows.transpose(1, 2)


@torch.no_grad()
def set_channel_map(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Make ``module`` compute the per-channel map (weight (C, F), bias (C,)) of ``channel_map``, in place (a
    BatchNorm1d gets running mean 0 and running variance 1 - eps, its affine parameters the map)."""
    if isinstance(module, nn.LayerNorm):
        module.weight.copy_(weight[:, 0])
        module.bias.copy_(bias)
    elif isinstance(module, nn.BatchNorm1d):
        module.running_mean.zero_()
        module.running_var.fill_(1.0 - module.eps)
        module.weight.copy_(weight[:, 0])
        module.bias.copy_(bias)
    else:
        module.weight.copy_(weight.unsqueeze(1))
        if module.bias is not None:
            module.bias.copy_(bias)


def dense_parameter(module: nn.Module, side: str) -> nn.Parameter | None:
    """The parameter that stores matrix ``side`` of ``module`` element by element (dense or pruned), which
    training may mask in place; None for low-rank factors."""
    if isinstance(module, LSTMLayer):
        return {"ih": module.lstm.weight_ih_l0, "hh": module.lstm.weight_hh_l0}[side]
    holder = getattr(module, side) if isinstance(module, FactorizedLSTMLayer) else module
    return None if isinstance(holder, LowRankLinear) else holder.weight


def is_lstm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one LSTM layer (dense, pruned or factorised): (x (T, B, I)) -> (y (T, B, H), state)."""
    return isinstance(module, (LSTMLayer, FactorizedLSTMLayer))


def lstm_side_weights(layer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The effective (weight (4H, I or H), bias (4H,)) of an LSTM layer's input ("ih") and recurrent ("hh") side."""
    return {side: (m.weight, m.bias) for side, m in matrices(layer).items()}


def named_lstm_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """LSTM layers (dense or factorised) inside ``module``, in registration (forward) order."""
    return [(name, m) for name, m in module.named_modules() if is_lstm_layer(m)]


def with_pruned_weights(layer: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``layer`` holding the pruned ``weights`` by side ("ih", "hh" or "linear") as a sparse module."""
    if isinstance(layer, LSTMLayer):
        current = lstm_side_weights(layer)
        return SparseLSTMLayer.from_weights(layer, weights.get("ih", current["ih"][0]),
                                            weights.get("hh", current["hh"][0]))
    if isinstance(layer, FactorizedLSTMLayer):
        sides = {s: SparseLinear.from_weight(getattr(layer, s), weights[s]) if s in weights else getattr(layer, s)
                 for s in ("ih", "hh")}
        return FactorizedLSTMLayer(sides["ih"], sides["hh"], layer.hidden_size)
    return SparseLinear.from_weight(layer, weights["linear"])

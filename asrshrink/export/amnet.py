"""ONNX export forms of an AmNet encoder (``asrshrink.models.branched``): per-frame branch switching inside one
encoder graph, each frame computing only its chosen branch.

The arbitrator reads the stacked features only (and its own previous decision), never the branched layers'
states, so the encoder graph decides every frame first and then runs the layers:

- the arbitrator: with decision feedback a Scan whose body steps its LSTM layers on [x_t, d_{t-1}], projects
  to N logits, and feeds back the one-hot argmax of log pi_t; without feedback ONNX LSTM ops over all frames;
- each branched LSTM layer: the input side for all frames at once, each frame's rows gathered (GatherND) by
  branch and multiplied by that branch's matrix only, scattered back (ScatterND); then a Scan over time whose
  body picks the recurrent matrices with an If on the frame's branch (an If per branch when every utterance of
  the batch chose the same one, as at batch 1; otherwise rows gathered by branch as on the input side).

Weights the branches share are stored once: MF layers keep the slow branch's factors, the fast branch's being
Slice nodes over them (their first r_fast columns / rows); sparse layers keep one weight (the slow mask
applied) and the fast mask as a bool tensor, the fast weight being a Where over them. Both are main-graph nodes
over initializers, which onnxruntime folds into constants once when it loads the file.

The graph's extra outputs are the decisions: ``branch`` (B, T') int64 (0 slow, 1 fast) and ``branch_log_probs``
(B, T', N), the arbitrator's log pi.

Dimension letters: T time steps, B batch, I input size, H hidden size, N branches, F arbitrator input size,
A arbitrator hidden size, L arbitrator layers.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from asrshrink.models.branched import SIDES, Arbitrator, BranchedLSTMLayer

DOMAIN = "asrshrink"
BRANCHED = "BranchedLSTM"
ARBITRATOR = "ArbitratorRecurrence"


# --- the placeholders traced by torch.onnx ---------------------------------------------------------------------

def _gates(pre: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i, f, g, o = pre.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _branch_matrices(kind: str, ranks: tuple[int, ...], weights: tuple[torch.Tensor, ...]
                     ) -> list[list[torch.Tensor]]:
    """Per branch, the matmul chain (transposed for x @ W) of one side: [down (X, r_n), up (r_n, 4H)] for "mf",
    [W_n (X, 4H)] for "sparse" (weights: the slow weight and the fast mask)."""
    if kind == "mf":
        down, up = weights
        return [[down[:, :r], up[:r]] for r in ranks]
    weight, fast = weights
    return [[weight], [weight * fast]]


def _chain(x: torch.Tensor, chain: list[torch.Tensor]) -> torch.Tensor:
    for w in chain:
        x = x @ w
    return x


class _BranchedRecurrence(torch.autograd.Function):
    """A branched LSTM layer with hard switching, traced as one placeholder node (``_branched_nodes`` writes its
    graph)."""

    @staticmethod
    def forward(ctx, x, chosen, h, c, kind, hidden, ranks, bias, *weights):
        """x (T, B, I), chosen (T, B) int64, h, c (B, H); weights: the ih side's then the hh side's."""
        half = len(weights) // 2
        sides = [_branch_matrices(kind, ranks[k], weights[k * half:(k + 1) * half]) for k in range(2)]
        steps = []
        for t in range(x.shape[0]):
            rows = [(chosen[t] == n).nonzero().flatten() for n in range(len(sides[0]))]
            pre = x.new_zeros(x.shape[1], 4 * hidden)
            for n, r in enumerate(rows):
                pre[r] = _chain(x[t, r], sides[0][n]) + bias + _chain(h[r], sides[1][n])
            h, c = _gates(pre, c)
            steps.append(h)
        y = torch.stack(steps) if steps else x.new_zeros(0, x.shape[1], hidden)
        return y, h, c

    @staticmethod
    def symbolic(g, x, chosen, h, c, kind, hidden, ranks, bias, *weights):
        flat = [r for side in ranks for r in side]
        outputs = g.op(f"{DOMAIN}::{BRANCHED}", x, chosen, h, c, bias, *weights, kind_s=kind, hidden_i=hidden,
                       ranks_i=flat, branches_i=len(ranks[0]), outputs=3)
        for value, rank in zip(outputs, (3, 2, 2)):
            value.setType(x.type().with_sizes([None] * (rank - 1) + [hidden]))
        return outputs


class ExportBranchedLSTM(nn.Module):
    """Export form of a BranchedLSTMLayer: the shared weights once, transposed for x @ W, the two biases summed."""

    takes_decisions = True

    def __init__(self, layer: BranchedLSTMLayer):
        super().__init__()
        self.kind, self.hidden_size, self.branches = layer.kind, layer.hidden_size, layer.branches
        self.input_size, self.output_size = layer.input_size, layer.hidden_size
        self.ranks = tuple(tuple(layer.ranks[s]) for s in SIDES) if layer.kind == "mf" \
            else tuple((0,) * layer.branches for _ in SIDES)
        if layer.branches != 2:
            from asrshrink.export.onnx import ExportError

            raise ExportError(f"ONNX export switches between two branches (slow, fast); this AmNet layer has "
                              f"{layer.branches}")
        with torch.no_grad():
            self.register_buffer("bias", (layer.bias_ih + layer.bias_hh).detach().clone())
            for s in SIDES:
                if layer.kind == "mf":
                    self.register_buffer(f"{s}_down", getattr(layer, f"{s}_down").detach().t().contiguous())
                    self.register_buffer(f"{s}_up", getattr(layer, f"{s}_up").detach().t().contiguous())
                else:
                    self.register_buffer(f"{s}_weight", layer.weight(s, 0).detach().t().contiguous())
                    self.register_buffer(f"{s}_fast", getattr(layer, f"mask_{s}")[1].t().contiguous().bool())

    def side_weights(self) -> list[torch.Tensor]:
        names = ("down", "up") if self.kind == "mf" else ("weight", "fast")
        return [getattr(self, f"{s}_{n}") for s in SIDES for n in names]

    def forward(self, x: torch.Tensor, decisions: torch.Tensor, state=None, *, hard: bool = True):
        """x (T, B, I), decisions (T, B, N) one-hot -> y (T, B, H), (h, c) each (1, B, H)."""
        h = c = x.new_zeros(x.shape[1], self.hidden_size)
        y, h, c = _BranchedRecurrence.apply(x, decisions.argmax(-1), h, c, self.kind, self.hidden_size, self.ranks,
                                            self.bias, *self.side_weights())
        return y, (h.unsqueeze(0), c.unsqueeze(0))


class _ArbitratorRecurrence(torch.autograd.Function):
    """The arbitrator with decision feedback and argmax decisions, traced as one placeholder node."""

    @staticmethod
    def forward(ctx, x, layers, hidden, branches, *weights):
        """x (T', B, F); weights: per layer W_ih^T, W_hh^T, b, then the projection's W^T and b."""
        batch = x.shape[1]
        hs = [x.new_zeros(batch, hidden) for _ in range(layers)]
        cs = [x.new_zeros(batch, hidden) for _ in range(layers)]
        d = x.new_zeros(batch, branches)
        decisions, log_pis = [], []
        for t in range(x.shape[0]):
            z = torch.cat([x[t], d], -1)
            for k in range(layers):
                w_ih, w_hh, b = weights[3 * k:3 * k + 3]
                hs[k], cs[k] = _gates(z @ w_ih + hs[k] @ w_hh + b, cs[k])
                z = hs[k]
            log_pi = F.log_softmax(z @ weights[-2] + weights[-1], -1)
            d = F.one_hot(log_pi.argmax(-1), branches).to(x.dtype)
            decisions.append(d)
            log_pis.append(log_pi)
        if not decisions:
            empty = x.new_zeros(0, batch, branches)
            return empty, empty.clone()
        return torch.stack(decisions), torch.stack(log_pis)

    @staticmethod
    def symbolic(g, x, layers, hidden, branches, *weights):
        outputs = g.op(f"{DOMAIN}::{ARBITRATOR}", x, *weights, layers_i=layers, hidden_i=hidden,
                       branches_i=branches, outputs=2)
        for value in outputs:
            value.setType(x.type().with_sizes([None, None, branches]))
        return outputs


class ExportArbitrator(nn.Module):
    """Export form of an Arbitrator (hard decisions only)."""

    def __init__(self, arbitrator: Arbitrator):
        super().__init__()
        self.rnn, self.proj = arbitrator.rnn, arbitrator.proj
        self.feedback, self.branches = arbitrator.feedback, arbitrator.branches
        self.hidden_size, self.num_layers = arbitrator.hidden_size, arbitrator.num_layers
        if self.feedback:
            with torch.no_grad():
                for k in range(self.num_layers):
                    self.register_buffer(f"w_ih{k}", getattr(self.rnn, f"weight_ih_l{k}").detach().t().contiguous())
                    self.register_buffer(f"w_hh{k}", getattr(self.rnn, f"weight_hh_l{k}").detach().t().contiguous())
                    self.register_buffer(f"b{k}", (getattr(self.rnn, f"bias_ih_l{k}")
                                                   + getattr(self.rnn, f"bias_hh_l{k}")).detach().clone())
                self.register_buffer("w_proj", self.proj.weight.detach().t().contiguous())
                self.register_buffer("b_proj", self.proj.bias.detach().clone())

    def forward(self, x: torch.Tensor, *, sampling: str = "hard", temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T', B, F) -> one-hot decisions (T', B, N), log pi (T', B, N)."""
        if not self.feedback:
            y, _ = self.rnn(x)
            log_pi = F.log_softmax(self.proj(y), -1)
            d = (log_pi.argmax(-1).unsqueeze(-1) == torch.arange(self.branches)).to(x.dtype)
            return d, log_pi
        weights = [getattr(self, f"{n}{k}") for k in range(self.num_layers) for n in ("w_ih", "w_hh", "b")]
        return _ArbitratorRecurrence.apply(x, self.num_layers, self.hidden_size, self.branches,
                                           *weights, self.w_proj, self.b_proj)


def export_form(module: nn.Module) -> nn.Module | None:
    """The export form of an AmNet module, or None for any other module."""
    if isinstance(module, BranchedLSTMLayer):
        return ExportBranchedLSTM(module)
    if isinstance(module, Arbitrator):
        return ExportArbitrator(module)
    return None


# --- the ONNX graphs that replace the placeholders ----------------------------------------------------------------

class _Builder:
    """Nodes of one (sub)graph, named under a prefix unique in the model."""

    def __init__(self, prefix: str, opset: int = 0):
        self.prefix, self.nodes, self.opset = prefix, [], opset

    def op(self, kind: str, inputs: list[str], outputs: int = 1, **attrs) -> str | list[str]:
        names = [f"{self.prefix}{kind.lower()}{len(self.nodes)}" + (f"_{k}" if outputs > 1 else "")
                 for k in range(outputs)]
        self.nodes.append(helper.make_node(kind, inputs, names, name=f"{self.prefix}n{len(self.nodes)}", **attrs))
        return names[0] if outputs == 1 else names

    def const(self, values, dtype=np.int64) -> str:
        array = np.asarray(values, dtype=dtype)
        name = f"{self.prefix}const{len(self.nodes)}"
        return self.op("Constant", [], value=numpy_helper.from_array(array, name))

    def zeros(self, like_rows: str, width: int) -> str:
        """Zeros (R, width) float with R the first dimension of ``like_rows``."""
        rows = self.op("Slice", [self.op("Shape", [like_rows]), self.const([0]), self.const([1])])
        return self.op("ConstantOfShape", [self.op("Concat", [rows, self.const([width])], axis=0)],
                       value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))

    def reduce(self, kind: str, x: str, axes: list[int] | None) -> str:
        """ReduceMin / ReduceMax over ``axes`` (None: all), dimensions dropped, in either opset's form."""
        if axes is None:
            return self.op(kind, [x], keepdims=0)
        if self.opset >= 18:
            return self.op(kind, [x, self.const(axes)], keepdims=0)
        return self.op(kind, [x], axes=axes, keepdims=0)

    def split4(self, gates: str, opset: int) -> list[str]:
        extra = {"num_outputs": 4} if opset >= 18 else {}
        return self.op("Split", [gates], outputs=4, axis=1, **extra)

    def cell(self, gates: str, c: str, opset: int) -> tuple[str, str]:
        """PyTorch's gate order i, f, g, o -> (h', c')."""
        i, f, g, o = self.split4(gates, opset)
        c_next = self.op("Add", [self.op("Mul", [self.op("Sigmoid", [f]), c]),
                                 self.op("Mul", [self.op("Sigmoid", [i]), self.op("Tanh", [g])])])
        return self.op("Mul", [self.op("Sigmoid", [o]), self.op("Tanh", [c_next])]), c_next

    def graph(self, name: str, inputs: list, outputs: list) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, f"{self.prefix}{name}", inputs, outputs)


def _value(name: str, shape: list, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _attr(node: onnx.NodeProto, name: str):
    return helper.get_attribute_value(next(a for a in node.attribute if a.name == name))


def _by_rows(b: _Builder, x: str, k: str, width: int, branches: int, apply) -> str:
    """(R, X) rows of ``x``, row r mapped by ``apply(builder, rows, n)`` of its branch k[r] (R,) only -> (R, width)."""
    out = b.zeros(x, width)
    for n in range(branches):
        idx = b.op("Transpose", [b.op("NonZero", [b.op("Equal", [k, b.const([n])])])], perm=[1, 0])   # (R_n, 1)
        out = b.op("ScatterND", [out, idx, apply(b, b.op("GatherND", [x, idx]), n)])
    return out


def branched_nodes(node: onnx.NodeProto, opset: int) -> list[onnx.NodeProto]:
    """The graph of a ``BranchedLSTM`` placeholder: inputs x (T, B, I), chosen (T, B), h0, c0 (B, H), bias (4H),
    the ih side's weights, the hh side's; outputs y (T, B, H), h, c."""
    x, chosen, h0, c0, bias, *weights = node.input
    kind, hidden, branches = _attr(node, "kind").decode(), _attr(node, "hidden"), _attr(node, "branches")
    ranks = list(_attr(node, "ranks"))
    b = _Builder(f"{node.output[0]}/amnet/", opset)
    half = len(weights) // 2
    matrices = []                                            # [side][branch] -> matmul chain (weight names)
    for k in range(2):
        w = weights[k * half:(k + 1) * half]
        if kind == "mf":
            rs = ranks[k * branches:(k + 1) * branches]
            matrices.append([[w[0], w[1]] if n == 0 else
                             [b.op("Slice", [w[0], b.const([0]), b.const([rs[n]]), b.const([1])]),
                              b.op("Slice", [w[1], b.const([0]), b.const([rs[n]]), b.const([0])])]
                             for n in range(branches)])
        else:
            zero = b.const(0.0, np.float32)
            matrices.append([[w[0]], [b.op("Where", [w[1], w[0], zero])]])

    def project(side: int):
        def apply(builder: _Builder, rows: str, n: int) -> str:
            for weight in matrices[side][n]:
                rows = builder.op("MatMul", [rows, weight])
            return rows
        return apply

    out = 4 * hidden
    # input side: every frame at once, each (frame, utterance) row by its own branch
    x_flat = b.op("Flatten", [x], axis=2)                                               # (T*B, I)
    k_flat = b.op("Reshape", [chosen, b.const([-1])])                                   # (T*B,)
    pre = b.op("Add", [_by_rows(b, x_flat, k_flat, out, branches, project(0)), bias])
    pre = b.op("Reshape", [pre, b.op("Concat", [b.op("Shape", [chosen]), b.const([out])], axis=0)])  # (T, B, 4H)

    # the recurrence: when every frame's utterances agree on a branch (always so at batch 1) a Scan whose body
    # runs one If on the frame's branch; otherwise a Scan whose body gathers the state's rows by branch
    lo, hi = (b.reduce(kind, chosen, [1]) for kind in ("ReduceMin", "ReduceMax"))          # (T,)
    agree = b.reduce("ReduceMin", b.op("Cast", [b.op("Equal", [lo, hi])], to=TensorProto.INT32), None)
    fast = b.op("Equal", [lo, b.const(1)])                                                 # (T,) bool

    def scan(tag: str, per_frame: str, frame_type, recurrent) -> onnx.GraphProto:
        body = _Builder(f"{node.output[0]}/amnet/{tag}/")
        h, c, xt, kt = (f"{body.prefix}{n}" for n in ("h", "c", "x", "k"))
        h_next, c_next = body.cell(body.op("Add", [xt, recurrent(body, h, kt)]), c, opset)
        y = body.op("Identity", [h_next])
        graph = body.graph("body", [_value(h, [None, hidden]), _value(c, [None, hidden]), _value(xt, [None, out]),
                                    _value(kt, *frame_type)],
                           [_value(h_next, [None, hidden]), _value(c_next, [None, hidden]), _value(y, [None, hidden])])
        outer = _Builder(f"{node.output[0]}/amnet/{tag}_run/")
        names = [f"{outer.prefix}{n}" for n in ("h", "c", "y")]
        outer.nodes.append(helper.make_node("Scan", [h0, c0, pre, per_frame], names, name=f"{outer.prefix}scan",
                                            body=graph, num_scan_inputs=2))
        return outer.graph("run", [], [_value(names[0], [None, hidden]), _value(names[1], [None, hidden]),
                                       _value(names[2], [None, None, hidden])])

    def one_branch(body: _Builder, h: str, is_fast: str) -> str:
        graphs = []
        for n in (1, 0):
            g = _Builder(f"{body.prefix}only{n}/")
            graphs.append(g.graph("branch", [], [_value(project(1)(g, h, n), [None, out])]))
        return body.op("If", [is_fast], then_branch=graphs[0], else_branch=graphs[1])

    def by_branch(body: _Builder, h: str, k: str) -> str:
        return _by_rows(body, h, k, out, branches, project(1))

    b.nodes.append(helper.make_node(
        "If", [b.op("Equal", [agree, b.const(1, np.int32)])], [node.output[1], node.output[2], node.output[0]],
        name=f"{b.prefix}switch", then_branch=scan("agree", fast, ([], TensorProto.BOOL), one_branch),
        else_branch=scan("rows", chosen, ([None], TensorProto.INT64), by_branch)))
    return b.nodes


def arbitrator_nodes(node: onnx.NodeProto, opset: int) -> list[onnx.NodeProto]:
    """The graph of an ``ArbitratorRecurrence`` placeholder: inputs x (T', B, F), per layer W_ih^T, W_hh^T, b,
    the projection's W^T, b; outputs one-hot decisions (T', B, N), log pi (T', B, N)."""
    x, *weights = node.input
    layers, hidden, branches = _attr(node, "layers"), _attr(node, "hidden"), _attr(node, "branches")
    b = _Builder(f"{node.output[0]}/arbitrator/")
    first = b.op("Gather", [x, b.const(0)], axis=0)                                    # (B, F): the batch size
    h0, d0 = b.zeros(first, hidden), b.zeros(first, branches)
    body = _Builder(f"{node.output[0]}/arbitrator/scan/")
    hs = [f"{body.prefix}h{k}" for k in range(layers)]
    cs = [f"{body.prefix}c{k}" for k in range(layers)]
    d, xt = f"{body.prefix}d", f"{body.prefix}x"
    z = body.op("Concat", [xt, d], axis=1)
    new_h, new_c = [], []
    for k in range(layers):
        w_ih, w_hh, bias = weights[3 * k:3 * k + 3]
        gates = body.op("Add", [body.op("Add", [body.op("MatMul", [z, w_ih]), body.op("MatMul", [hs[k], w_hh])]),
                                bias])
        hk, ck = body.cell(gates, cs[k], opset)
        new_h.append(hk)
        new_c.append(ck)
        z = hk
    log_pi = body.op("LogSoftmax", [body.op("Add", [body.op("MatMul", [z, weights[-2]]), weights[-1]])], axis=1)
    pick = body.op("ArgMax", [log_pi], axis=1, keepdims=1)                             # (B, 1)
    d_next = body.op("Cast", [body.op("Equal", [pick, body.const(list(range(branches)))])], to=TensorProto.FLOAT)
    d_out = body.op("Identity", [d_next])
    size = lambda n: _value(n, [None, hidden])  # noqa: E731
    graph = body.graph("body", [*map(size, hs), *map(size, cs), _value(d, [None, branches]), _value(xt, [None, None])],
                       [*map(size, new_h), *map(size, new_c), _value(d_next, [None, branches]),
                        _value(d_out, [None, branches]), _value(log_pi, [None, branches])])
    finals = [f"{b.prefix}final{k}" for k in range(2 * layers + 1)]
    b.nodes.append(helper.make_node("Scan", [*[h0] * layers, *[h0] * layers, d0, x], [*finals, *node.output],
                                    name=f"{b.prefix}scan", body=graph, num_scan_inputs=1))
    return b.nodes


def replace(node: onnx.NodeProto, opset: int) -> list[onnx.NodeProto] | None:
    """The nodes that compute an AmNet placeholder, or None for any other node."""
    if node.domain != DOMAIN:
        return None
    if node.op_type == BRANCHED:
        return branched_nodes(node, opset)
    if node.op_type == ARBITRATOR:
        return arbitrator_nodes(node, opset)
    return None

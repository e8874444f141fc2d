"""A transducer as three ONNX models split the way deployment runtimes (sherpa-onnx, icefall) expect.

Two layouts; the family declares which (``Transducer.export_layout``).

Layout "asrshrink" (mlperf-rnnt):

Dimension letters: B batch, T feature frames, T' encoder frames, U labels, F features, L prediction layers,
P prediction size, J joint hidden size, V outputs (labels + blank), N joint evaluations.

- ``encoder.onnx``: features (B, T, F) float32, feature_lengths (B,) int64 -> encoder_out (B, T', J),
  encoder_out_lens (B,) int64. encoder_out is the encoder output already through the joint's encoder block,
  computed once per frame as greedy decoding does. The features are asrshrink's featurizer output (the
  settings are in the metadata entry ``feature``): featurisation is not part of the graph.
- ``decoder.onnx``: targets (B, U) int64 (the blank id is the start symbol), h, c (L, B, P) -> decoder_out
  (B, U, J) (the prediction output through the joint's prediction block), next_h, next_c.
- ``joiner.onnx``: encoder_out (N, J), decoder_out (N, J) -> logits (N, V).

Layout "nemo" (nemo-conformer-transducer): sherpa-onnx's ``nemo_transducer`` interface (read from sherpa-onnx's
``offline-transducer-nemo-model.cc``; decoded by sherpa-onnx 2.0.1 in the tests), which binds inputs and outputs by
position:

- ``encoder.onnx``: audio_signal (B, F, T) float32, length (B,) int64 -> outputs (B, D, T'), encoded_lengths
  (B,) int64; the features are NeMo's (per-feature normalised log-mel, channels first).
- ``decoder.onnx``: targets (B, U) int32 (blank is the start symbol), target_length (B,) int32, states.1 and
  states.2 (L, B, P) -> outputs (B, P, U), prednet_lengths (B,) int32, next states.1 and states.2.
- ``joiner.onnx``: encoder_outputs (B, D, T'), decoder_outputs (B, P, U) -> logits (B, T', U, V); sherpa-onnx
  feeds T' = U = 1.
- metadata on every part: ``vocab_size`` (V - 1: blank excluded, as NeMo counts), ``normalize_type``,
  ``pred_rnn_layers``, ``pred_hidden``, ``subsampling_factor``, ``feat_dim``, ``model_type``
  (``EncDecRNNTBPEModel``), besides asrshrink's own entries.

Dense LSTM layers become the ONNX LSTM op. A factorised LSTM layer keeps its factors: the input side runs for
all frames at once as matmuls by the factors, and the recurrence is a Scan over time whose body multiplies the
hidden state by the recurrent factors, so the exported model costs what the compressed one does and takes any
number of frames. A projected LSTM layer (``nn.LSTM(proj_size=r)``) is a Scan in the same way, its body
computing m_t = W_hr h_t after the cell: ONNX's LSTM op has no projection (its h and c are one size), and the
op with R = W_hh W_hr (4H x H) would compute the same but store and multiply the dense matrix.

An AmNet's encoder (``amnet-finetune``) switches branches per frame inside the graph and has two more outputs,
branch (B, T') int64 and branch_log_probs (B, T', N); see ``asrshrink.export.amnet``.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper
from torch import nn

import asrshrink
from asrshrink.audio.datasets import open_dataset
from asrshrink.audio.text import Vocabulary
from asrshrink.errors import AsrshrinkError
from asrshrink.export import DEFAULT_OPSET
from asrshrink.io import write_json_atomic
from asrshrink.models.base import Transducer
from asrshrink.models.checkpoint import ModelInfo, bundled_speech
from asrshrink.models.describe import describe
from asrshrink.models.layers import (FactorizedLSTMLayer, ProjectedLSTMLayer, is_lstm_layer, matrices,
                                     model_structure)

OPSETS = range(14, 21)          # what the TorchScript-based exporter and the Scan body here support
REPORT = "export.json"
_DOMAIN = "asrshrink"           # the placeholder op's domain; no exported file keeps it
_RECURRENCE = "LSTMRecurrence"


# --- factorised LSTM layers: the recurrence as a placeholder op while tracing, then a Scan ----------------------

class _Recurrence(torch.autograd.Function):
    """The LSTM recurrence (PyTorch gate order i, f, g, o) over precomputed input-side gate pre-activations;
    traced as one placeholder node."""

    @staticmethod
    def forward(ctx, pre, h, c, groups, hidden, proj, *weights):
        """``proj`` r > 0: the last weight is the projection transposed (H, r) and h is m_t = W_hr h_t."""
        recurrent, projection = (weights[:-1], weights[-1]) if proj else (weights, None)
        steps = []
        for x in pre:                                                     # pre (T, B, 4H)
            i, f, g, o = (x + _matmuls(h, groups, recurrent)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            if projection is not None:
                h = h @ projection                                        # (B, r)
            steps.append(h)
        return torch.stack(steps), h, c

    @staticmethod
    def symbolic(g, pre, h, c, groups, hidden, proj, *weights):
        outputs = g.op(f"{_DOMAIN}::{_RECURRENCE}", pre, h, c, *weights, groups_i=groups, hidden_i=hidden,
                       proj_i=proj, outputs=3)
        for value, rank, size in zip(outputs, (3, 2, 2), (proj or hidden, proj or hidden, hidden)):
            value.setType(pre.type().with_sizes([None] * (rank - 1) + [size]))  # time and batch vary
        return outputs


def _factors(m: nn.Module) -> tuple[int, tuple[torch.Tensor, ...]]:
    """Groups and the weights of an LSTM side (nn.Linear or LowRankLinear) transposed for x @ W: dense
    (I, O); low rank down (I, G*r) and up (r, O), or (G, r, O/G) per gate."""
    lowrank = matrices(m)["linear"].factors
    if lowrank is None:
        return 1, (m.weight.t(),)
    return lowrank.groups, (lowrank.down.t(), lowrank.up[0].t() if lowrank.groups == 1 else lowrank.up.transpose(1, 2))


def _matmuls(x: torch.Tensor, groups: int, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x (..., I) times a side given by ``_factors`` -> (..., O), by matmuls only (int8 quantization covers
    matmuls, not einsum)."""
    if len(weights) == 1:
        return x @ weights[0]
    down, up = weights
    z = x @ down                                                          # (..., G*r)
    if groups == 1:
        return z @ up
    y = z.reshape(-1, groups, z.shape[-1] // groups).transpose(0, 1) @ up  # (G, N, O/G)
    return y.transpose(0, 1).reshape(x.shape[:-1] + (-1,))


class _ScanLSTM(nn.Module):
    """Export form of a FactorizedLSTMLayer: input side for all frames at once, recurrence as ``_Recurrence``."""

    def __init__(self, layer: FactorizedLSTMLayer):
        super().__init__()
        self.ih, self.hh, self.hidden_size = layer.ih, layer.hh, layer.hidden_size
        self.output_size = layer.hidden_size

    def forward(self, x: torch.Tensor, state=None):
        """x (T, B, I), state (h, c) each (1, B, H) or None -> y (T, B, H), (h, c)."""
        pre = _matmuls(x, *_factors(self.ih))                             # (T, B, 4H)
        for bias in (self.ih.bias, self.hh.bias):
            if bias is not None:
                pre = pre + bias
        if state is None:
            h = c = x.new_zeros(x.shape[1], self.hidden_size)
        else:
            h, c = state[0][0], state[1][0]
        groups, weights = _factors(self.hh)
        y, h, c = _Recurrence.apply(pre, h, c, groups, self.hidden_size, 0, *weights)
        return y, (h.unsqueeze(0), c.unsqueeze(0))


class _ScanProjectedLSTM(nn.Module):
    """Export form of a ProjectedLSTMLayer (torch's ONNX exporter has no LSTM with projections, and ONNX's LSTM
    op keeps h and c the same size): the input side for all frames at once, then a Scan whose body computes the
    cell with W_hh (4H, r) and projects h_t by W_hr (r, H), so the export keeps the projection's saving."""

    def __init__(self, layer: ProjectedLSTMLayer):
        super().__init__()
        lstm = layer.lstm
        self.weight_ih, self.weight_hh, self.weight_hr = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.weight_hr_l0
        self.bias = nn.Parameter((lstm.bias_ih_l0 + lstm.bias_hh_l0).detach())
        self.hidden_size, self.proj_size, self.output_size = layer.hidden_size, layer.proj_size, layer.proj_size

    def forward(self, x: torch.Tensor, state=None):
        """x (T, B, I), state (h (1, B, r), c (1, B, H)) or None -> y (T, B, r), (h, c)."""
        pre = x @ self.weight_ih.t() + self.bias                          # (T, B, 4H)
        if state is None:
            h, c = x.new_zeros(x.shape[1], self.proj_size), x.new_zeros(x.shape[1], self.hidden_size)
        else:
            h, c = state[0][0], state[1][0]
        y, h, c = _Recurrence.apply(pre, h, c, 1, self.hidden_size, self.proj_size, self.weight_hh.t(),
                                    self.weight_hr.t())
        return y, (h.unsqueeze(0), c.unsqueeze(0))


def exportable(model: Transducer) -> Transducer:
    """A copy of ``model`` in eval mode with every factorised LSTM layer (an LSTM layer whose sides are
    separate modules), and an AmNet's branched layers and arbitrator, in their export forms."""
    from asrshrink.export.amnet import export_form

    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        amnet_form = export_form(module)
        if amnet_form is not None:
            model.set_submodule(name, amnet_form)
        elif is_lstm_layer(module) and hasattr(module, "ih"):
            model.set_submodule(name, _ScanLSTM(module))
        elif isinstance(module, ProjectedLSTMLayer) and module.proj_size:
            model.set_submodule(name, _ScanProjectedLSTM(module))
    return model


def _scan(node: onnx.NodeProto, opset: int) -> onnx.NodeProto:
    """The Scan that computes a ``LSTMRecurrence`` placeholder: inputs pre (T, B, 4H), h0, c0 (B, H), the
    recurrent weights; outputs y (T, B, H), h, c."""
    pre, h0, c0, *weights = node.input
    groups, hidden = (next(a.i for a in node.attribute if a.name == name) for name in ("groups", "hidden"))
    proj = next((a.i for a in node.attribute if a.name == "proj"), 0)
    projection = weights.pop() if proj else None                      # W_hr transposed (H, r)
    p = f"{node.output[0]}/scan/"
    nodes = []

    def op(kind: str, inputs: list[str], **attrs) -> str:
        out = f"{p}{kind.lower()}{len(nodes)}"
        nodes.append(helper.make_node(kind, inputs, [out], **attrs))
        return out

    def const(values: list[int]) -> str:
        return op("Constant", [], value=helper.make_tensor(f"{p}c{len(nodes)}", TensorProto.INT64,
                                                            [len(values)], values))

    h, c, x = f"{p}h", f"{p}c", f"{p}x"
    if len(weights) == 1:
        rec = op("MatMul", [h, weights[0]])
    elif groups == 1:
        rec = op("MatMul", [op("MatMul", [h, weights[0]]), weights[1]])
    else:
        z = op("Reshape", [op("MatMul", [h, weights[0]]), const([0, groups, -1])])     # (B, G, r)
        z = op("MatMul", [op("Transpose", [z], perm=[1, 0, 2]), weights[1]])           # (G, B, 4H/G)
        rec = op("Reshape", [op("Transpose", [z], perm=[1, 0, 2]), const([0, -1])])    # (B, 4H)
    gates = op("Add", [x, rec])
    split = [f"{p}gate_{k}" for k in "ifgo"]
    nodes.append(helper.make_node("Split", [gates], split, axis=1, **({"num_outputs": 4} if opset >= 18 else {})))
    i, f, o = (op("Sigmoid", [gate]) for gate in (split[0], split[1], split[3]))
    c_next = op("Add", [op("Mul", [f, c]), op("Mul", [i, op("Tanh", [split[2]])])])
    h_next = op("Mul", [o, op("Tanh", [c_next])])
    if projection is not None:
        h_next = op("MatMul", [h_next, projection])                   # m_t (B, r)
    y = op("Identity", [h_next])
    out = proj or hidden

    def value(name: str, size: int = hidden) -> onnx.ValueInfoProto:  # (B, size), B unknown
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, size])

    body = helper.make_graph(nodes, f"{p}body", [value(h, out), value(c), value(x, 4 * hidden)],
                             [value(h_next, out), value(c_next), value(y, out)])
    return helper.make_node("Scan", [h0, c0, pre], [node.output[1], node.output[2], node.output[0]],
                            name=f"{p}node", body=body, num_scan_inputs=1)


# --- the three parts ------------------------------------------------------------------------------------------

class _Encoder(nn.Module):
    def __init__(self, model: Transducer, factor: int):
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor):
        """-> encoder_out (B, T', J), encoder_out_lens (B,); an AmNet also its decisions: branch (B, T') int64
        and branch_log_probs (B, T', N)."""
        if self.factor > 1:
            # Zero frames up to a multiple of the time reduction: frames past an utterance's length never change
            # its output (batched decoding equals batch-1), and the model's own end padding, whose presence
            # depends on T, is then never needed, so the traced graph holds for every T.
            frames = features.shape[1]
            pad = features.new_zeros(features.shape[0], self.factor - 1, features.shape[2])
            features = torch.cat([features, pad], 1)[:, :(frames + self.factor - 1) // self.factor * self.factor]
        if self.model.arbitrator is not None:
            enc, lengths, trace = self.model.encode_amortized(features, feature_lengths, sampling="hard")
            return self.model.joint_encoder(enc), lengths, trace.decisions.argmax(-1), trace.log_pi
        enc, lengths = self.model.encode(features, feature_lengths)
        return self.model.joint_encoder(enc), lengths


class _Decoder(nn.Module):
    def __init__(self, model: Transducer):
        super().__init__()
        self.model = model

    def forward(self, targets: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        pred, (h, c) = self.model.predict(targets, (h, c))
        return self.model.joint_prediction(pred), h, c


class _Joiner(nn.Module):
    def __init__(self, model: Transducer):
        super().__init__()
        self.model = model

    def forward(self, encoder_out: torch.Tensor, decoder_out: torch.Tensor):
        return self.model.joint_output(encoder_out, decoder_out)


class _NemoEncoder(nn.Module):
    def __init__(self, model: Transducer):
        super().__init__()
        self.model = model

    def forward(self, audio_signal: torch.Tensor, length: torch.Tensor):
        enc, lengths = self.model.encode(audio_signal.transpose(1, 2), length)
        return enc.transpose(1, 2), lengths


class _NemoDecoder(nn.Module):
    def __init__(self, model: Transducer):
        super().__init__()
        self.model = model

    def forward(self, targets: torch.Tensor, target_length: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        pred, (h, c) = self.model.predict(targets.long(), (h, c))
        return pred.transpose(1, 2), target_length, h, c


class _NemoJoiner(nn.Module):
    def __init__(self, model: Transducer):
        super().__init__()
        self.model = model

    def forward(self, encoder_outputs: torch.Tensor, decoder_outputs: torch.Tensor):
        enc = self.model.joint_encoder(encoder_outputs.transpose(1, 2)).unsqueeze(2)    # (B, T', 1, J)
        pred = self.model.joint_prediction(decoder_outputs.transpose(1, 2)).unsqueeze(1)  # (B, 1, U, J)
        return self.model.joint_output(enc, pred)


def _trace(module: nn.Module, args: tuple, inputs: dict[str, dict[int, str]], outputs: dict[str, dict[int, str]],
           opset: int) -> onnx.ModelProto:
    """Trace ``module`` on ``args`` (names and dynamic axes of inputs and outputs in order), with every
    placeholder recurrence replaced by its Scan."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent Python branches; parity decides
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=opset, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes={**inputs, **outputs})
    from asrshrink.export.amnet import replace

    proto = onnx.load_from_string(buffer.getvalue())
    nodes = []
    for n in proto.graph.node:
        if n.domain == _DOMAIN and n.op_type == _RECURRENCE:
            nodes.append(_scan(n, opset))
        else:
            nodes.extend(replace(n, opset) or [n])
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    kept = [o for o in proto.opset_import if o.domain != _DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto


def time_reduction(model: Transducer) -> int:
    """Feature frames per encoder frame."""
    return model.time_reduction


def dedupe_initializers(graph: onnx.GraphProto) -> int:
    """Keep one initializer per distinct tensor (same type, shape and bytes) and point every use of a duplicate,
    subgraphs included, at the one kept; returns how many were dropped. The exporter may write a parameter that
    several modules hold (``asrshrink share``) once per module."""
    kept: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    for init in list(graph.initializer):
        if not init.raw_data:  # small tensors stored as typed fields: not worth comparing
            continue
        key = (init.data_type, tuple(init.dims), init.raw_data)
        if key in kept:
            renamed[init.name] = kept[key]
            graph.initializer.remove(init)
        else:
            kept[key] = init.name
    if not renamed:
        return 0
    for inp in [i for i in graph.input if i.name in renamed]:
        graph.input.remove(inp)

    def rename(g: onnx.GraphProto) -> None:
        for node in g.node:
            for i, name in enumerate(node.input):
                if name in renamed:
                    node.input[i] = renamed[name]
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    rename(attr.g)
                for sub in attr.graphs:
                    rename(sub)
        for out in g.output:
            if out.name in renamed:
                raise ExportError(f"the initializer {out.name} is a graph output; cannot merge it")

    rename(graph)
    return len(renamed)


def to_onnx(model: Transducer, *, opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None
            ) -> dict[str, onnx.ModelProto]:
    """The encoder, decoder and joiner of ``model`` as ONNX models (keys "encoder", "decoder", "joiner"), each
    with ``metadata`` in its metadata_props."""
    net = exportable(model)
    factor = time_reduction(model)
    state = net.initial_state(2)
    if len(state) != 2:
        raise ExportError(f"{model.family}: ONNX export handles LSTM prediction networks (state h, c); this "
                             f"family has {len(state)} state tensors")
    if model.export_layout == "nemo":
        parts = _nemo_parts(net, state, factor, opset)
    else:
        parts = _asrshrink_parts(net, state, factor, opset)
    for name, proto in parts.items():
        dedupe_initializers(proto.graph)  # a weight shared by several layers is stored once
        proto.producer_name, proto.producer_version = "asrshrink", asrshrink.__version__
        props = {**(metadata or {}), "component": name}
        if name != "encoder":  # runtimes read the encoder's; a tokenizer need not be stored three times
            props.pop("vocabulary", None)
        helper.set_model_props(proto, props)
        onnx.checker.check_model(proto)
    return parts


def _nemo_parts(net: Transducer, state: tuple, factor: int, opset: int) -> dict[str, onnx.ModelProto]:
    frames = 4 * factor + 3
    features = torch.randn(2, net.feature_config.feature_dim, frames)
    lengths = torch.tensor([frames, frames - factor - 1])
    targets = torch.tensor([[net.vocabulary.blank], [0]], dtype=torch.int32)
    target_length = torch.ones(2, dtype=torch.int32)
    with torch.no_grad():
        enc = _NemoEncoder(net)(features, lengths)[0][:, :, :1]
        pred = _NemoDecoder(net)(targets, target_length, *state)[0]
    batch, layers = {0: "B"}, {1: "B"}
    return {
        "encoder": _trace(_NemoEncoder(net), (features, lengths), {"audio_signal": {0: "B", 2: "T"}, "length": batch},
                          {"outputs": {0: "B", 2: "T_out"}, "encoded_lengths": batch}, opset),
        "decoder": _trace(_NemoDecoder(net), (targets, target_length, *state),
                          {"targets": {0: "B", 1: "U"}, "target_length": batch, "states.1": layers,
                           "states.2": layers},
                          {"outputs": {0: "B", 2: "U"}, "prednet_lengths": batch, "next_states.1": layers,
                           "next_states.2": layers}, opset),
        "joiner": _trace(_NemoJoiner(net), (enc, pred), {"encoder_outputs": {0: "B", 2: "T"},
                                                        "decoder_outputs": {0: "B", 2: "U"}},
                         {"logits": {0: "B", 1: "T", 2: "U"}}, opset),
    }


def _asrshrink_parts(net: Transducer, state: tuple, factor: int, opset: int) -> dict[str, onnx.ModelProto]:
    frames = 4 * factor + 1
    features = torch.randn(2, frames, net.feature_config.feature_dim)
    lengths = torch.tensor([frames, frames - factor - 1])
    targets = torch.tensor([[net.vocabulary.blank], [0]])
    with torch.no_grad():
        enc_part = _Encoder(net, factor)(features, lengths)[0][:, 0]
        pred_part = _Decoder(net)(targets, *state)[0][:, 0]
    batch, timed, labels, layers = {0: "B"}, {0: "B", 1: "T"}, {0: "B", 1: "U"}, {1: "B"}
    encoder_outputs = {"encoder_out": {0: "B", 1: "T_out"}, "encoder_out_lens": batch}
    if net.arbitrator is not None:
        encoder_outputs.update(branch={0: "B", 1: "T_out"}, branch_log_probs={0: "B", 1: "T_out"})
    parts = {
        "encoder": _trace(_Encoder(net, factor), (features, lengths),
                          {"features": timed, "feature_lengths": batch}, encoder_outputs, opset),
        "decoder": _trace(_Decoder(net), (targets, *state), {"targets": labels, "h": layers, "c": layers},
                          {"decoder_out": labels, "next_h": layers, "next_c": layers}, opset),
        "joiner": _trace(_Joiner(net), (enc_part, pred_part), {"encoder_out": {0: "N"}, "decoder_out": {0: "N"}},
                         {"logits": {0: "N"}}, opset),
    }
    return parts


def metadata(model: Transducer, source: dict | None = None) -> dict[str, str]:
    """metadata_props of every exported part: what a runtime needs to featurize, decode and describe the model.

    ``source``: where the model came from (path, sha256, source_sha256, method), as far as known."""
    summary = describe(model)
    state = model.initial_state(1)
    layout = {}
    if model.export_layout == "nemo":  # what sherpa-onnx's nemo_transducer reads
        layout = {"model_type": "EncDecRNNTBPEModel", "vocab_size": str(model.vocabulary.size - 1),
                  "normalize_type": "per_feature" if model.feature_config.normalize == "per_feature" else "",
                  "pred_rnn_layers": str(state[0].shape[0]), "pred_hidden": str(state[0].shape[2]),
                  "subsampling_factor": str(time_reduction(model)), "feat_dim": str(model.feature_config.feature_dim)}
    return {
        "model_type": "asrshrink-transducer",
        "export_layout": model.export_layout,
        "max_symbols_per_step": str(model.max_symbols_per_step),
        "family": model.family,
        "vocabulary": json.dumps(model.vocabulary.to_json()),
        "blank_id": str(model.vocabulary.blank),
        "vocab_size": str(model.vocabulary.size),
        "feature": json.dumps(model.feature_config.to_json()),
        "feature_dim": str(model.feature_config.feature_dim),
        "time_reduction": str(time_reduction(model)),
        "state_shape": json.dumps([state[0].shape[0], state[0].shape[2]]),
        "compression": json.dumps({"params": summary["params"], "bytes": summary["bytes"],
                                   "flops": summary["flops"], "structure": model_structure(model),
                                   **(source or {})}),
        "asrshrink_version": asrshrink.__version__,
        **layout,
        **_amnet_metadata(model),
    }


def _amnet_metadata(model: Transducer) -> dict[str, str]:
    """An AmNet's entry: its branch and arbitrator costs (what ``asrshrink eval`` reports from), the branch
    kind, and the encoder's decision outputs."""
    from asrshrink.evaluate.amnet import amnet_costs
    from asrshrink.models.branched import BranchedLSTMLayer

    costs = amnet_costs(model)
    if costs is None:
        return {}
    kinds = sorted({m.kind for m in model.modules() if isinstance(m, BranchedLSTMLayer)})
    return {"amnet": json.dumps({**costs, "kind": "+".join(kinds), "branches": ["slow", "fast"],
                                 "decisions": "per encoder output frame",
                                 "outputs": ["branch", "branch_log_probs"]})}


# --- the export directory -------------------------------------------------------------------------------------

class ExportError(AsrshrinkError):
    """An export that cannot be written, or that does not compute what its PyTorch model computes."""


def tokens_text(vocabulary: Vocabulary) -> str:
    """tokens.txt: "symbol id" per line, the space as U+2581 (as sentencepiece writes it), the blank as <blk>."""
    symbols = ["<blk>" if i == vocabulary.blank else vocabulary.labels[i].replace(" ", "\u2581")
               for i in range(vocabulary.size)]
    return "".join(f"{symbol} {i}\n" for i, symbol in enumerate(symbols))


def check_export_options(out: Path, opset: int) -> None:
    """Refuse an output path or opset that cannot work, before any work is done."""
    if opset not in OPSETS:
        raise ExportError(f"--opset must be between {OPSETS[0]} and {OPSETS[-1]}, got {opset}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: -o takes a directory (it receives encoder.onnx, decoder.onnx, joiner.onnx, "
                          f"tokens.txt and {REPORT}); choose a folder name")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT).is_file():
        raise ExportError(f"{out}: the folder is not empty and holds no asrshrink export; choose a new folder")


def speech_sample(model: Transducer, data: str | Path | None = None, count: int = 3) -> list[np.ndarray]:
    """``count`` waveforms (a seeded random subset) of ``data`` (any dataset layout; None: the bundled test
    sample) for the parity check."""
    dataset = open_dataset(data or bundled_speech("test", "--data"), vocabulary=model.vocabulary,
                           sample_rate=model.feature_config.sample_rate, max_duration=15.0, limit=count, seed=0)
    waveforms = [u.audio for u in dataset]
    need = model.feature_config.min_samples
    for entry, audio in zip(dataset.entries, waveforms):
        if len(audio) < need:
            raise ExportError(f"{entry.audio_path}: {len(audio)} samples, fewer than the {need} the featurizer needs "
                              f"for the parity check; remove it from the --data speech or pass other --data")
    return waveforms


def quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime dynamic quantization: int8 weights, activations quantized per call (LSTM, MatMul, Gather,
    and the matmuls inside a Scan body)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice on pre-processing at INFO/WARNING
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, extra_options={"EnableSubgraph": True})
    finally:
        logging.getLogger().setLevel(level)


def export_model(model: Transducer, out: str | Path, *, info: ModelInfo | None = None, opset: int = DEFAULT_OPSET,
                 int8: bool = False, speech: Sequence[np.ndarray] | None = None,
                 log: Callable[[str], None] = lambda line: None) -> dict:
    """Write ``model`` as the export directory ``out`` (replacing an earlier export there) and return the report
    that is also written as ``out/export.json``.

    Every part is checked against ``model`` on random inputs and on ``speech`` (waveforms at the model's sample
    rate; None: ``speech_sample(model)``); when any output differs by more than ``check.ATOL``, an ExportError
    is raised and nothing is written. ``int8`` adds onnxruntime dynamic-quantized copies (``encoder.int8.onnx``,
    ...), whose differences are reported, not checked."""
    from asrshrink.export.check import ATOL, compare, worst
    from asrshrink.export.runtime import PARTS, OnnxTransducer

    started = time.perf_counter()
    out = Path(out)
    check_export_options(out, opset)
    source = None if info is None else {"path": str(info.path), "sha256": info.sha256,
                                        "source_sha256": info.source_sha256, "method": info.extra.get("method")}
    if speech is None:
        speech = speech_sample(model)
    log(f"tracing the encoder, decoder and joiner (opset {opset})")
    parts = to_onnx(model, opset=opset, metadata=metadata(model, source))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, proto in parts.items():
            onnx.save(proto, tmp / f"{name}.onnx")
        (tmp / "tokens.txt").write_text(tokens_text(model.vocabulary), encoding="utf-8")
        log(f"checking against PyTorch on random inputs and {len(speech)} utterance(s)")
        parity = compare(model, OnnxTransducer(tmp, threads=1), speech)
        where, value = worst(parity["max_abs_diff"])
        differing = [kind for kind, same in (parity.get("decisions_equal") or {}).items() if not same]
        if differing:
            raise ExportError(f"{out}: the ONNX AmNet encoder chooses other branches than PyTorch on the "
                              f"{' and '.join(differing)} input, so nothing was written; a frame where both branches "
                              f"score alike can flip by rounding: try another --data, or report the model as a bug")
        if not value <= ATOL:
            raise ExportError(f"{out}: the ONNX {where} differs from PyTorch by {value:.3g} (more than {ATOL:g}), "
                              f"so nothing was written; try another --opset, or report the model as a bug")
        quantized = None
        if int8:
            log("int8 dynamic quantization")
            for name in PARTS:
                quantize_int8(tmp / f"{name}.onnx", tmp / f"{name}.int8.onnx")
            quantized = compare(model, OnnxTransducer(tmp, int8=True, threads=1), speech)
        report = {
            "schema": "asrshrink.export/1",
            "source": source,
            "opset": opset,
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir())},
            "parity": {"atol": ATOL, "speech_utterances": len(speech), **parity},
            "int8": quantized,
            "versions": {"asrshrink": asrshrink.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "seconds": time.perf_counter() - started,
        }
        write_json_atomic(tmp / REPORT, report)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished ``tmp`` directory in for ``out`` in one step, replacing an earlier export there."""
    from asrshrink.output import publish_folder

    publish_folder(tmp, out)

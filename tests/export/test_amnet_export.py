"""ONNX export of AmNet models: per-frame switching in the encoder graph, parity with PyTorch's hard switching
(decisions, encoder outputs, greedy tokens), the soft model's argmax path, weights stored once, and eval of the
exported folder."""

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from asrshrink.cli.main import app
from asrshrink.config import AmnetConfig
from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.export.onnx import export_model
from asrshrink.export.runtime import OnnxTransducer
from asrshrink.models.branched import BranchedLSTMLayer
from asrshrink.models.checkpoint import bundled_speech
from asrshrink.models.layers import stack_time
from asrshrink.training.amnet import build_amnet
from tests.methods.test_psvd import tiny
from tests.training.test_amnet import features

runner = CliRunner()


def amnet(kind, feedback):
    """A tiny AmNet that uses both branches on ``features()`` and emits labels: the arbitrator's projection
    scaled up and centred near the median logit difference (off it, so no frame is a tie), the blank made less
    likely."""
    model = build_amnet(tiny(0), AmnetConfig(data="x", branches=kind, sparse_schedule="magnitude",
                                             arbitrator_hidden=8, arbitrator_feedback=feedback)).eval()
    with torch.no_grad():
        arb = model.arbitrator
        arb.proj.weight.mul_(40.0)
        f, lengths = features()
        _, log_pi = arb(stack_time(f.transpose(0, 1), lengths, 2)[0])
        arb.proj.bias[0] -= float((log_pi[..., 0] - log_pi[..., 1]).median()) - 0.01
        model.joint_net.output.bias[model.vocabulary.blank] -= 1.5
    return model


CASES = [("mf", False), ("mf", True), ("sparse", False), ("sparse", True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{'feedback' if fb else 'plain'}" for k, fb in CASES])
def exported(request, tmp_path_factory):
    model = amnet(*request.param)
    out = tmp_path_factory.mktemp("amnet") / "onnx"
    return model, out, export_model(model, out)


def test_the_export_checks_decisions_outputs_and_tokens(exported):
    _, out, report = exported
    parity = report["parity"]
    assert parity["decisions_equal"] == {"random": True, "one utterance": True, "speech": True}
    assert max(v for kinds in parity["max_abs_diff"].values() for v in kinds.values()) <= 1e-4
    assert parity["greedy_tokens_equal"] is True
    meta = OnnxTransducer(out).metadata
    assert json.loads(meta["amnet"])["branch_flops"][1] < json.loads(meta["amnet"])["branch_flops"][0]


def test_onnx_decisions_outputs_and_tokens_equal_pytorch_hard_switching(exported):
    model, out, _ = exported
    runtime = OnnxTransducer(out, threads=1)
    f, lengths = features()
    with torch.no_grad():
        enc, enc_lengths, trace = model.encode_amortized(f, lengths, sampling="hard")
        enc_part = model.joint_encoder(enc)
    for batch in (slice(None), slice(2, 3)):  # the batch (frames where utterances disagree) and one utterance
        sub_f, sub_l = f[batch], lengths[batch]
        if batch.start == 2:
            sub_f = sub_f[:, :int(sub_l[0])]
        got, got_lengths, got_trace = runtime.encode_amortized(sub_f, sub_l)
        n = got.shape[1]
        chosen, got_chosen = trace.decisions[batch].argmax(-1)[:, :n], got_trace.decisions.argmax(-1)
        assert torch.equal(got_lengths, enc_lengths[batch]) and torch.equal(chosen, got_chosen)
        assert torch.allclose(got, enc_part[batch][:, :n], atol=1e-4)
    valid = torch.arange(trace.decisions.shape[1]).unsqueeze(0) < trace.lengths.unsqueeze(1)
    fast = float(trace.decisions.argmax(-1)[valid].float().mean())
    assert 0.1 < fast < 0.9                                              # both branches are used
    got, got_lengths, _ = runtime.encode_amortized(f, lengths)
    tokens = greedy_decode(model, enc, enc_lengths)
    assert greedy_decode(runtime, got, got_lengths) == tokens and sum(map(len, tokens)) > 5


def test_hard_switching_in_pytorch_and_onnx_follows_the_soft_models_argmax_path(exported):
    model, out, _ = exported
    f, lengths = features()
    with torch.no_grad():
        soft, soft_lengths, soft_trace = model.encode_amortized(f, lengths, sampling="argmax")
        hard, hard_lengths, hard_trace = model.encode_amortized(f, lengths, sampling="hard")
        soft_tokens = greedy_decode(model, soft, soft_lengths)
    runtime = OnnxTransducer(out, threads=1)
    got, got_lengths, got_trace = runtime.encode_amortized(f, lengths)
    assert torch.equal(soft_trace.decisions, hard_trace.decisions)
    assert torch.equal(soft_trace.decisions.argmax(-1), got_trace.decisions.argmax(-1))
    assert greedy_decode(model, hard, hard_lengths) == soft_tokens
    assert greedy_decode(runtime, got, got_lengths) == soft_tokens and sum(map(len, soft_tokens)) > 5
    with torch.no_grad():  # one utterance alone: the TorchScript steps of batch 1
        alone, _, alone_trace = model.encode_amortized(f[1:2, :int(lengths[1])], lengths[1:2], sampling="hard")
    n = int(hard_lengths[1])
    assert torch.equal(alone_trace.decisions[0, :n], soft_trace.decisions[1, :n])
    assert torch.allclose(alone[0, :n], soft[1, :n], atol=1e-5)


def test_the_graph_switches_per_frame_and_stores_shared_weights_once(exported):
    model, out, _ = exported
    proto = onnx.load(out / "encoder.onnx")
    ops = all_ops(proto.graph)
    assert {"Scan", "If", "GatherND", "ScatterND"} <= ops
    layers = [m for m in model.modules() if isinstance(m, BranchedLSTMLayer)]
    floats = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    bools = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.BOOL)
    shapes = [tuple(t.dims) for t in proto.graph.initializer]
    for layer in layers:
        for side, size in (("ih", layer.input_size), ("hh", layer.hidden_size)):
            if layer.kind == "mf":
                slow, fast = layer.ranks[side]
                assert (size, slow) in shapes and (slow, 4 * layer.hidden_size) in shapes
                assert (size, fast) not in shapes and (fast, 4 * layer.hidden_size) not in shapes
            else:
                assert shapes.count((size, 4 * layer.hidden_size)) >= 1
    if layers[0].kind == "mf":
        expected = sum(getattr(m, f"{s}_{n}").numel() for m in layers for s in ("ih", "hh") for n in ("down", "up"))
        assert bools == 0
    else:
        expected = sum(getattr(m, f"weight_{s}").numel() for m in layers for s in ("ih", "hh"))
        assert bools == expected                                         # the fast masks, one byte a weight
    # the branched weights once, plus the biases, the arbitrator and the joint's encoder block
    rest = sum(2 * m.bias_ih.numel() for m in layers) + sum(p.numel() for p in model.arbitrator.parameters()) \
        + sum(p.numel() for p in model.joint_net.encoder_proj.parameters())
    assert expected <= floats <= expected + rest
    assert (out / "encoder.onnx").stat().st_size < 4 * (floats + rest) + bools + 200_000


def all_ops(graph) -> set[str]:
    """Op types of a graph and of every subgraph inside it (Scan bodies, If branches)."""
    out = set()
    for node in graph.node:
        out.add(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out |= all_ops(attr.g)
    return out


def test_eval_of_the_exported_folder_reports_the_amnet_figures(exported):
    _, out, _ = exported
    result = runner.invoke(app, ["eval", str(out), "--data", str(bundled_speech("test", "--data")), "--limit", "2",
                                 "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    ratios = payload["amnet"]["branch_ratios"]
    assert len(ratios) == 2 and abs(sum(ratios) - 1) < 1e-9 and payload["amnet"]["frames"] > 0
    assert payload["amnet"]["flops_per_frame"]["mean"] > 0

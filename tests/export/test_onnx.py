"""ONNX export: parity with PyTorch for dense and factorised models, dynamic shapes, factorised graphs, metadata."""

import json

import onnx
import pytest
import torch

from asrshrink import api
from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.export.onnx import export_model
from asrshrink.export.runtime import OnnxTransducer
from asrshrink.methods.svd import choose_ranks, svd_compress
from asrshrink.models.checkpoint import bundled_speech
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig

TINY = MlperfRnntConfig(encoder_hidden=24, encoder_pre_layers=1, encoder_post_layers=2, pred_hidden=12,
                        pred_layers=2, joint_hidden=16, dropout=0.0)


def tiny(seed=0):
    torch.manual_seed(seed)
    return MlperfRnnt(TINY).eval()


def compressed(mode="stacked"):
    model = tiny()
    return svd_compress(model, choose_ranks(model, ["encoder", "prediction", "joint"], rank=3, mode=mode))


@pytest.fixture(scope="module")
def dense_export(tmp_path_factory):
    model = tiny()
    out = tmp_path_factory.mktemp("dense") / "onnx"
    return model, out, export_model(model, out, int8=True)


@pytest.fixture(scope="module")
def reference_export(tmp_path_factory):
    """The bundled reference model (trained, so greedy decoding emits real words) and its export."""
    model, _ = api.load_model()
    out = tmp_path_factory.mktemp("reference") / "onnx"
    export_model(model, out)
    return model, out


def initializer_shapes(path):
    return {tuple(t.dims) for t in onnx.load(path).graph.initializer}


def ops(path):
    return {n.op_type for n in onnx.load(path).graph.node}


def assert_parity(report):
    diffs = report["parity"]["max_abs_diff"]
    assert set(diffs) == {"encoder", "decoder", "joiner"}
    assert all(set(kinds) == {"random", "speech"} for kinds in diffs.values())
    assert max(v for kinds in diffs.values() for v in kinds.values()) <= 1e-4
    assert report["parity"]["greedy_tokens_equal"] is True and report["parity"]["speech_utterances"] == 3


def test_dense_export_matches_pytorch_and_uses_the_lstm_op(dense_export):
    _, out, report = dense_export
    assert_parity(report)
    assert "LSTM" in ops(out / "encoder.onnx") and "Scan" not in ops(out / "encoder.onnx")
    assert "LSTM" in ops(out / "decoder.onnx")
    assert report["files"]["encoder.onnx"] == (out / "encoder.onnx").stat().st_size
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(report))


@pytest.mark.parametrize("mode", ["stacked", "rollout"])
def test_svd_export_matches_pytorch_and_keeps_the_factors(tmp_path, mode):
    model = compressed(mode)
    report = export_model(model, tmp_path / "onnx", opset=14 if mode == "stacked" else 20)
    assert_parity(report)
    encoder = tmp_path / "onnx" / "encoder.onnx"
    assert "Scan" in ops(encoder) and "LSTM" not in ops(encoder) and "Einsum" not in ops(encoder)
    shapes = initializer_shapes(encoder)
    hidden = TINY.encoder_hidden
    # No layer's weights multiplied back: only factors (a side of rank 3) and no (H, 4H) or (4H, H) matrix.
    assert not shapes & {(hidden, 4 * hidden), (4 * hidden, hidden)}
    assert (hidden, 3 * (4 if mode == "rollout" else 1)) in shapes


def test_dynamic_batch_and_time(tmp_path):
    model = compressed()
    export_model(model, tmp_path / "onnx", speech=())
    runtime = OnnxTransducer(tmp_path / "onnx", threads=1)
    torch.manual_seed(1)
    for batch, frames in [(1, 5), (3, 17), (2, 40)]:
        features = torch.randn(batch, frames, TINY.input_dim)
        lengths = torch.tensor([frames] + [max(1, frames - 3 * i) for i in range(1, batch)])
        with torch.no_grad():
            enc, enc_lengths = model.encode(features, lengths)
            enc = model.joint_encoder(enc)
        got, got_lengths = runtime.encode(features, lengths)
        assert torch.equal(got_lengths, enc_lengths) and torch.allclose(got, enc, atol=1e-5)
    for batch, steps in [(1, 1), (4, 3)]:
        labels = torch.randint(0, 29, (batch, steps))
        state = tuple(torch.randn_like(t) for t in model.initial_state(batch))
        with torch.no_grad():
            pred, (h, c) = model.predict(labels, state)
        got, (got_h, got_c) = runtime.predict(labels, state)
        assert torch.allclose(got, model.joint_prediction(pred).detach(), atol=1e-5)
        assert torch.allclose(got_h, h, atol=1e-5) and torch.allclose(got_c, c, atol=1e-5)


def test_onnx_greedy_decoding_equals_pytorch_up_to_the_symbol_limit(tmp_path):
    model = tiny()
    with torch.no_grad():  # sharper logits: this random model then emits 30 labels at every frame
        model.joint_net.output.weight.mul_(8)
    export_model(model, tmp_path / "onnx", speech=())
    runtime = OnnxTransducer(tmp_path / "onnx", threads=1)
    torch.manual_seed(2)
    features = torch.randn(3, 31, TINY.input_dim)
    lengths = torch.tensor([31, 20, 9])
    with torch.no_grad():
        expected = greedy_decode(model, *model.encode(features, lengths))
    got = greedy_decode(runtime, *runtime.encode(features, lengths))
    assert got == expected and [len(t) for t in got] == [30 * 16, 30 * 10, 30 * 5]


def test_evaluate_decodes_the_export_with_the_same_hypotheses_and_wer(reference_export):
    model, out = reference_export
    data = api.open_dataset(bundled_speech("test", "--data"), vocabulary=model.vocabulary, limit=8, seed=0)
    expected = api.evaluate(model, data)
    got = api.evaluate(OnnxTransducer(out, threads=1), data)
    assert [h["hypothesis"] for h in got.hypotheses] == [h["hypothesis"] for h in expected.hypotheses]
    assert got.wer == expected.wer and sum(len(h["hypothesis"]) for h in got.hypotheses) > 0


def test_beam_search_decodes_the_export_as_pytorch(reference_export):
    model, out = reference_export
    data = api.open_dataset(bundled_speech("test", "--data"), vocabulary=model.vocabulary, limit=3, seed=0)
    expected = api.evaluate(model, data, beam=3)
    got = api.evaluate(OnnxTransducer(out, threads=1), data, beam=3)
    assert [h["hypothesis"] for h in got.hypotheses] == [h["hypothesis"] for h in expected.hypotheses]
    assert [h["score"] for h in got.hypotheses] == pytest.approx([h["score"] for h in expected.hypotheses], abs=1e-3)
    assert got.search == "beam" and got.beam == 3


def test_metadata_and_tokens(dense_export):
    model, out, _ = dense_export
    for part in ("encoder", "decoder", "joiner"):
        props = {p.key: p.value for p in onnx.load(out / f"{part}.onnx").metadata_props}
        assert props["component"] == part and props["family"] == "mlperf-rnnt"
        assert props["blank_id"] == "28"
        if part == "encoder":  # the vocabulary (for SentencePiece, a whole tokenizer) only where runtimes read it
            assert json.loads(props["vocabulary"]) == model.vocabulary.to_json()
        assert json.loads(props["feature"]) == model.feature_config.to_json()
        assert json.loads(props["state_shape"]) == [TINY.pred_layers, TINY.pred_hidden]
        assert json.loads(props["compression"])["params"] == api.describe(model)["params"]
        assert props["asrshrink_version"] and props["time_reduction"] == "2"
    lines = (out / "tokens.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 29 and lines[0] == "\u2581 0" and lines[1] == "a 1" and lines[28] == "<blk> 28"
    encoder = onnx.load(out / "encoder.onnx").graph
    assert [i.name for i in encoder.input] == ["features", "feature_lengths"]
    assert [o.name for o in encoder.output] == ["encoder_out", "encoder_out_lens"]
    dims = [d.dim_param or d.dim_value for d in encoder.input[0].type.tensor_type.shape.dim]
    assert dims == ["B", "T", TINY.input_dim]


def test_int8_copies_are_written_and_run(dense_export):
    model, out, report = dense_export
    for part in ("encoder", "decoder", "joiner"):
        assert (out / f"{part}.int8.onnx").stat().st_size < (out / f"{part}.onnx").stat().st_size
    assert set(report["int8"]["max_abs_diff"]) == {"encoder", "decoder", "joiner"}
    runtime = OnnxTransducer(out, int8=True, threads=1)
    features = torch.randn(2, 12, TINY.input_dim)
    tokens = greedy_decode(runtime, *runtime.encode(features, torch.tensor([12, 7])))
    assert len(tokens) == 2
    assert "MatMulInteger" in ops(out / "encoder.int8.onnx") or "DynamicQuantizeLSTM" in ops(out / "encoder.int8.onnx")


def test_a_new_export_replaces_an_earlier_one(tmp_path):
    out = tmp_path / "onnx"
    export_model(tiny(), out, int8=True, speech=())
    export_model(compressed(), out, speech=())
    assert not (out / "encoder.int8.onnx").exists() and "Scan" in ops(out / "encoder.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_pruned_export_matches_pytorch_and_keeps_the_zeros(tmp_path):
    from asrshrink.config import PruneConfig
    from asrshrink.methods.prune import prune_model

    model, _ = prune_model(tiny(), PruneConfig(sparsity=0.7, components=("encoder", "prediction", "joint")))
    assert_parity(export_model(model, tmp_path / "onnx"))
    graph = onnx.load(tmp_path / "onnx" / "encoder.onnx").graph
    zeros = sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in graph.initializer)
    pruned = sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.startswith("encoder"))
    assert zeros >= pruned > 0


def test_projected_export_matches_pytorch_and_keeps_the_projection(tmp_path):
    from asrshrink.config import SvdConfig
    from asrshrink.methods.registry import Context, get_method

    model = get_method("svd").core(SvdConfig(rank=5, structure="projection", components=("encoder", "prediction")),
                                   Context(tiny())).model
    report = export_model(model, tmp_path / "onnx")
    assert_parity(report)
    for part in ("encoder", "decoder"):
        path = tmp_path / "onnx" / f"{part}.onnx"
        assert "Scan" in ops(path) and "LSTM" not in ops(path)
    hidden = TINY.encoder_hidden
    shapes = initializer_shapes(tmp_path / "onnx" / "encoder.onnx")
    # Each layer's W_hh^T (r, 4H) and W_hr^T (H, r); no dense recurrent matrix (H, 4H) is multiplied back.
    assert {(5, 4 * hidden), (hidden, 5)} <= shapes and (hidden, 4 * hidden) not in shapes
    runtime = OnnxTransducer(tmp_path / "onnx", threads=1)
    state = tuple(torch.randn_like(t) for t in model.initial_state(3))
    labels = torch.randint(0, 29, (3, 4))
    with torch.no_grad():
        pred, (h, c) = model.predict(labels, state)
    got, (got_h, got_c) = runtime.predict(labels, state)
    assert torch.allclose(got, model.joint_prediction(pred), atol=1e-5)
    assert torch.allclose(got_h, h, atol=1e-5) and torch.allclose(got_c, c, atol=1e-5)

"""``asrshrink share``: plans, the closed-form merges, shared tensors kept through save and load, ONNX with each
shared weight once, one-line errors for bad plans, and the LSTM family's equal-shape layers."""

import json
import os

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from asrshrink.cli.main import app
from asrshrink.config import ShareConfig
from asrshrink.errors import AsrshrinkError, CheckpointError
from asrshrink.export.onnx import dedupe_initializers, export_model
from asrshrink.methods.registry import Context, get_method
from asrshrink.methods.share import (Construction, encoder_error, group_error, member_grams, merge_least_squares,
                                     merge_channels, merge_mean, merge_pick, params, share_model,
                                     statistics_keys)
from asrshrink.models.checkpoint import load_model, save_model
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig
from asrshrink.models.sharing import SharingPlan, build_plan
from tests.helpers import assert_one_line_error
from tests.methods.test_conformer_methods import VOCAB, batches
from asrshrink.models.nemo_conformer import NemoConformerConfig, NemoConformerTransducer

runner = CliRunner()


def conformer(seed=0, layers=4):
    torch.manual_seed(seed)
    model = NemoConformerTransducer(NemoConformerConfig(
        d_model=32, n_layers=layers, n_heads=2, subsampling_conv_channels=8, conv_kernel_size=5, pred_hidden=16,
        joint_hidden=16, vocabulary=VOCAB, dropout=0.0, dropout_pre_encoder=0.0, dropout_att=0.0)).eval()
    with torch.no_grad():  # trained-looking misc tensors: norms, batch norm statistics and position biases not at init
        for name, t in model.state_dict(keep_vars=True).items():
            if any(k in name for k in ("norm", "pos_bias", "running")):
                t.add_(0.1 * torch.rand_like(t))
    return model


def all_grams(model, data):
    return member_grams(model, data, statistics_keys(model, model.sharing_layout()))


def encode(model, data):
    with torch.no_grad():
        return [model.encode(b["features"], b["feature_lengths"])[0] for b in data]


# --- pure math ------------------------------------------------------------------------------------------------

def test_least_squares_merge_of_identical_members_returns_them():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    grams = []
    for _ in range(3):
        x = torch.cat([torch.randn(40, 7, generator=g, dtype=torch.float64) * torch.rand(7, generator=g) * 3,
                       torch.ones(40, 1, dtype=torch.float64)], 1)
        grams.append(x.T @ x)
    for shared_bias in (True, False):
        merged, biases = merge_least_squares([w] * 3, [b] * 3, grams, shared_bias=shared_bias)
        assert torch.allclose(merged, w, atol=1e-12) and all(torch.allclose(x, b, atol=1e-12) for x in biases)


def test_least_squares_merge_has_the_least_calibration_error_of_the_three():
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(6, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    bs = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = []
    for l in range(3):  # each member sees differently scaled and shifted inputs
        x = torch.randn(100, 8, generator=g, dtype=torch.float64) * (l + 1) + l
        x = torch.cat([x, torch.ones(100, 1, dtype=torch.float64)], 1)
        grams.append(x.T @ x)
    ls = {}
    for shared_bias in (True, False):
        errors = {}
        for name, merge in (("pick", merge_pick), ("mean", merge_mean)):
            w, new_bs = merge(ws, bs, shared_bias=shared_bias)
            errors[name] = group_error(ws, bs, grams, [w] * 3, new_bs)
        w, new_bs = merge_least_squares(ws, bs, grams, shared_bias=shared_bias, damping=1e-9)
        errors["ls"] = ls[shared_bias] = group_error(ws, bs, grams, [w] * 3, new_bs)
        assert errors["ls"] < errors["mean"] and errors["ls"] < errors["pick"], errors
    assert ls[False] <= ls[True] + 1e-12  # per-layer biases absorb each member's mean: never worse


def test_per_channel_merge_of_identical_members_returns_them_and_maps_round_trip():
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    grams = []
    for _ in range(2):
        x = torch.cat([torch.randn(30, 4, 3, generator=g, dtype=torch.float64) + 2,
                       torch.ones(30, 4, 1, dtype=torch.float64)], -1)
        grams.append(torch.einsum("ncf,ncg->cfg", x, x))
    for shared_bias in (True, False):
        merged, biases = merge_channels([w, w], [b, b], grams, shared_bias=shared_bias)
        assert torch.allclose(merged, w, atol=1e-12) and all(torch.allclose(x, b, atol=1e-12) for x in biases)
    from asrshrink.models.layers import channel_features, channel_map, set_channel_map

    norm = torch.nn.BatchNorm1d(4).eval()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
        norm.weight.normal_()
    x = torch.randn(2, 4, 7)
    weight, bias = channel_map(norm)
    mapped = (channel_features(norm, x)[..., 0] * weight[:, 0] + bias).transpose(1, 2)
    assert torch.allclose(mapped, norm(x), atol=1e-5)
    copy = torch.nn.BatchNorm1d(4).eval()
    set_channel_map(copy, weight, bias)
    assert torch.allclose(copy(x), norm(x), atol=1e-5)


# --- plans --------------------------------------------------------------------------------------------------------

def test_plan_json_round_trip_and_paper_indices():
    layout = conformer().sharing_layout()
    plan = build_plan(layout, repeat="2", modules=("ff1", "conv"), unshare=("conv.depthwise", "misc"))
    assert plan.indices == {"ff1": (0, 0, 1, 1), "conv": (0, 0, 1, 1)}
    assert SharingPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert plan.physical("ff1") == 2 and plan.physical("attn") == 4
    assert build_plan(layout, groups="1-2").indices["attn"] == (0, 1, 1, 2)
    assert build_plan(layout, repeat="0,1,1,0").groups("ff2") == [[0, 3], [1, 2]]


@pytest.mark.parametrize("options, fragment", [
    ({"repeat": "0,0,2,2"}, "use each of 0..N-1"), ({"repeat": "0,1"}, "2 indices for 4 layers"),
    ({"repeat": "5"}, "1 <= R <= 4"), ({"groups": "0-1,1-2"}, "layer 1 is in two groups"),
    ({"modules": ("ffn",)}, "unknown module kind"), ({"unshare": ("attn.keys",)}, "cannot unshare"),
])
def test_bad_plans_are_refused(options, fragment):
    with pytest.raises(AsrshrinkError, match=fragment):
        build_plan(conformer().sharing_layout(), **options)


# --- the shared model ---------------------------------------------------------------------------------------------

def test_a_plan_that_shares_nothing_reproduces_the_model_exactly():
    model, data = conformer(), batches(2)
    plan = build_plan(model.sharing_layout(), repeat="1")
    shared, _ = share_model(model, plan, Construction("ls"), all_grams(model, data))
    assert params(shared) == params(model)
    assert all(torch.equal(a, b) for a, b in zip(encode(model, data), encode(shared, data)))


def test_sharing_identical_layers_changes_nothing():
    model, data = conformer(), batches(2)
    with torch.no_grad():
        model.encoder.layers[1].load_state_dict(model.encoder.layers[0].state_dict())
        model.encoder.layers[3].load_state_dict(model.encoder.layers[2].state_dict())
    for init in ("ls", "mean", "pick"):
        shared, _ = share_model(model, build_plan(model.sharing_layout(), repeat="2"), Construction(init),
                                all_grams(model, data))
        assert params(shared) < 0.7 * params(model)
        for a, b in zip(encode(model, data), encode(shared, data)):
            assert torch.allclose(a, b, atol=1e-5)


def test_ls_has_less_calibration_error_than_mean_and_pick_on_a_random_model():
    model, data = conformer(seed=3), batches(2)
    grams = all_grams(model, data)
    plan = build_plan(model.sharing_layout(), repeat="2")
    errors = {}
    for init in ("pick", "mean", "ls"):
        _, rows = share_model(model, plan, Construction(init), grams)
        errors[init] = sum(r["error"] for r in rows)
        if init == "ls":  # the closed form is the least-squares optimum of every group's matrix error
            others = {i: share_model(model, plan, Construction(i), grams)[1] for i in ("pick", "mean")}
            for k, row in enumerate(rows):
                assert row["error"] <= min(others["pick"][k]["error"], others["mean"][k]["error"]) + 1e-9
    assert errors["ls"] < errors["mean"] and errors["ls"] < errors["pick"]


def test_save_and_load_keep_tensors_shared_and_store_each_once(tmp_path):
    model, data = conformer(), batches(2)
    shared, _ = share_model(model, build_plan(model.sharing_layout(), repeat="2", unshare=("attn.key",)),
                            Construction("ls"), all_grams(model, data))
    plain, tied = save_model(model, tmp_path / "plain"), save_model(shared, tmp_path / "shared")
    loaded, _ = load_model(tied)
    layers = loaded.encoder.layers
    assert layers[1].feed_forward1.linear1.weight.data_ptr() == layers[0].feed_forward1.linear1.weight.data_ptr()
    assert layers[3].conv.batch_norm.running_mean is layers[2].conv.batch_norm.running_mean
    assert layers[1].self_attn.linear_k.weight is not layers[0].self_attn.linear_k.weight  # unshared
    assert layers[1].self_attn.linear_q.weight is layers[0].self_attn.linear_q.weight
    assert params(loaded) == params(shared) < params(model)
    assert all(torch.equal(a, b) for a, b in zip(encode(shared, data), encode(loaded, data)))
    saved_elements = (params(model) - params(shared)) + sum(
        b.numel() for b in model.buffers() if b.is_floating_point()) - sum(
        b.numel() for b in {id(b): b for b in shared.buffers() if b.is_floating_point()}.values())
    assert data_bytes(plain) - data_bytes(tied) == 4 * saved_elements  # exactly the shared tensors' bytes
    assert os.path.getsize(plain) - os.path.getsize(tied) >= 4 * saved_elements  # (and their header entries)
    with safe_open(str(tied), "pt") as f:
        keys = set(f.keys())
    assert "encoder.layers.1.feed_forward1.linear1.weight" not in keys and \
        "encoder.layers.1.self_attn.linear_k.weight" in keys
    # a loaded shared model trains as one: a step on the shared tensor moves every layer that uses it
    with torch.no_grad():
        layers[0].feed_forward1.linear1.weight.add_(1.0)
    assert torch.equal(layers[1].feed_forward1.linear1.weight, layers[0].feed_forward1.linear1.weight)


def data_bytes(path) -> int:
    """The tensor bytes of a safetensors file (its size less the 8-byte length and the JSON header)."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(path) - 8 - header


def _rewrite_plan(path, out, edit):
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["asrshrink"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta["sharing"], tensors)
    save_file(tensors, str(out), metadata={"asrshrink": json.dumps(meta)})


@pytest.mark.parametrize("edit, fragment", [
    (lambda plan, t: plan["indices"]["ff1"].__setitem__(1, 7), "must use each of 0..N-1"),
    (lambda plan, t: plan["indices"].__setitem__("ffx", [0, 0, 1, 1]), "unknown module kind"),
    (lambda plan, t: plan.__setitem__("layers", plan["layers"][:2]), "sharing plan names the layers"),
    (lambda plan, t: plan.__setitem__("indices", "all"), "indices must map"),
    (lambda plan, t: plan["indices"].__setitem__("ff1", [0, 1, 2, 3]), "missing"),
])
def test_a_tampered_sharing_plan_is_refused_in_one_line(tmp_path, edit, fragment):
    model = conformer()
    shared, _ = share_model(model, build_plan(model.sharing_layout(), repeat="2"), Construction("mean"), None)
    path = save_model(shared, tmp_path / "shared")
    _rewrite_plan(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "bad.safetensors")
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_low_rank_with_residual_shares_the_factors_and_reloads(tmp_path):
    model, data = conformer(), batches(2)
    grams = all_grams(model, data)
    plan = build_plan(model.sharing_layout(), repeat="2", unshare=("misc",))
    low = Construction("ls", low_rank=6, low_rank_parts=(("ff1", "linear1"), ("ff1", "linear2"),
                                                          ("ff2", "linear1"), ("ff2", "linear2")))
    factored, _ = share_model(model, plan, low, grams)
    residual, _ = share_model(model, plan, Construction(**{**low.__dict__, "residual_rank": 3}), grams)
    dense, _ = share_model(model, plan, Construction("ls"), grams)
    assert params(factored) < params(residual) < params(dense)
    assert encoder_error(model, residual, data) < encoder_error(model, factored, data)
    layers = residual.encoder.layers
    assert layers[1].feed_forward1.linear1.base.down is layers[0].feed_forward1.linear1.base.down
    assert layers[1].feed_forward1.linear1.residual.up is not layers[0].feed_forward1.linear1.residual.up
    loaded, _ = load_model(save_model(residual, tmp_path / "r"))
    assert all(torch.equal(a, b) for a, b in zip(encode(residual, data), encode(loaded, data)))
    assert loaded.encoder.layers[1].feed_forward1.linear1.base.up is loaded.encoder.layers[0].feed_forward1.linear1.base.up


def test_shared_basis_ties_the_basis_only_is_exact_at_full_rank_and_round_trips(tmp_path):
    model, data = conformer(), batches(2)
    grams = all_grams(model, data)
    layout = model.sharing_layout()
    # everything but the matrices that read d_model inputs per layer: at rank 32 = d_model one basis spans every
    # member's inputs, so each layer gets its own matrices back exactly
    wide = (("ff1", "linear2"), ("ff2", "linear2"))                    # 4 d_model inputs
    others = tuple(f"{k}.{sub}" for k, sub in dict.fromkeys(layout.parts.values())
                   if (k, sub) not in layout.matrices or (k, sub) in wide)
    plan = build_plan(layout, repeat="2", unshare=("misc",) + others)
    full = Construction("ls", low_rank=32, low_rank_parts=tuple(p for p in layout.low_rank_parts if p not in wide),
                        shared_basis=True)
    exact, _ = share_model(model, plan, full, grams)
    lin = exact.encoder.layers[1].self_attn.linear_q
    assert lin.basis.weight is exact.encoder.layers[0].self_attn.linear_q.basis.weight
    assert lin.coefficients.weight is not exact.encoder.layers[0].self_attn.linear_q.coefficients.weight
    for a, b in zip(encode(model, data), encode(exact, data)):
        assert torch.allclose(a, b, atol=1e-4)
    plan = build_plan(layout, repeat="2", unshare=("misc",))
    low = Construction("ls", low_rank=6, low_rank_parts=layout.low_rank_parts)
    small, rows = share_model(model, plan, Construction(**{**low.__dict__, "shared_basis": True}), grams)
    per_layer, _ = share_model(model, build_plan(layout, repeat="1"), low, grams)
    assert params(small) < params(per_layer)  # one basis per group (and the plan's other shared tensors)
    assert any("one basis for 2 layers" in r["status"] for r in rows)
    assert encoder_error(model, small, data) > 0
    loaded, _ = load_model(save_model(small, tmp_path / "b"))
    assert params(loaded) == params(small)
    assert loaded.encoder.layers[1].feed_forward2.linear2.basis.weight is \
        loaded.encoder.layers[0].feed_forward2.linear2.basis.weight
    assert all(torch.equal(a, b) for a, b in zip(encode(small, data), encode(loaded, data)))
    refit_model = load_model(tmp_path / "b")[0]
    from asrshrink.methods.share import refit
    refit(model, refit_model, plan, data, 1)
    assert encoder_error(model, refit_model, data) < encoder_error(model, small, data)
    result = runner.invoke(app, ["info", str(tmp_path / "b")])
    assert result.exit_code == 0 and "rank 6 shared basis" in result.output
    report = export_model(small, tmp_path / "onnx")
    assert max(v for part in report["parity"]["max_abs_diff"].values() for v in part.values()) <= 1e-4


def test_shared_basis_needs_low_rank():
    with pytest.raises(AsrshrinkError, match="--shared-basis"):
        get_method("share").core(ShareConfig(repeat="2", shared_basis=True), Context(conformer(), batches(1)))


def test_refits_of_the_per_layer_parts_lower_the_calibration_error():
    model, data = conformer(seed=2), batches(2)
    method = get_method("share")
    base = ShareConfig(repeat="2", unshare=("attn.key", "misc"))
    plain = method.core(base, Context(model, data))
    refit = method.core(ShareConfig(**{**base.__dict__, "refit_iterations": 1}), Context(model, data))
    assert refit.post_training and all(r["error_after"] <= r["error_before"] for r in refit.post_training)
    assert any(r["error_after"] < r["error_before"] for r in refit.post_training)
    assert refit.figures["calibration_encoder_error"] < plain.figures["calibration_encoder_error"]
    assert params(refit.model) == params(plain.model)


def test_a_budget_picks_the_plan_with_the_least_calibration_error():
    model, data = conformer(), batches(2)
    outcome = get_method("share").core(ShareConfig(compression_ratio=1.5), Context(model, data))
    candidates = outcome.figures["candidates"]
    meeting = [c for c in candidates if c["status"] == "meets the budget"]
    chosen = [c for c in candidates if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["error"] == min(c["error"] for c in meeting)
    assert any(c["status"] == "over the budget" for c in candidates)  # repeat 1 shares nothing
    encoder = sum(p.numel() for p in model.encoder.parameters())
    assert sum(p.numel() for p in outcome.model.encoder.parameters()) <= encoder / 1.5 + 1


# --- ONNX ---------------------------------------------------------------------------------------------------------

def test_onnx_stores_each_shared_weight_once_with_parity(tmp_path):
    model, data = conformer(), batches(2)
    shared, _ = share_model(model, build_plan(model.sharing_layout(), repeat="4", unshare=("misc",)),
                            Construction("ls"), all_grams(model, data))
    sizes = {}
    for name, net in (("plain", model), ("shared", shared)):
        report = export_model(net, tmp_path / name)
        assert max(v for part in report["parity"]["max_abs_diff"].values() for v in part.values()) <= 1e-4
        sizes[name] = os.path.getsize(tmp_path / name / "encoder.onnx")
    encoder = {name: sum(p.numel() for p in net.encoder.parameters()) for name, net in (("plain", model),
                                                                                         ("shared", shared))}
    saved = 4 * (encoder["plain"] - encoder["shared"])
    assert abs((sizes["plain"] - sizes["shared"]) - saved) < 0.02 * saved
    graph = onnx.load(tmp_path / "shared" / "encoder.onnx").graph
    stored = sum(onnx.numpy_helper.to_array(i).size for i in graph.initializer)
    # each physical tensor at most once (the exporter folds a few small ones, e.g. batch norm, into others)
    assert 0.95 * encoder["shared"] <= stored <= encoder["shared"] + sum(b.numel() for b in shared.encoder.buffers())


def test_duplicate_initializers_are_merged():
    import numpy as np

    def tensor(name, values):
        return onnx.numpy_helper.from_array(np.array(values, dtype=np.float32).reshape(2, 2), name)

    weight, twin, other = tensor("w1", [1, 2, 3, 4]), tensor("w2", [1, 2, 3, 4]), tensor("w3", [1, 2, 3, 5])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["b"]),
             helper.make_node("MatMul", ["b", "w3"], ["y"])]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 2])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [value("x")], [value("y")], [weight, twin, other])
    assert dedupe_initializers(graph) == 1
    assert [i.name for i in graph.initializer] == ["w1", "w3"]
    assert [n.input[1] for n in graph.node] == ["w1", "w1", "w3"]
    onnx.checker.check_model(helper.make_model(graph))


# --- the LSTM family ----------------------------------------------------------------------------------------------

def lstm_model():
    torch.manual_seed(0)
    return MlperfRnnt(MlperfRnntConfig(encoder_hidden=16, encoder_pre_layers=1, encoder_post_layers=3,
                                       pred_hidden=12, pred_layers=1, joint_hidden=16, dropout=0.0)).eval()


def lstm_batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [{"features": torch.randn(3, 40, 240, generator=g), "feature_lengths": torch.tensor([40, 33, 25]),
             "labels": torch.randint(0, 28, (3, 4), generator=g), "label_lengths": torch.tensor([4, 3, 2])}
            for _ in range(n)]


def test_lstm_post_stack_layers_of_equal_shape_share(tmp_path):
    model, data = lstm_model(), lstm_batches()
    layout = model.sharing_layout()
    with pytest.raises(AsrshrinkError, match="only layers of equal shape"):
        share_model(model, build_plan(layout, repeat="3"), Construction("ls"), None)
    plan = build_plan(layout, repeat="0,1,1")
    grams = all_grams(model, data)
    errors = {}
    for init in ("pick", "mean", "ls"):
        shared, rows = share_model(model, plan, Construction(init), grams)
        errors[init] = sum(r["error"] for r in rows)
    assert errors["ls"] < errors["mean"] and errors["ls"] < errors["pick"]
    post = shared.encoder.post_rnn.layers
    assert post[2].lstm.weight_ih_l0 is post[1].lstm.weight_ih_l0 and post[0].lstm.weight_ih_l0 is not \
        post[1].lstm.weight_ih_l0
    assert params(model) - params(shared) == sum(p.numel() for p in model.encoder.post_rnn.layers[2].parameters())
    loaded, _ = load_model(save_model(shared, tmp_path / "lstm"))
    assert loaded.encoder.post_rnn.layers[2].lstm.weight_hh_l0.data_ptr() == \
        loaded.encoder.post_rnn.layers[1].lstm.weight_hh_l0.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(encode(shared, data), encode(loaded, data)))
    outcome = get_method("share").core(ShareConfig(repeat="0,1,1"), Context(model, data))  # default options
    assert params(outcome.model) == params(shared)
    with pytest.raises(AsrshrinkError, match="--low-rank factorises Linear matrices"):
        get_method("share").core(ShareConfig(repeat="0,1,1", low_rank=4), Context(model, data))
    with pytest.raises(AsrshrinkError, match="--refit-iterations refits Linear matrices"):
        get_method("share").check_model(ShareConfig(repeat="0,1,1", refit_iterations=1), model)
    nothing, _ = share_model(model, build_plan(layout, repeat="1"), Construction("ls"), grams)
    assert all(torch.equal(a, b) for a, b in zip(encode(model, data), encode(nothing, data)))


# --- the command --------------------------------------------------------------------------------------------------

def test_share_command_writes_a_shared_model_and_refuses_bad_options(tmp_path, tiny_data):
    source = save_model(conformer(), tmp_path / "model")
    out = tmp_path / "shared"
    result = runner.invoke(app, ["share", str(source), "-o", str(out), "--repeat", "2", "--unshare",
                                 "conv.depthwise,misc", "--calib", str(tiny_data), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["command"] == "share" and report["figures"]["plan"]["physical"] == {
        "ff1": 2, "attn": 2, "conv": 2, "ff2": 2}
    assert report["after"]["params"] < report["before"]["params"]
    assert "virtual layers" in (out / "report.md").read_text()
    info = runner.invoke(app, ["info", str(out), "--json"])
    summary = json.loads(info.stdout)
    assert summary["sharing"]["virtual_layers"] == 4 and summary["params"] == report["after"]["params"]
    assert summary["sharing"]["virtual_params"] > summary["params"]
    again = runner.invoke(app, ["svd", str(out), "-o", str(tmp_path / "svd")])
    assert_one_line_error(again, "shares weights across layers")
    for args, fragment in ((["--repeat", "0,0,3"], "3 indices for 4 layers"),
                           (["--unshare", "attn.bogus"], "cannot unshare"),
                           (["--init", "median"], "--init must be one of"),
                           (["--repeat", "2", "--groups", "0-1"], "not both"),
                           (["--low-rank-parts", "conv.depthwise", "--low-rank", "4"], "not a Linear")):
        bad = runner.invoke(app, ["share", str(source), "-o", str(tmp_path / "bad"), *args])
        assert_one_line_error(bad, fragment)
        assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_share_help_has_an_example():
    result = runner.invoke(app, ["share", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output


# --- repair: distill fine-tunes a shared model with its ties, resumably --------------------------------------------

@pytest.fixture()
def speech(tmp_path):
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    folder = tmp_path / "speech"
    folder.mkdir()
    for i, text in enumerate(["hello world", "a b c", "shrink me", "tiny model"]):
        sf.write(folder / f"u{i}.wav", (0.1 * rng.standard_normal(4000 + 800 * i)).astype(np.float32), 16000)
        (folder / f"u{i}.txt").write_text(text)
    return folder


def test_distill_repairs_a_shared_model_keeping_its_ties_and_resumes_exactly(speech, tmp_path, monkeypatch):
    from asrshrink import compress
    from asrshrink.config import DistillConfig
    import asrshrink.training.distill as distill_module

    original = lstm_model()
    teacher = save_model(original, tmp_path / "teacher")
    shared, _ = share_model(original, build_plan(original.sharing_layout(), repeat="0,1,1"), Construction("mean"),
                            None)
    student = save_model(shared, tmp_path / "student")
    cfg = DistillConfig(data=str(speech), teacher=str(teacher), steps=6, lr=3e-3, warmup=2, max_frames=2000,
                        checkpoint_every=2)
    compress.run_method("distill", cfg, model=str(student), out=tmp_path / "straight")
    real_train = distill_module.train
    monkeypatch.setattr(distill_module, "train", lambda *a, **k: real_train(*a, **{**k, "stop_after": 3}))
    with pytest.raises(KeyboardInterrupt):
        compress.run_method("distill", cfg, model=str(student), out=tmp_path / "resumed")
    monkeypatch.setattr(distill_module, "train", real_train)
    compress.resume(tmp_path / "resumed")
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "resumed")
    for net in (a, b):
        post = net.encoder.post_rnn.layers
        assert post[2].lstm.weight_ih_l0 is post[1].lstm.weight_ih_l0 and params(net) == params(shared)
    assert not torch.equal(a.encoder.post_rnn.layers[1].lstm.weight_ih_l0,
                           shared.encoder.post_rnn.layers[1].lstm.weight_ih_l0)  # it trained
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_share_with_a_repair_resumes_to_the_parameters_of_an_uninterrupted_run(speech, tmp_path, monkeypatch):
    from asrshrink import compress
    from asrshrink.compress import PROGRESS
    from asrshrink.config import CalibConfig
    import asrshrink.training.distill as distill_module

    original = lstm_model()
    source = save_model(original, tmp_path / "model")
    cfg = ShareConfig(repeat="0,1,1", finetune_steps=6, data=str(speech), finetune_lr=3e-3, checkpoint_every=2)
    calib = CalibConfig(path=str(speech))
    report = compress.run_method("share", cfg, model=str(source), out=tmp_path / "straight", calib=calib)
    figures = report["figures"]
    assert figures["calibration_encoder_error"] != figures["calibration_encoder_error_before_repair"]
    real_train = distill_module.train
    monkeypatch.setattr(distill_module, "train", lambda *a, **k: real_train(*a, **{**k, "stop_after": 3}))
    with pytest.raises(KeyboardInterrupt):
        compress.run_method("share", cfg, model=str(source), out=tmp_path / "resumed", calib=calib)
    monkeypatch.setattr(distill_module, "train", real_train)
    assert (tmp_path / "resumed" / PROGRESS).is_dir() and not (tmp_path / "resumed" / "model.safetensors").exists()
    refused = runner.invoke(app, ["share", "--resume", str(tmp_path / "resumed"), "--finetune-steps", "9"])
    assert_one_line_error(refused, "--finetune-steps 9 contradicts the interrupted run")
    result = runner.invoke(app, ["share", "--resume", str(tmp_path / "resumed")])
    assert result.exit_code == 0, result.output
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "resumed")
    post = b.encoder.post_rnn.layers
    assert post[2].lstm.weight_ih_l0 is post[1].lstm.weight_ih_l0 and params(b) < params(original)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_repair_options_are_checked():
    with pytest.raises(AsrshrinkError, match="give --data PATH"):
        ShareConfig(repeat="2", finetune_steps=5).check()
    with pytest.raises(AsrshrinkError, match="give --finetune-steps N too"):
        ShareConfig(repeat="2", data="x").check()

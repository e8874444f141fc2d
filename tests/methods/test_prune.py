"""Pruning: exact sparsity per matrix and global, SparseGPT's invariants and its gain over magnitude, sparse
storage sizes (eq. 13 of the sparsity paper), and the model file's round trip."""

import numpy as np
import pytest
import soundfile as sf
import torch

from asrshrink import api, compress
from asrshrink.calibrate import valid_rows
from asrshrink.config import CalibConfig, PruneConfig
from asrshrink.errors import AsrshrinkError
from asrshrink.methods.prune import (SecondMoment, magnitude_prune, matrix, prune_model, prune_targets,
                                     pruned_count, relative_error, smallest, sparsegpt_prune, split_count,
                                     wanda_prune)
from asrshrink.models.checkpoint import load_model, save_model
from asrshrink.models.layers import SparseLinear, SparseLSTMLayer, sparse_storage_bytes
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig

TINY = MlperfRnntConfig(encoder_hidden=24, encoder_pre_layers=2, encoder_post_layers=2, pred_hidden=12,
                        pred_layers=1, joint_hidden=16, dropout=0.0)


def tiny(seed=0):
    torch.manual_seed(seed)
    return MlperfRnnt(TINY).eval()


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"features": torch.randn(6, 50, 240, generator=g),
             "feature_lengths": torch.randint(30, 51, (6,), generator=g),
             "labels": torch.randint(0, 28, (6, 8), generator=g),
             "label_lengths": torch.randint(2, 9, (6,), generator=g)} for _ in range(n)]


def correlated_inputs(rows=4000, cols=48, seed=0):
    """Correlated features with a non-zero mean and scales spread over 1.5 decades (in random order)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, cols)[torch.randperm(cols, generator=g)]
    mix = torch.randn(cols, cols, generator=g) * scales
    return torch.randn(rows, cols, generator=g) @ mix + 0.3 * torch.randn(cols, generator=g)


# --- per-matrix rules -----------------------------------------------------------------------------------------

def test_counts_are_exact_and_split_without_loss():
    assert pruned_count(1000, 0.7) == 700 and pruned_count(5, 0.5) == 3 and pruned_count(7, 0.0) == 0
    parts = split_count(700, [128] * 7 + [104])
    assert sum(parts) == 700 and all(0 <= p <= s for p, s in zip(parts, [128] * 7 + [104]))
    mask = smallest(torch.tensor([3.0, 1.0, 1.0, 1.0, 0.5]), 3)
    assert mask.tolist() == [False, True, True, False, True]  # ties at the threshold: earliest first


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7, 0.9])
def test_every_rule_prunes_exactly_round_s_n(sparsity):
    torch.manual_seed(0)
    weight = torch.randn(96, 48)
    moment = SecondMoment(48)
    moment.add(correlated_inputs())
    expected = pruned_count(weight.numel(), sparsity)
    for pruned in (magnitude_prune(weight, sparsity), wanda_prune(weight, sparsity, moment.value()),
                   sparsegpt_prune(weight, moment.value(), sparsity, block_size=16)):
        assert int((pruned == 0).sum()) == expected
    kept = magnitude_prune(weight, sparsity)
    assert torch.equal(kept[kept != 0], weight[kept != 0])
    if expected:
        assert weight[kept == 0].abs().max() <= weight[kept != 0].abs().min()


def test_wanda_weighs_magnitudes_by_input_norms():
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, 6.0]])
    moment = torch.diag(torch.tensor([100.0, 1.0, 0.01]))  # input norms 10, 1, 0.1
    assert wanda_prune(weight, 0.5, moment).tolist() == [[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]
    assert torch.equal(wanda_prune(weight, 0.5, torch.eye(3)), magnitude_prune(weight, 0.5))


def test_sparsegpt_with_white_inputs_in_one_block_is_magnitude_pruning():
    torch.manual_seed(0)
    weight = torch.randn(40, 24)
    assert torch.equal(sparsegpt_prune(weight, torch.eye(24), 0.6, block_size=24), magnitude_prune(weight, 0.6))
    assert torch.allclose(sparsegpt_prune(weight, torch.eye(24) * 3, 0.0, block_size=8), weight)


def test_second_moment_streams_in_float64():
    x = correlated_inputs(rows=900)
    stats = SecondMoment(48)
    for chunk in x.split(250):
        stats.add(chunk)
    assert stats.gram.dtype == torch.float64 and stats.rows == 900
    assert torch.allclose(stats.value(), x.double().T @ x.double() / 900)


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_sparsegpt_output_error_is_below_magnitude_and_wanda(sparsity):
    torch.manual_seed(0)
    weight = torch.randn(96, 48)
    x = correlated_inputs()
    moment = SecondMoment(48)
    moment.add(x)

    def error(pruned):  # measured on the inputs themselves, not from the statistics
        x64 = x.double()
        return float(((x64 @ (weight - pruned).double().T) ** 2).sum() / ((x64 @ weight.double().T) ** 2).sum())

    magnitude = error(magnitude_prune(weight, sparsity))
    sparsegpt = error(sparsegpt_prune(weight, moment.value(), sparsity, block_size=16))
    assert sparsegpt < 0.9 * magnitude
    assert sparsegpt < error(wanda_prune(weight, sparsity, moment.value()))
    assert relative_error(weight, magnitude_prune(weight, sparsity), moment.value()) == pytest.approx(magnitude)


# --- the model-level method -----------------------------------------------------------------------------------

def prunable_weights(model, components):
    return {(t.layer, t.side): matrix(model, t) for t in prune_targets(model, components) if t.prunable}


def test_per_matrix_sparsity_is_exact_and_the_input_model_untouched():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, reports = prune_model(model, PruneConfig(sparsity=0.7, components=("encoder", "prediction", "joint")))
    weights = prunable_weights(pruned, ["encoder", "prediction", "joint"])
    assert len(weights) == len(reports) == 2 * 4 + 2 * 1 + 3
    for (layer, side), w in weights.items():
        assert int((w == 0).sum()) == pruned_count(w.numel(), 0.7), (layer, side)
    assert all(isinstance(pruned.get_submodule(r.layer), (SparseLSTMLayer, SparseLinear)) for r in reports)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    biases = [k for k in before if "bias" in k]
    assert all(torch.equal(pruned.state_dict()[k], before[k]) for k in biases)


def test_global_threshold_is_one_magnitude_cut_across_matrices():
    model = tiny()
    original = prunable_weights(model, ["encoder"])
    pruned, reports = prune_model(model, PruneConfig(sparsity=0.6, global_threshold=True))
    weights = prunable_weights(pruned, ["encoder"])
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == pruned_count(total, 0.6)
    cut = max(float(original[k][w == 0].abs().max()) for k, w in weights.items() if (w == 0).any())
    assert all(float(original[k][w != 0].abs().min()) >= cut for k, w in weights.items())
    assert len({round(r.sparsity, 3) for r in reports}) > 1  # matrices of different scales lose different shares


def test_reloading_keeps_the_zeros_and_describes_the_sparsity(tmp_path):
    model = tiny()
    pruned, _ = prune_model(model, PruneConfig(sparsity=0.8, components=("encoder", "joint")))
    save_model(pruned, tmp_path)
    loaded, info = load_model(tmp_path)
    for key, tensor in pruned.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
    assert isinstance(loaded.encoder.pre_rnn.layers[0], SparseLSTMLayer)
    assert isinstance(loaded.joint_net.output, SparseLinear)
    assert type(loaded.prediction.rnn.layers[0]).__name__ == "LSTMLayer"
    spec = info.structure["encoder.pre_rnn.layers.0"]
    assert spec["type"] == "sparse_lstm" and spec["ih"]["nonzeros"] == 96 * 240 - pruned_count(96 * 240, 0.8)
    assert info.structure["joint_net.output"]["nonzeros"] == 29 * 16 - pruned_count(29 * 16, 0.8)
    assert api.describe(loaded)["sparse_bytes"] == api.describe(pruned)["sparse_bytes"]
    feats = torch.randn(1, 12, 240)
    with torch.no_grad():
        assert torch.equal(loaded.encode(feats, torch.tensor([12]))[0], pruned.encode(feats, torch.tensor([12]))[0])


def test_sparse_storage_is_a_bit_mask_plus_the_non_zeros():
    # eq. 13 of "Compression of end-to-end models": ratio 1 / (1 - s + 1/32) against float32.
    assert sparse_storage_bytes(1024, 256) == 128 + 1024
    assert 4 * 1024 / sparse_storage_bytes(1024, 256) == pytest.approx(1 / (1 - 0.75 + 1 / 32))
    assert sparse_storage_bytes(10, 3) == 2 + 12  # the mask rounds up to whole bytes
    model = tiny()
    pruned, _ = prune_model(model, PruneConfig(sparsity=0.5, components=("joint",)))
    before, after = api.describe(model), api.describe(pruned)
    # joint: encoder_proj 16x24 (+16 bias), prediction_proj 16x12 (no bias), output 29x16 (+29 bias), by hand
    dense = 4 * (16 * 24 + 16 + 16 * 12 + 29 * 16 + 29)
    sparse = (48 + 4 * 192) + (24 + 4 * 96) + (58 + 4 * 232) + 4 * (16 + 29)
    assert before["bytes_by_component"]["joint"] == before["sparse_bytes_by_component"]["joint"] == dense
    assert after["bytes_by_component"]["joint"] == dense and after["sparse_bytes_by_component"]["joint"] == sparse
    assert after["nonzero_params_by_component"]["joint"] == 192 + 96 + 232 + 16 + 29
    assert after["sparse_bytes"] == before["sparse_bytes"] - dense + sparse
    assert after["params"] == before["params"] and after["nonzero_params"] == before["params"] - (192 + 96 + 232)


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_sparsegpt_lowers_every_layer_and_the_encoder_error_below_magnitude(sparsity):
    model = tiny()
    data = batches()
    magnitude, _ = prune_model(model, PruneConfig(sparsity=sparsity))
    sparsegpt, reports = prune_model(model, PruneConfig(sparsity=sparsity, method="sparsegpt", block_size=32), data)
    assert [r.status for r in reports] == ["pruned (sparsegpt)"] * 8
    assert all(r.error < r.error_magnitude for r in reports)
    for r in reports:
        assert r.nonzeros == r.shape[0] * r.shape[1] - pruned_count(r.shape[0] * r.shape[1], sparsity)

    def encoder_error(pruned):
        error = energy = 0.0
        with torch.no_grad():
            for b in data:
                ref, lengths = model.encode(b["features"], b["feature_lengths"])
                out, _ = pruned.encode(b["features"], b["feature_lengths"])
                mask = torch.arange(ref.shape[1]) < lengths.unsqueeze(1)
                error += float(((out - ref)[mask] ** 2).sum())
                energy += float((ref[mask] ** 2).sum())
        return error / energy

    assert encoder_error(sparsegpt) < 0.8 * encoder_error(magnitude)


def test_layer_statistics_come_from_the_already_pruned_layers():
    """The second layer's input-side error is measured on the first (pruned) layer's outputs."""
    model = tiny()
    data = batches(n=2)
    pruned, reports = prune_model(model, PruneConfig(sparsity=0.7, method="sparsegpt"), data)
    second = next(r for r in reports if r.layer == "encoder.pre_rnn.layers.1" and r.side == "ih")
    moment = SecondMoment(24)
    with torch.no_grad():
        for b in data:
            x, lengths = pruned.block_inputs("encoder", b)
            moment.add(valid_rows(pruned.encoder.pre_rnn.layers[0](x)[0], lengths))
    original = model.encoder.pre_rnn.layers[1].weight_ih.detach()
    assert relative_error(original, pruned.encoder.pre_rnn.layers[1].weight_ih.detach(), moment.value()) == \
        pytest.approx(second.error, rel=1e-6)


def test_joint_falls_back_to_magnitude_and_wanda_runs():
    model = tiny()
    pruned, reports = prune_model(model, PruneConfig(sparsity=0.5, method="wanda", components=("encoder", "joint")),
                                  batches(n=1))
    statuses = {r.layer: r.status for r in reports}
    assert statuses["encoder.pre_rnn.layers.0"] == "pruned (wanda)"
    assert statuses["joint_net.output"] == "pruned by magnitude (no calibration walk)"
    assert torch.equal(pruned.joint_net.output.weight, magnitude_prune(model.joint_net.output.weight.detach(), 0.5))


def test_low_rank_sides_are_left_alone(tmp_path):
    from asrshrink.methods.svd import choose_ranks, svd_compress

    model = tiny()
    factorised = svd_compress(model, choose_ranks(model, ["encoder"], rank=23))  # 96x24 sides stay dense
    pruned, reports = prune_model(factorised, PruneConfig(sparsity=0.5))
    statuses = {(r.layer, r.side): r.status for r in reports}
    assert statuses[("encoder.pre_rnn.layers.0", "ih")] == "low-rank factors: not pruned"
    assert statuses[("encoder.pre_rnn.layers.0", "hh")] == "pruned (magnitude)"
    layer = pruned.encoder.pre_rnn.layers[0]
    assert isinstance(layer.hh, SparseLinear) and int((layer.hh.weight == 0).sum()) == pruned_count(96 * 24, 0.5)
    assert torch.equal(layer.ih.up, factorised.encoder.pre_rnn.layers[0].ih.up)
    save_model(pruned, tmp_path)
    loaded, info = load_model(tmp_path)
    spec = info.structure["encoder.pre_rnn.layers.0"]
    assert spec["ih"]["type"] == "lowrank" and spec["hh"]["type"] == "sparse"
    assert torch.equal(loaded.encoder.pre_rnn.layers[0].hh.weight, layer.hh.weight)


# --- the command's code path ----------------------------------------------------------------------------------

@pytest.fixture()
def speech(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "speech"
    folder.mkdir()
    for i in range(6):
        sf.write(folder / f"u{i}.wav", (0.1 * rng.standard_normal(8000 + 800 * i)).astype(np.float32), 16000)
        (folder / f"u{i}.txt").write_text("some words here")
    return folder


def test_prune_run_writes_a_self_describing_model_and_report(tmp_path, speech):
    model_path = save_model(tiny(), tmp_path / "model")
    report = compress.prune(model=str(model_path), out=tmp_path / "out",
                            config=PruneConfig(sparsity=0.75, method="sparsegpt"),
                            calib=CalibConfig(path=str(speech), num_utterances=6, batch_size=4))
    assert report["command"] == "prune" and report["options"]["method"] == "sparsegpt"
    assert report["options"]["calib_used"]["utterances"] == 6
    assert all(row["sparsity"] == pytest.approx(0.75, abs=1e-3) for row in report["layers"])
    assert report["compression_ratio"]["model"] == 1.0
    assert report["compression_ratio"]["storage"]["by_component"]["encoder"] > 3
    assert report["after"]["sparse_bytes"] == sum(report["after"]["sparse_bytes_by_component"].values())
    loaded, info = load_model(tmp_path / "out")
    assert info.extra["method"]["command"] == "prune" and len(info.structure) == 4
    assert "| encoder.pre_rnn.layers.0 | ih | 96x240 | 0.750 |" in (tmp_path / "out" / "report.md").read_text()


def test_prune_refuses_bad_options_before_any_output(tmp_path):
    with pytest.raises(AsrshrinkError, match="--sparsity"):
        compress.prune(model=None, out=tmp_path / "o", config=PruneConfig(sparsity=1.0))
    with pytest.raises(AsrshrinkError, match="--components must include"):
        compress.prune(model=str(save_model(tiny(), tmp_path / "m")), out=tmp_path / "o",
                       config=PruneConfig(sparsity=0.5, method="sparsegpt", components=("joint",)))
    assert not (tmp_path / "o").exists()

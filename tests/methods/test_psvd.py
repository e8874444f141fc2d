"""PSVD: the regression math, the equivalence it relies on, its never-worse invariant, and resuming."""

import numpy as np
import pytest
import soundfile as sf
import torch

from asrshrink import compress
from asrshrink.config import CalibConfig, SvdConfig
from asrshrink.methods.psvd import (PsvdConfig, RegressionStats, fold_correction, psvd, regression_error,
                                    solve_regression)
from asrshrink.methods.svd import choose_ranks, data_aware_svd_compress, svd_compress
from asrshrink.models.checkpoint import load_model, save_model
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig

TINY = MlperfRnntConfig(encoder_hidden=32, encoder_pre_layers=2, encoder_post_layers=2, pred_hidden=12,
                        pred_layers=1, joint_hidden=16, dropout=0.0)


def tiny(seed=0):
    torch.manual_seed(seed)
    return MlperfRnnt(TINY).eval()


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"features": torch.randn(6, 50, 240, generator=g),
             "feature_lengths": torch.randint(30, 51, (6,), generator=g),
             "labels": torch.randint(0, 28, (6, 8), generator=g),
             "label_lengths": torch.randint(2, 9, (6,), generator=g)} for _ in range(n)]


def test_regression_recovers_an_exact_affine_map():
    torch.manual_seed(0)
    z = torch.randn(500, 6)
    a, c = torch.randn(9, 6), torch.randn(9)
    stats = RegressionStats.empty(6, 9)
    for chunk in z.split(100):
        stats.add(chunk, chunk @ a.T + c)
    fit_a, fit_c = solve_regression(stats, ridge=0.0)
    assert torch.allclose(fit_a.float(), a, atol=1e-4) and torch.allclose(fit_c.float(), c, atol=1e-4)
    assert regression_error(stats, fit_a, fit_c) < 1e-6  # products in float32, sums in float64


def test_solving_for_the_factor_equals_the_papers_correction_matrix():
    """min_M ||M (U z + b) - p|| and min_{A,c} ||A z + c - p|| reach the same fit; M folds into (M U, M b)."""
    torch.manual_seed(0)
    n, k, o = 400, 5, 12
    z = torch.randn(n, k, dtype=torch.float64)
    up, bias = torch.randn(o, k, dtype=torch.float64), torch.randn(o, dtype=torch.float64)
    target = torch.randn(n, o, dtype=torch.float64) + z @ torch.randn(k, o, dtype=torch.float64)
    compressed = z @ up.T + bias                                         # (N, O), rank k + 1
    m = torch.linalg.lstsq(compressed, target, driver="gelsd").solution.T  # the paper's M (O, O)
    folded_up, folded_bias = fold_correction(up, bias, m)
    assert torch.allclose(m @ compressed.T, (z @ folded_up.T + folded_bias).T, atol=1e-9)
    stats = RegressionStats.empty(k, o)
    stats.add(z, target)
    a, c = solve_regression(stats, ridge=0.0)
    direct = z @ a.T + c
    paper = compressed @ m.T
    assert torch.allclose(direct, paper, atol=1e-6)


@pytest.mark.parametrize("variant", ["paper", "joint"])
@pytest.mark.parametrize("mode", ["stacked", "rollout"])
def test_layer_output_error_after_regression_is_never_above_svd(variant, mode):
    model = tiny()
    choices = choose_ranks(model, ["encoder"], threshold=0.25, mode=mode)
    svd_model = svd_compress(model, choices)
    refit = svd_compress(model, choices)
    data = batches()
    reports = psvd(model, refit, data, PsvdConfig(iterations=1, variant=variant))
    assert len(reports) == 4
    # fit_layer keeps a step only when it lowers the layer's measured error, so the reports' error_after <=
    # error_before holds by construction and is not asserted; what could fail is checked: the fits help, and
    # the errors measured independently of fit_layer agree with its reports.
    assert any(report.error_after < 0.9 * report.error_before for report in reports)
    # Measured independently on the first layer, which sees the same inputs in both models.
    assert reports[0].error_before == pytest.approx(_first_layer_error(model, svd_model, data), rel=1e-4)
    assert reports[0].error_after == pytest.approx(_first_layer_error(model, refit, data), rel=1e-4)
    assert _first_layer_error(model, refit, data) <= _first_layer_error(model, svd_model, data)


def _first_layer_error(model, svd_model, data):
    first = "encoder.pre_rnn.layers.0"
    err = energy = 0.0
    with torch.no_grad():
        for batch in data:
            x, n = batch["features"].transpose(0, 1), batch["feature_lengths"]
            h_o, _ = model.get_submodule(first)(x)
            h, _ = svd_model.get_submodule(first)(x)
            mask = (torch.arange(x.shape[0]).unsqueeze(1) < n.unsqueeze(0)).unsqueeze(-1)
            err += float((((h - h_o) * mask) ** 2).sum())
            energy += float(((h_o * mask) ** 2).sum())
    return err / energy


def test_three_iterations_beat_svd_end_to_end():
    """On a random model one pass can overshoot (each layer's recurrent fit sees the hidden states of its
    previous version); the paper's repeated passes settle it."""
    model = tiny()
    choices = choose_ranks(model, ["encoder"], threshold=0.25)
    svd_model = svd_compress(model, choices)
    refit = svd_compress(model, choices)
    data = batches()
    psvd(model, refit, data, PsvdConfig(iterations=3))
    with torch.no_grad():
        feats, lengths = data[0]["features"], data[0]["feature_lengths"]
        ref = model.encode(feats, lengths)[0]
        svd_error = ((svd_model.encode(feats, lengths)[0] - ref) ** 2).mean()
        assert ((refit.encode(feats, lengths)[0] - ref) ** 2).mean() < 0.5 * svd_error


def test_prediction_network_is_refitted_too():
    model = tiny()
    choices = choose_ranks(model, ["encoder", "prediction"], rank=4)
    refit = svd_compress(model, choices)
    before = refit.prediction.rnn.layers[0].hh.up.clone()
    reports = psvd(model, refit, batches(), PsvdConfig(iterations=1, components=("encoder", "prediction")))
    assert [r.layer for r in reports][-1] == "prediction.rnn.layers.0"
    assert reports[-1].error_after < reports[-1].error_before
    assert not torch.equal(refit.prediction.rnn.layers[0].hh.up, before)


def test_data_aware_svd_lowers_the_encoder_error():
    model = tiny()
    choices = choose_ranks(model, ["encoder"], threshold=0.2)
    data = batches()
    plain = svd_compress(model, choices)
    aware = data_aware_svd_compress(model, choices, data)
    with torch.no_grad():
        feats, lengths = data[1]["features"], data[1]["feature_lengths"]
        ref = model.encode(feats, lengths)[0]
        assert ((aware.encode(feats, lengths)[0] - ref) ** 2).mean() < ((plain.encode(feats, lengths)[0] - ref) ** 2).mean()


@pytest.fixture()
def speech(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "speech"
    folder.mkdir()
    for i in range(10):
        sf.write(folder / f"u{i}.wav", (0.1 * rng.standard_normal(8000 + 800 * i)).astype(np.float32), 16000)
        (folder / f"u{i}.txt").write_text("some words here")
    return folder


def test_interrupted_psvd_resumes_to_the_same_model(tmp_path, speech, monkeypatch):
    model_path = save_model(tiny(), tmp_path / "model")
    kwargs = dict(model=str(model_path), svd=SvdConfig(threshold=0.25),
                  calib=CalibConfig(path=str(speech), num_utterances=10, batch_size=4),
                  post=PsvdConfig(iterations=2))
    compress.run("psvd", out=tmp_path / "straight", **kwargs)

    calls = {"n": 0}
    real_save = compress.save_model

    def failing_save(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # the 6th per-layer checkpoint: iteration 2, second layer
            raise KeyboardInterrupt
        return real_save(*args, **kw)

    monkeypatch.setattr(compress, "save_model", failing_save)
    with pytest.raises(KeyboardInterrupt):
        compress.run("psvd", out=tmp_path / "resumed", **kwargs)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    monkeypatch.setattr(compress, "save_model", real_save)
    report = compress.resume(tmp_path / "resumed")
    assert [r["iteration"] for r in report["post_training"]] == [1] * 4 + [2] * 4
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "resumed")
    for key, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[key]), key
    assert not (tmp_path / "resumed" / ".progress").exists()


def test_refitting_with_the_layers_own_hidden_states_helps():
    model = tiny()
    choices = choose_ranks(model, ["encoder"], threshold=0.25)
    data = batches()
    errors = {}
    for refits in (1, 3):
        refit = svd_compress(model, choices)
        reports = psvd(model, refit, data, PsvdConfig(iterations=1, refits=refits))
        errors[refits] = sum(r.error_after for r in reports)
    assert errors[3] < errors[1]

"""Truncated SVD of LSTM weights: exact invariants on tiny models."""

import math

import pytest
import torch

from asrshrink.methods.svd import choose_ranks, factorisation_saves, rank_for_threshold, svd_compress, svd_factors
from asrshrink.models.checkpoint import load_model, save_model
from asrshrink.models.layers import FactorizedLSTMLayer, LowRankLinear, named_lstm_layers
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig

TINY = MlperfRnntConfig(encoder_hidden=24, encoder_pre_layers=2, encoder_post_layers=2, pred_hidden=12,
                        pred_layers=1, joint_hidden=16, dropout=0.0)


def tiny(seed=0):
    torch.manual_seed(seed)
    return MlperfRnnt(TINY).eval()


@pytest.mark.parametrize("groups", [1, 4])
def test_full_rank_reproduces_the_weights(groups):
    torch.manual_seed(0)
    weight = torch.randn(96, 40)
    up, down = svd_factors(weight, min(96 // groups, 40), groups=groups)
    rebuilt = torch.bmm(up, down.unflatten(0, (groups, -1))).flatten(0, 1)
    assert torch.allclose(rebuilt, weight, atol=1e-5)


def test_truncation_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    weight = torch.randn(30, 20)
    up, down = svd_factors(weight, 5)
    error = torch.linalg.matrix_norm(weight - up[0] @ down)
    s = torch.linalg.svdvals(weight)
    assert error == pytest.approx(float(s[5:].square().sum().sqrt()), rel=1e-5)


def test_data_aware_truncation_lowers_the_output_error_on_its_inputs():
    torch.manual_seed(0)
    x = torch.randn(2000, 20) @ torch.diag(torch.logspace(0, -2, 20)) @ torch.randn(20, 20)
    weight = torch.randn(30, 20)
    scale = torch.linalg.cholesky((x.T @ x / len(x)).double())
    plain_up, plain_down = svd_factors(weight, 4)
    aware_up, aware_down = svd_factors(weight, 4, scale=scale)

    def err(up, down):
        return float(((x @ (up[0] @ down - weight).T) ** 2).mean())

    assert err(aware_up, aware_down) < 0.8 * err(plain_up, plain_down)
    full_up, full_down = svd_factors(weight, 20, scale=scale)
    assert torch.allclose(full_up[0] @ full_down, weight, atol=1e-4)


def test_threshold_rule_and_saving_rule():
    assert rank_for_threshold(4096, 1024, 0.2) == math.ceil(0.2 * 1024)
    assert rank_for_threshold(4096, 240, 0.1) == 24
    assert factorisation_saves(4096, 1024, 204) and not factorisation_saves(4096, 240, 240)


def test_full_rank_factorised_model_computes_the_same_function():
    model = tiny()
    choices = choose_ranks(model, ["encoder", "prediction"], threshold=1.0)
    # at full rank nothing saves, so force factorisation to check the computation itself
    forced = [c.__class__(c.layer, c.side, c.rows, c.cols, 1, min(c.rows, c.cols), "forced") for c in choices]
    compressed = svd_compress(model, forced)
    assert all(isinstance(layer, FactorizedLSTMLayer) for _, layer in named_lstm_layers(compressed))
    feats = torch.randn(2, 15, 240)
    lengths = torch.tensor([15, 9])
    with torch.no_grad():
        a, _ = model.encode(feats, lengths)
        b, _ = compressed.encode(feats, lengths)
        ga, _ = model.predict(torch.tensor([[28, 3, 4]]), model.initial_state(1))
        gb, _ = compressed.predict(torch.tensor([[28, 3, 4]]), compressed.initial_state(1))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ga, gb, atol=1e-5)
    assert model.encoder.pre_rnn.layers[0].__class__.__name__ == "LSTMLayer"  # the input model is untouched


def test_threshold_compression_reduces_parameters_and_flops_and_round_trips(tmp_path):
    model = tiny()
    choices = choose_ranks(model, ["encoder"], threshold=0.2, mode="stacked")
    compressed = svd_compress(model, choices)
    before = sum(p.numel() for p in model.encoder.parameters())
    after = sum(p.numel() for p in compressed.encoder.parameters())
    predicted = sum(c.params + c.rows for c in choices)  # + one bias per side
    assert after == predicted < before
    assert compressed.flops()["encoder"] < model.flops()["encoder"]
    save_model(compressed, tmp_path)
    loaded, info = load_model(tmp_path)
    assert set(info.structure) == {name for name, _ in named_lstm_layers(compressed) if name.startswith("encoder")}
    feats = torch.randn(1, 12, 240)
    with torch.no_grad():
        assert torch.equal(loaded.encode(feats, torch.tensor([12]))[0], compressed.encode(feats, torch.tensor([12]))[0])


def test_rollout_factorises_each_gate():
    model = tiny()
    choices = choose_ranks(model, ["encoder"], rank=3, mode="rollout")
    compressed = svd_compress(model, choices)
    side = compressed.encoder.post_rnn.layers[1].hh
    assert isinstance(side, LowRankLinear) and side.groups == 4 and side.rank == 3
    assert side.up.shape == (4, 24, 3) and side.down.shape == (12, 24)


def test_no_saving_keeps_a_side_dense():
    model = tiny()
    choices = choose_ranks(model, ["encoder"], rank=23)  # 96x24 at rank 23 would not save; 96x240 would
    assert all((c.rank is None and "no saving" in c.reason) == (c.cols == 24) for c in choices)
    assert svd_compress(model, choices).encoder.post_rnn.layers[1].__class__.__name__ == "LSTMLayer"


def test_budgeted_ranks_meet_the_target_and_spend_it_where_the_error_is():
    from asrshrink.methods.svd import allocate_ranks, budget_ranks, error_curve

    model = tiny()
    ranks = budget_ranks(model, ["encoder"], mode="stacked", compression_ratio=3.0)
    compressed = svd_compress(model, choose_ranks(model, ["encoder"], ranks=ranks))
    before = sum(p.numel() for p in model.encoder.parameters())
    assert before / sum(p.numel() for p in compressed.encoder.parameters()) >= 3.0
    # A matrix of rank 2 needs no more than rank 2; a full-rank one of the same size gets the rest.
    torch.manual_seed(0)
    low = torch.randn(64, 2) @ torch.randn(2, 48)
    full = torch.randn(64, 48)
    curves = {("a", "linear"): error_curve(low), ("b", "linear"): error_curve(full)}
    shapes = {("a", "linear"): (64, 48, 1), ("b", "linear"): (64, 48, 1)}
    chosen = allocate_ranks(curves, shapes, budget=20 * (64 + 48))
    assert chosen[("a", "linear")] == 2 and chosen[("b", "linear")] == 18
    assert float(error_curve(low)[2]) < 1e-12 and float(error_curve(full)[0]) == 1.0

"""LSTM layers with a projection (``svd --structure projection``): the layer's semantics, the pure factorisation,
the converted model at full and lower rank, data-aware against plain, budgets, save/load and errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asrshrink.calibrate.stats import cholesky_scale
from asrshrink.calibrate.walk import valid_rows
from asrshrink.config import SvdConfig
from asrshrink.errors import AsrshrinkError, CheckpointError
from asrshrink.methods.projection import (data_aware_project, plan_projection, project_model, projection_factors,
                                          stacked_readers)
from asrshrink.methods.registry import Context, get_method
from asrshrink.methods.svd import SideChoice
from asrshrink.models.checkpoint import load_model, save_model
from asrshrink.models.layers import ProjectedInputLinear, ProjectedLSTMLayer
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig

TINY = MlperfRnntConfig(encoder_hidden=24, encoder_pre_layers=2, encoder_post_layers=2, pred_hidden=12,
                        pred_layers=2, joint_hidden=16, dropout=0.0)
LAYERS = [f"encoder.pre_rnn.layers.{i}" for i in range(2)] + [f"encoder.post_rnn.layers.{i}" for i in range(2)] + [
    f"prediction.rnn.layers.{i}" for i in range(2)]


def tiny(seed=0):
    torch.manual_seed(seed)
    return MlperfRnnt(TINY).eval()


def batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"features": torch.randn(3, 30, 240, generator=g), "feature_lengths": torch.tensor([30, 25, 17]),
             "labels": torch.randint(0, 28, (3, 6), generator=g), "label_lengths": torch.tensor([6, 4, 3])}
            for _ in range(n)]


def forced(model, ranks):
    """Choices projecting each named layer at the given rank, saving or not."""
    return [SideChoice(layer, "projection", stacked_readers(model, layer)[0].shape[0], 24, 1, r, "forced")
            for layer, r in ranks.items()]


def outputs(model, batch):
    with torch.no_grad():
        return model(batch["features"], batch["feature_lengths"], batch["labels"])[0]


def relative_error(a, b):
    return float((a - b).double().square().sum() / b.double().square().sum())


@settings(max_examples=25, deadline=None)
@given(inputs=st.integers(1, 9), hidden=st.integers(2, 9), data=st.data(), steps=st.integers(1, 6),
       batch=st.integers(1, 3))
def test_projected_layer_computes_the_lstmp_cell(inputs, hidden, data, steps, batch):
    """i, f, g, o = W_ih x + b_ih + W_hh m + b_hh; c = f c + i g; m = W_hr (o tanh c): nn.LSTM(proj_size)."""
    proj = data.draw(st.integers(1, hidden - 1))
    torch.manual_seed(inputs * 100 + hidden * 10 + proj)
    w_ih, w_hh, w_hr = torch.randn(4 * hidden, inputs), torch.randn(4 * hidden, proj), torch.randn(proj, hidden)
    b_ih, b_hh = torch.randn(4 * hidden), torch.randn(4 * hidden)
    layer = ProjectedLSTMLayer.from_weights(w_ih, w_hh, b_ih, b_hh, w_hr)
    assert isinstance(layer.lstm, torch.nn.LSTM) and layer.lstm.proj_size == proj and layer.output_size == proj
    x = torch.randn(steps, batch, inputs)
    m, c = torch.randn(1, batch, proj), torch.randn(1, batch, hidden)
    with torch.no_grad():
        y, (m_out, c_out) = layer(x, (m, c))
    m_t, c_t = m[0], c[0]
    for t in range(steps):
        i, f, g, o = (x[t] @ w_ih.T + b_ih + m_t @ w_hh.T + b_hh).chunk(4, -1)
        c_t = torch.sigmoid(f) * c_t + torch.sigmoid(i) * torch.tanh(g)
        m_t = (torch.sigmoid(o) * torch.tanh(c_t)) @ w_hr.T
        assert torch.allclose(y[t], m_t, atol=1e-5)
    assert torch.allclose(m_out[0], m_t, atol=1e-5) and torch.allclose(c_out[0], c_t, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 20), cols=st.integers(2, 10), data=st.data())
def test_projection_factors_are_the_truncated_svd(rows, cols, data):
    rank = data.draw(st.integers(1, min(rows, cols)))
    torch.manual_seed(rows * 31 + cols)
    stacked = torch.randn(rows, cols, dtype=torch.float64)
    p, a = projection_factors(stacked, rank)
    assert p.shape == (rank, cols) and a.shape == (rows, rank)
    assert torch.allclose(p @ p.T, torch.eye(rank, dtype=torch.float64), atol=1e-9)   # P = V_r^T
    s = torch.linalg.svdvals(stacked)
    assert float(torch.linalg.matrix_norm(stacked - a @ p)) == pytest.approx(float(s[rank:].square().sum().sqrt()),
                                                                            abs=1e-9)
    if rank == min(rows, cols):
        assert torch.allclose(a @ p, stacked, atol=1e-9)


def test_data_aware_factors_lower_the_error_on_their_inputs_and_are_exact_at_full_rank():
    torch.manual_seed(0)
    h = torch.randn(3000, 12) @ torch.diag(torch.logspace(0, -2, 12)) @ torch.randn(12, 12)
    stacked = torch.randn(60, 12)
    scale = cholesky_scale(h.T @ h / len(h))

    def error(p, a):
        return float(((h @ (a @ p - stacked).T) ** 2).mean())

    assert error(*projection_factors(stacked, 3, scale=scale)) < 0.8 * error(*projection_factors(stacked, 3))
    p, a = projection_factors(stacked, 12, scale=scale)
    assert torch.allclose(a @ p, stacked, atol=1e-4)


def rank_deficient(seed=0):
    """A tiny model whose every hidden state is read through matrices of rank H - 1 (each layer's W_hh and
    readers right-multiplied by I - v v^T), so rank H - 1 is the full rank of its stacked readers (nn.LSTM
    requires proj_size < H)."""
    model = tiny(seed)
    with torch.no_grad():
        for layer in LAYERS:
            module = model.get_submodule(layer)
            v = torch.randn(module.hidden_size)
            k = torch.eye(module.hidden_size) - torch.outer(v, v) / v.dot(v)
            module.lstm.weight_hh_l0.copy_(module.lstm.weight_hh_l0 @ k)
            for name, blocks in model.projection_readers(layer):
                reader = model.get_submodule(name)
                weight = reader.lstm.weight_ih_l0 if hasattr(reader, "lstm") else reader.weight
                weight.copy_(torch.cat([block @ k for block in weight.chunk(blocks, 1)], 1))
    return model


def test_full_rank_projection_computes_the_same_function():
    model = rank_deficient()
    projected = project_model(model, forced(model, {layer: 23 if "encoder" in layer else 11 for layer in LAYERS}))
    assert all(isinstance(projected.get_submodule(layer), ProjectedLSTMLayer) for layer in LAYERS)
    assert isinstance(projected.joint_net.encoder_proj, ProjectedInputLinear)
    for batch in batches():
        assert torch.allclose(outputs(projected, batch), outputs(model, batch), atol=1e-5)
    # The decoding state keeps its (L, B, P) shape: step by step as in greedy decoding.
    state = model.initial_state(2)
    labels = torch.tensor([[28, 3], [5, 28]])
    with torch.no_grad():
        for u in range(2):
            a, state_a = model.predict(labels[:, u:u + 1], state if u == 0 else state_a)
            b, state_b = projected.predict(labels[:, u:u + 1], state if u == 0 else state_b)
            assert b.shape[-1] == 11  # the projected output m_t, read by the joint's prediction Linear
            assert torch.allclose(model.joint_prediction(a), projected.joint_prediction(b), atol=1e-5)
            assert state_b[0].shape == state_a[0].shape
    assert type(model.encoder.pre_rnn.layers[0]).__name__ == "LSTMLayer"  # the input model is untouched


def test_output_error_falls_as_the_rank_grows_and_parameters_and_flops_follow():
    model = tiny()
    batch = batches(1)[0]
    reference = outputs(model, batch)
    errors, sizes, flops = [], [], []
    for rank in (2, 6, 12, 18):
        projected = project_model(model, forced(model, {layer: rank for layer in LAYERS[:4]}))
        errors.append(relative_error(outputs(projected, batch), reference))
        sizes.append(sum(p.numel() for p in projected.parameters()))
        flops.append(projected.flops()["encoder"])
        layer = projected.encoder.pre_rnn.layers[1]
        assert layer.lstm.weight_hr_l0.shape == (rank, 24) and layer.lstm.weight_hh_l0.shape == (96, rank)
        assert projected.encoder.post_rnn.layers[0].input_size == 2 * rank  # the stacked frames, each projected
        assert projected.joint_net.encoder_proj.in_features == rank
    assert errors == sorted(errors, reverse=True) and errors[0] > 10 * errors[-1] > 0
    assert sizes == sorted(sizes) and flops == sorted(flops)
    full = sum(p.numel() for p in model.parameters())
    # rank 2: each layer loses 4H (H - r) recurrent + (H - r) per reader row block, gains r H of projection
    expected = full
    for layer in LAYERS[:4]:
        rows = stacked_readers(model, layer)[0].shape[0]
        expected -= rows * 24 - 2 * (rows + 24)
    assert sizes[0] == expected


def test_the_plan_uses_the_threshold_of_the_hidden_size_and_skips_where_nothing_saves():
    model = tiny()
    choices, _ = plan_projection(SvdConfig(threshold=0.25, structure="projection", components=("encoder",
                                                                                              "prediction")),
                                 Context(model))
    by_layer = {c.layer: c for c in choices}
    assert by_layer["encoder.pre_rnn.layers.0"].rank == 6 and by_layer["encoder.pre_rnn.layers.0"].rows == 96 + 96
    assert by_layer["encoder.pre_rnn.layers.1"].rows == 96 + 2 * 96  # W_hh and the two stacked blocks
    assert by_layer["encoder.post_rnn.layers.1"].rows == 96 + 16     # W_hh and the joint's encoder Linear
    assert by_layer["prediction.rnn.layers.0"].rank == 3
    high, _ = plan_projection(SvdConfig(threshold=0.95, structure="projection"), Context(model))
    assert all(c.rank is None and "no saving" in c.reason for c in high)


def test_data_aware_projection_beats_plain_on_the_calibration_objective():
    model, data = tiny(), batches(3)
    choices = forced(model, {"encoder.pre_rnn.layers.0": 4, "encoder.pre_rnn.layers.1": 4})
    plain = project_model(model, choices)
    aware = data_aware_project(model, choices, data, model.weight_targets(["encoder"]))
    # The first layer's objective: its readers' output error on its hidden states, E||M h - A P h||^2.
    with torch.no_grad():
        hidden = torch.cat([valid_rows(model.encoder.pre_rnn.layers[0](b["features"].transpose(0, 1))[0],
                                       b["feature_lengths"]) for b in data])
    stacked = stacked_readers(model, "encoder.pre_rnn.layers.0")[0]

    def objective(projected):
        layer = projected.encoder.pre_rnn.layers[0].lstm
        next_ih = projected.encoder.pre_rnn.layers[1].lstm.weight_ih_l0
        rebuilt = torch.cat([layer.weight_hh_l0, next_ih]) @ layer.weight_hr_l0
        return float(((hidden @ (rebuilt - stacked).T) ** 2).sum())

    # Data-aware reaches the optimum of that objective over all rank-4 projections, N sum_{i>4} s_i(M S)^2 ...
    gram = (hidden.T.double() @ hidden.double())
    tail = torch.linalg.svdvals(stacked.double() @ torch.linalg.cholesky(gram))[4:].square().sum()
    assert objective(aware) == pytest.approx(float(tail), rel=1e-3)
    assert objective(aware) < 0.95 * objective(plain)  # ... which plain SVD misses
    error = {name: sum(relative_error(outputs(m, b), outputs(model, b)) for b in data)
             for name, m in (("plain", plain), ("aware", aware))}
    assert error["aware"] < error["plain"]


@pytest.mark.parametrize("data_aware", [False, True])
def test_budget_meets_the_target_through_the_registered_method(data_aware):
    model = tiny()
    full = sum(p.numel() for p in model.parameters())
    config = SvdConfig(target_params=full - 8000, structure="projection", data_aware=data_aware,
                       components=("encoder", "prediction"))
    config.check()
    outcome = get_method("svd").core(config, Context(model, batches(2) if data_aware else []))
    after = sum(p.numel() for p in outcome.model.parameters())
    assert full - 9000 < after <= full - 8000
    assert {row["side"] for row in outcome.layers} == {"projection"}


def test_save_and_load_rebuild_the_projection_exactly(tmp_path):
    model = tiny()
    projected = project_model(model, forced(model, {"encoder.pre_rnn.layers.1": 5, "encoder.post_rnn.layers.1": 7,
                                                    "prediction.rnn.layers.1": 4}))
    save_model(projected, tmp_path)
    loaded, info = load_model(tmp_path)
    assert info.structure["encoder.pre_rnn.layers.1"] == {"type": "projected_lstm", "input_size": 24,
                                                          "hidden_size": 24, "proj_size": 5}
    assert info.structure["encoder.post_rnn.layers.0"]["input_size"] == 10
    assert info.structure["joint_net.encoder_proj"]["in"] == 7
    assert loaded.state_dict().keys() == projected.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), projected.state_dict().values()))
    for batch in batches(1):
        assert torch.equal(outputs(loaded, batch), outputs(projected, batch))
    save_model(loaded, tmp_path / "again")
    assert load_model(tmp_path / "again")[1].structure == info.structure


def test_a_structure_whose_sizes_do_not_chain_is_refused():
    """The last encoder layer projected to 7 without the joint Linear that reads it (an edited file)."""
    structure = {"encoder.post_rnn.layers.1": {"type": "projected_lstm", "input_size": 24, "hidden_size": 24,
                                               "proj_size": 7}}
    with pytest.raises(CheckpointError, match="joint_net.encoder_proj takes 24 inputs where it is given 7"):
        MlperfRnnt(TINY).apply_structure(structure)
    structure["joint_net.encoder_proj"] = {"type": "projected_input_linear", "in": 7, "out": 16, "bias": True}
    MlperfRnnt(TINY).apply_structure(structure)


def test_projection_is_refused_where_it_cannot_apply():
    with pytest.raises(AsrshrinkError, match="--mode rollout"):
        SvdConfig(structure="projection", mode="rollout").check()
    with pytest.raises(AsrshrinkError, match="--structure must be one of factors, projection"):
        SvdConfig(structure="lstmp").check()
    with pytest.raises(AsrshrinkError, match="--structure projection converts LSTM layers"):
        plan_projection(SvdConfig(structure="projection", components=("joint",)), Context(tiny()))


def test_conformer_family_is_refused_with_the_option_named():
    from asrshrink.models.nemo_conformer import NemoConformerConfig, NemoConformerTransducer

    torch.manual_seed(0)
    conformer = NemoConformerTransducer(NemoConformerConfig(
        d_model=32, n_layers=1, n_heads=2, subsampling_conv_channels=8, conv_kernel_size=5, pred_hidden=16,
        joint_hidden=16, vocabulary={"labels": ["a", "b", " "], "blank": 3}, dropout=0.0, dropout_pre_encoder=0.0,
        dropout_att=0.0)).eval()
    for components in (("encoder",), ("prediction",)):
        with pytest.raises(AsrshrinkError, match="--structure projection"):
            get_method("svd").core(SvdConfig(structure="projection", components=components), Context(conformer))

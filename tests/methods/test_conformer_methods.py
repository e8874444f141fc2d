"""Every method on a Conformer transducer: weight targets in forward order, the walk's true-sequential
statistics, data-aware SVD, PSVD on factorised Linears, SparseGPT / Wanda and N:M patterns, resuming."""

import pytest
import torch

from asrshrink import compress
from asrshrink.calibrate.stats import cholesky_scale
from asrshrink.config import CalibConfig, PruneConfig, PsvdConfig, PsvdRunConfig, SvdConfig
from asrshrink.errors import AsrshrinkError
from asrshrink.methods.prune import nm_mask, prune_model
from asrshrink.methods.psvd import psvd, refit_targets
from asrshrink.methods.svd import choose_ranks, data_aware_svd_compress, svd_compress, svd_factors
from asrshrink.models.checkpoint import load_model, save_model
from asrshrink.models.layers import LowRankLinear, matrices
from asrshrink.models.nemo_conformer import NemoConformerConfig, NemoConformerTransducer
from asrshrink.models.targets import select_targets

VOCAB = {"labels": ["a", "b", "c", " "], "blank": 4}
FF_ATT = ("encoder.layers.*.feed_forward*", "encoder.layers.*.self_attn.*")


def tiny(seed=0):
    torch.manual_seed(seed)
    return NemoConformerTransducer(NemoConformerConfig(
        d_model=32, n_layers=2, n_heads=2, subsampling_conv_channels=8, conv_kernel_size=5, pred_hidden=16,
        joint_hidden=16, vocabulary=VOCAB, dropout=0.0, dropout_pre_encoder=0.0, dropout_att=0.0)).eval()


def batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"features": torch.randn(4, 64, 80, generator=g),
             "feature_lengths": torch.tensor([64, 57, 49, 40]),
             "labels": torch.randint(0, 4, (4, 5), generator=g),
             "label_lengths": torch.tensor([5, 4, 3, 2])} for _ in range(n)]


def encoder_error(original, compressed, data):
    error = energy = 0.0
    with torch.no_grad():
        for b in data:
            ref, lengths = original.encode(b["features"], b["feature_lengths"])
            out, _ = compressed.encode(b["features"], b["feature_lengths"])
            mask = torch.arange(ref.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
            error += float((out - ref)[mask].double().square().sum())
            energy += float(ref[mask].double().square().sum())
    return error / energy


def test_targets_are_in_forward_order_with_shared_input_groups():
    model = tiny()
    targets = [t for t in model.weight_targets(["encoder"]) if t.layer.startswith("encoder.layers.0.")]
    names = [t.layer.removeprefix("encoder.layers.0.") for t in targets]
    assert names == ["feed_forward1.linear1", "feed_forward1.linear2", "self_attn.linear_q", "self_attn.linear_k",
                     "self_attn.linear_v", "self_attn.linear_pos", "self_attn.linear_out", "conv.pointwise_conv1",
                     "conv.pointwise_conv2", "feed_forward2.linear1", "feed_forward2.linear2"]
    groups = [[t.layer.rsplit(".", 1)[-1] for t in g] for g in model.input_groups(targets)]
    assert groups[2] == ["linear_q", "linear_k", "linear_v"] and len(groups) == 9
    assert {t.layout for t in targets if t.layer.endswith("linear_pos")} == {"relative"}


def test_target_patterns_select_and_refuse_what_matches_nothing():
    model = tiny()
    chosen = select_targets(model.weight_targets(["encoder"]), FF_ATT, ("*.linear_pos",))
    assert chosen and all(".feed_forward" in t.layer or ".self_attn." in t.layer for t in chosen)
    assert not any(t.layer.endswith("linear_pos") for t in chosen)
    with pytest.raises(AsrshrinkError, match="--targets 'encoder.layer.*'"):
        select_targets(model.weight_targets(["encoder"]), ("encoder.layer.*",))


def test_data_aware_statistics_come_from_the_already_compressed_matrices_before():
    # feed_forward1.linear2 reads silu(linear1(x)); with linear1 compressed first, its truncation must be the
    # SVD of W S for the second moment of *those* inputs (true sequential), recomputed here from the result.
    model, data = tiny(), batches()
    targets = select_targets(model.weight_targets(["encoder"]), ("encoder.layers.0.feed_forward1.*",))
    choices = choose_ranks(model, ["encoder"], rank=6, targets=targets)
    result = data_aware_svd_compress(model, choices, data, targets)
    inputs = []
    linear2 = result.get_submodule("encoder.layers.0.feed_forward1.linear2")
    handle = linear2.register_forward_hook(lambda m, args, out: inputs.append(args[0]))
    lengths = []
    with torch.no_grad():
        for b in data:
            lengths.append(result.encode(b["features"], b["feature_lengths"])[1])
    handle.remove()
    rows = torch.cat([x[torch.arange(x.shape[1]).unsqueeze(0) < n.unsqueeze(1)] for x, n in zip(inputs, lengths)])
    scale = cholesky_scale((rows.double().T @ rows.double()) / rows.shape[0])
    original = matrices(model.get_submodule("encoder.layers.0.feed_forward1.linear2"))["linear"]
    up, down = svd_factors(original.weight, 6, scale=scale)
    assert isinstance(linear2, LowRankLinear)
    assert torch.allclose(linear2.up @ linear2.down, up @ down, atol=1e-4)
    # and the walk did not use the original model's inputs: those give another truncation
    original_inputs = []
    handle = model.get_submodule("encoder.layers.0.feed_forward1.linear2").register_forward_hook(
        lambda m, args, out: original_inputs.append(args[0]))
    with torch.no_grad():
        for b in data:
            model.encode(b["features"], b["feature_lengths"])
    handle.remove()
    rows_o = torch.cat([x[torch.arange(x.shape[1]).unsqueeze(0) < n.unsqueeze(1)]
                        for x, n in zip(original_inputs, lengths)])
    up_o, down_o = svd_factors(original.weight, 6, scale=cholesky_scale((rows_o.double().T @ rows_o.double())
                                                                       / rows_o.shape[0]))
    assert not torch.allclose(linear2.up @ linear2.down, up_o @ down_o, atol=1e-4)


def test_data_aware_svd_has_the_lower_output_error_on_the_first_matrix():
    model, data = tiny(), batches()
    targets = select_targets(model.weight_targets(["encoder"]), ("encoder.layers.0.feed_forward1.linear1",))
    choices = choose_ranks(model, ["encoder"], rank=4, targets=targets)
    plain, aware = svd_compress(model, choices), data_aware_svd_compress(model, choices, data, targets)
    assert encoder_error(model, aware, data) < encoder_error(model, plain, data)


def test_psvd_refits_factorised_linears_and_lowers_the_encoder_error():
    model, data = tiny(), batches()
    targets = select_targets(model.weight_targets(["encoder"]), FF_ATT)
    compressed = svd_compress(model, choose_ranks(model, ["encoder"], threshold=0.25, targets=targets))
    before = encoder_error(model, compressed, data)
    refit = refit_targets(compressed, ("encoder",))
    assert {t.layer for t in refit} == {t.layer for t in targets}
    reports = psvd(model, compressed, data, PsvdConfig(iterations=2), targets=refit)
    assert len(reports) == 2 * len(refit)
    assert all(r.error_after <= r.error_before + 1e-12 for r in reports)
    assert sum(r.step > 0 for r in reports) > len(reports) // 2
    assert encoder_error(model, compressed, data) < 0.8 * before


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_calibrated_pruning_reaches_every_conformer_matrix(method):
    model, data = tiny(), batches()
    pruned, rows = prune_model(model, PruneConfig(sparsity=0.5, method=method, components=("encoder",)), data)
    walked = [r for r in rows if r.layer.startswith("encoder.layers.")]
    assert walked and all(r.status == f"pruned ({method})" and abs(r.sparsity - 0.5) < 0.01 for r in walked)
    if method == "sparsegpt":  # OBS updates beat dropping the smallest weights on the same inputs
        assert sum(r.error for r in walked) < sum(r.error_magnitude for r in walked)


def test_nm_mask_keeps_n_of_every_m():
    scores = torch.randn(7, 13)
    mask = nm_mask(scores, 2, 4)
    kept = (~mask).int()
    assert all(int(kept[:, i:i + 4].sum(1).max()) <= 2 for i in range(0, 13, 4))
    assert int(kept[:, :12].sum()) == 7 * 6 and int(kept[:, 12:].sum()) == 7  # the short last run keeps its 1
    # the kept ones are the largest of each run
    run = scores[:, :4]
    assert torch.equal(~mask[:, :4], run >= run.topk(2, dim=1).values[:, 1:])


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_two_four_pattern_on_a_conformer(method):
    model, data = tiny(), batches()
    config = PruneConfig(sparsity=0.5, method=method, components=("encoder",), pattern="2:4")
    pruned, rows = prune_model(model, config, data if method != "magnitude" else None)
    for r in rows:
        if r.target_sparsity is None:
            continue
        weight = matrices(pruned.get_submodule(r.layer))[r.side].weight
        groups = (weight != 0).reshape(weight.shape[0], -1, 4) if weight.shape[1] % 4 == 0 else None
        if groups is not None:
            assert int(groups.sum(-1).max()) <= 2 and abs(r.sparsity - 0.5) < 1e-9


def test_pattern_options_are_checked():
    with pytest.raises(AsrshrinkError, match="--sparsity 0.5"):
        PruneConfig(sparsity=0.7, pattern="2:4").check()
    with pytest.raises(AsrshrinkError, match="N:M"):
        PruneConfig(sparsity=0.5, pattern="4:2").check()


def test_conformer_psvd_resumes_to_the_same_model(tmp_path, tiny_data):
    source = save_model(tiny(), tmp_path / "tiny")
    config = PsvdRunConfig(SvdConfig(threshold=0.3, targets=FF_ATT), PsvdConfig(iterations=2))
    kwargs = dict(model=str(source), calib=CalibConfig(path=str(tiny_data)))
    compress.run_method("psvd", config, out=tmp_path / "straight", **kwargs)
    lines = []

    def stop_later(line):
        lines.append(line)
        if sum(x.startswith("iteration") for x in lines) == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress.run_method("psvd", config, out=tmp_path / "resumed", log=stop_later, **kwargs)
    compress.resume(tmp_path / "resumed")
    a, _ = load_model(tmp_path / "straight" / "model.safetensors")
    b, _ = load_model(tmp_path / "resumed" / "model.safetensors")
    assert a.state_dict().keys() == b.state_dict().keys()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name

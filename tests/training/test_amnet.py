"""AmNet: branches from the trained weights, the compute and latency models, hard switching against the soft
argmax path, the saved model, exact resume, and the command."""

import json

import pytest
import torch
from typer.testing import CliRunner

from asrshrink import compress
from asrshrink.cli.main import app
from asrshrink.compress import EvalConfig
from asrshrink.config import AmnetConfig
from asrshrink.errors import AsrshrinkError, CheckpointError
from asrshrink.evaluate.amnet import amortized_latency, average_cost, backlog, backlog_levels, frame_costs
from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.methods.svd import svd_factors
from asrshrink.models.branched import BranchedLSTMLayer
from asrshrink.models.checkpoint import load_model, save_model
from asrshrink.models.layers import lstm_side_weights
from asrshrink.training.amnet import build_amnet, mf_rank, nested_masks, temperature_at
from tests.helpers import assert_interrupted_run_resumes
from tests.methods.test_psvd import tiny

runner = CliRunner()


def features(seed=3, lengths=(41, 30, 17)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(lengths), max(lengths), 240, generator=g), torch.tensor(lengths)


def amnet(kind="mf", seed=0, **changes):
    """A tiny AmNet whose arbitrator picks both branches on ``features()`` (a fresh arbitrator picks one: its
    projection is scaled up and centred on the median logit difference)."""
    from asrshrink.models.layers import stack_time

    model = build_amnet(tiny(seed), AmnetConfig(data="x", branches=kind, sparse_schedule="magnitude",
                                                arbitrator_hidden=8, arbitrator_feedback=False, **changes)).eval()
    with torch.no_grad():
        arb = model.arbitrator
        arb.proj.weight.mul_(40.0)
        f, lengths = features()
        _, log_pi = arb(stack_time(f.transpose(0, 1), lengths, 2)[0])
        arb.proj.bias[0] -= float((log_pi[..., 0] - log_pi[..., 1]).median())
    return model


# --- branches -------------------------------------------------------------------------------------------------

def test_mf_branches_share_one_svd_and_the_fast_branch_is_its_leading_rank():
    source = tiny()
    model = build_amnet(source, AmnetConfig(data="x", branches="mf", arbitrator_hidden=8))
    for name in model.branch_layer_rates():
        layer, original = model.get_submodule(name), source.get_submodule(name)
        assert isinstance(layer, BranchedLSTMLayer)
        for side, (w, _) in lstm_side_weights(original).items():
            slow, fast = layer.ranks[side]
            assert slow == mf_rank(*w.shape, 0.35) and fast == mf_rank(*w.shape, 0.60) and fast < slow
            for branch, rank in ((0, slow), (1, fast)):
                up, down = svd_factors(w, rank)
                assert torch.allclose(layer.weight(side, branch), up[0] @ down, atol=1e-5)
    # weights are shared: the AmNet's encoder holds the slow branch's factors only (plus the arbitrator)
    params = sum(p.numel() for n, p in model.encoder.named_parameters() if not n.startswith("arbitrator."))
    slow_only = sum(layer.ranks[s][0] * (layer.ih_down.shape[1] if s == "ih" else layer.hidden_size)
                    + layer.ranks[s][0] * 4 * layer.hidden_size + 4 * layer.hidden_size
                    for layer in model.encoder.modules() if isinstance(layer, BranchedLSTMLayer) for s in ("ih", "hh"))
    assert params == slow_only
    slow_flops, fast_flops = model.branch_flops()
    assert fast_flops < slow_flops < source.flops()["encoder"]


def test_sparse_masks_are_nested_at_their_sparsities():
    w = torch.randn(64, 20, generator=torch.Generator().manual_seed(0))
    masks = nested_masks(w, [0.15, 0.8])
    assert masks.shape == (2, 64, 20)
    assert abs(1 - float(masks[0].mean()) - 0.15) < 0.01 and abs(1 - float(masks[1].mean()) - 0.8) < 0.01
    assert bool((masks[1] <= masks[0]).all())
    kept = w.abs()[masks[1] == 1].min()
    assert bool((w.abs()[masks[1] == 0] <= kept).all())  # the fast branch keeps the largest magnitudes
    model = amnet("sparse")
    layer = model.encoder.pre_rnn.layers[0]
    assert layer.flops_per_step(1) < layer.flops_per_step(0)


# --- compute and latency models -------------------------------------------------------------------------------

def test_backlog_follows_the_recursion_and_separates_equal_averages():
    budget = 10.0
    fast_first = torch.tensor([[5.0, 5.0, 20.0, 20.0]])   # the paper's Fig. 2 (a): waits, then falls behind
    slow_first = torch.tensor([[20.0, 20.0, 5.0, 5.0]])   # (b): the backlog drains while fast frames run
    lengths = torch.tensor([4])
    assert torch.equal(average_cost(fast_first, lengths), average_cost(slow_first, lengths))
    assert float(backlog(fast_first, lengths, budget)) == 20.0
    assert float(backlog(slow_first, lengths, budget)) == 10.0
    assert backlog_levels(fast_first, lengths, budget).tolist() == [[0.0, 0.0, 10.0, 20.0]]
    assert backlog_levels(slow_first, lengths, budget).tolist() == [[10.0, 20.0, 15.0, 10.0]]
    # frames past an utterance's length do not count
    padded = torch.tensor([[20.0, 20.0, 5.0, 5.0, 99.0]])
    assert float(backlog(padded, lengths, budget)) == 10.0
    assert float(average_cost(padded, lengths)) == 12.5
    q = fast_first.clone().requires_grad_()
    amortized_latency(q, lengths, mu=100.0, rho=10.0).sum().backward()
    assert torch.allclose(q.grad, torch.tensor([[0.0, 0.0, 0.01, 0.01]]))   # only frames inside the backlog


def test_frame_costs_are_the_decision_weighted_branch_costs_plus_the_arbitrator():
    d = torch.tensor([[[1.0, 0.0], [0.25, 0.75]]])
    assert torch.allclose(frame_costs(d, [100, 20], 3), torch.tensor([[103.0, 43.0]]))


def test_temperature_anneals_linearly_from_the_first_gumbel_step():
    assert temperature_at(10, 10, 21, 1.0, 0.5) == 1.0
    assert temperature_at(15, 10, 21, 1.0, 0.5) == pytest.approx(0.75)
    assert temperature_at(20, 10, 21, 1.0, 0.5) == pytest.approx(0.5)


# --- hard switching -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mf", "sparse"])
def test_hard_switching_gives_the_soft_models_argmax_path(kind):
    model = amnet(kind)
    with torch.no_grad():
        model.joint_net.output.bias[model.vocabulary.blank] -= 1.5  # the tiny model must emit labels
    f, lengths = features()
    with torch.no_grad():
        soft, soft_lengths, soft_trace = model.encode_amortized(f, lengths, sampling="argmax")
        hard, hard_lengths, hard_trace = model.encode_amortized(f, lengths, sampling="hard")
    valid = torch.arange(soft_trace.decisions.shape[1]).unsqueeze(0) < soft_trace.lengths.unsqueeze(1)
    chosen = soft_trace.decisions.argmax(-1)[valid]
    assert 0.1 < float(chosen.float().mean()) < 0.9           # both branches are used
    assert torch.equal(soft_trace.decisions, hard_trace.decisions) and torch.equal(soft_lengths, hard_lengths)
    assert torch.allclose(soft, hard, atol=1e-5)
    tokens = greedy_decode(model, hard, hard_lengths)
    assert tokens == greedy_decode(model, soft, soft_lengths) and sum(map(len, tokens)) > 5
    # the branches differ: forcing every frame onto one branch changes the output
    forced = torch.zeros_like(soft_trace.decisions.transpose(0, 1))
    forced[..., 1] = 1
    layer = model.encoder.post_rnn.layers[0]
    x = torch.randn(7, 2, layer.input_size)
    assert not torch.allclose(layer(x, forced[:7, :2])[0], layer(x, 1 - forced[:7, :2])[0])
    # one utterance alone (a device streams one) gives the batch's decisions and output
    with torch.no_grad():
        alone, _, alone_trace = model.encode_amortized(f[2:, :17], lengths[2:], sampling="hard")
    n = int(hard_lengths[2])
    assert torch.equal(alone_trace.decisions[0, :n], hard_trace.decisions[2, :n])
    assert torch.allclose(alone[0, :n], hard[2, :n], atol=1e-5)


def test_eval_mode_encode_is_hard_switching():
    model = amnet()
    f, lengths = features()
    with torch.no_grad():
        enc, _ = model.encode(f, lengths)
        hard, _, _ = model.encode_amortized(f, lengths, sampling="hard")
    assert torch.equal(enc, hard)


# --- the saved model --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mf", "sparse"])
def test_a_saved_amnet_loads_back_and_decodes_the_same(kind, tmp_path):
    model = amnet(kind)
    path = save_model(model, tmp_path / "m")
    loaded, info = load_model(path)
    assert loaded.arbitrator is not None and "encoder.arbitrator" in info.structure
    f, lengths = features()
    with torch.no_grad():
        a, al = model.encode(f, lengths)
        b, bl = loaded.encode(f, lengths)
    assert torch.equal(a, b) and greedy_decode(model, a, al) == greedy_decode(loaded, b, bl)
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "AmNet branches (slow / fast)" in result.output and "arbitrator: LSTM 2 x 8" in result.output
    summary = json.loads(runner.invoke(app, ["info", str(path), "--json"]).output)
    slow, fast = summary["amnet"]["branch_flops_per_frame"]
    assert fast < slow and any(layer["name"] == "encoder.arbitrator" for layer in summary["encoder_layers"])
    # the compressing methods see no matrices in branched layers: they refuse an AmNet rather than skip them
    refused = runner.invoke(app, ["svd", str(path), "--rank-threshold", "0.5", "-o", str(tmp_path / "svd")])
    assert refused.exit_code == 2 and "an AmNet model" in refused.output and not (tmp_path / "svd").exists()


def _rewrite(path, out, edit_meta=None, edit_tensors=None):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["asrshrink"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(out), metadata={"asrshrink": json.dumps(meta)})
    return out


@pytest.mark.parametrize("damage, message", [
    (lambda m: m["structure"].pop("encoder.arbitrator"), "an AmNet needs one arbitrator"),
    (lambda m: m["structure"]["encoder.pre_rnn.layers.0"]["ranks"].update(ih=[3, 9]), "ih ranks [3, 9]"),
    (lambda m: m["structure"]["encoder.arbitrator"].update(input_size=12), "reads 12 inputs"),
    (lambda m: m["structure"]["encoder.post_rnn.layers.1"].update(kind="dense"), "kind 'dense'"),
])
def test_a_damaged_amnet_structure_is_refused_in_one_line(damage, message, tmp_path):
    path = save_model(amnet(), tmp_path / "m")
    bad = _rewrite(path, tmp_path / "bad.safetensors", edit_meta=damage)
    with pytest.raises(CheckpointError) as exc:
        load_model(bad)
    assert message in str(exc.value) and str(bad) in str(exc.value) and "\n" not in str(exc.value)
    assert "amnet-finetune" in str(exc.value)


def test_sparse_masks_that_are_not_nested_are_refused(tmp_path):
    path = save_model(amnet("sparse"), tmp_path / "m")

    def swap(tensors):
        key = "encoder.pre_rnn.layers.0.mask_ih"
        tensors[key] = tensors[key].flip(0).contiguous()

    bad = _rewrite(path, tmp_path / "bad.safetensors", edit_tensors=swap)
    with pytest.raises(CheckpointError, match="must be nested"):
        load_model(bad)


# --- the method -------------------------------------------------------------------------------------------------

def config(speech, **changes):
    base = dict(data=str(speech), steps=8, lr=3e-3, warmup=2, max_frames=2000, checkpoint_every=2,
                arbitrator_hidden=8, amr_steps=3)
    return AmnetConfig(**{**base, **changes})


def test_amnet_finetune_reports_branches_flops_latency_and_wall_time(speech, tmp_path):
    source = save_model(tiny(), tmp_path / "source")
    report = compress.run_method("amnet-finetune", config(speech), model=str(source), out=tmp_path / "a",
                                 evaluation=EvalConfig(path=str(speech)))
    fig = report["eval"]["figures"]
    assert sum(fig["branch_ratios"]) == pytest.approx(1.0)
    f = fig["flops_per_frame"]
    assert f["min"] <= f["mean"] <= f["max"] and f["utterance_p10"] <= f["utterance_p90"]
    assert fig["dense_latency_ms"]["mean"] > 0 and fig["wall_seconds"]["dense"] > 0
    rho = 1 / 0.060  # MLPerf features: 3 spliced 10 ms frames, then 2 stacked per encoder frame
    assert fig["rho"] == pytest.approx(rho) and fig["mu"] == pytest.approx(0.45 * tiny().flops()["encoder"] * rho)
    assert "branch ratios slow / fast" in (tmp_path / "a" / "report.md").read_text()
    model, _ = load_model(tmp_path / "a")
    assert model.arbitrator is not None
    result = runner.invoke(app, ["eval", str(tmp_path / "a"), "--data", str(speech), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["amnet"]["branch_ratios"] == fig["branch_ratios"]
    assert payload["amnet"]["latency_ms"]["mean"] == pytest.approx(fig["latency_ms"]["mean"])
    # the longest utterance's trace: one decision per frame, and the backlog recursion over their costs
    trace = fig["trace"]
    assert set(trace["branch"]) <= {0, 1} and len(trace["branch"]) == len(trace["backlog_ms"]) > 0
    level, levels = 0.0, []
    for b in trace["branch"]:
        level = max(level + fig["branch_flops"][b] + fig["arbitrator_flops"] - fig["mu"] / fig["rho"], 0.0)
        levels.append(1000 * level / fig["mu"])
    assert trace["backlog_ms"] == pytest.approx(levels, abs=2e-3)
    assert max(trace["dense_backlog_ms"]) > 0 and trace["dense_backlog_ms"][-1] >= trace["backlog_ms"][-1]


def test_the_amnet_trace_is_drawn_from_eval_and_from_the_report(speech, tmp_path):
    source = save_model(tiny(), tmp_path / "source")
    compress.run_method("amnet-finetune", config(speech, steps=4, checkpoint_every=4), model=str(source),
                        out=tmp_path / "a", evaluation=EvalConfig(path=str(speech), limit=3))
    png = b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, ["report", str(tmp_path / "a"), "--amnet-plot", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.png").read_bytes()[:8] == png
    result = runner.invoke(app, ["eval", str(tmp_path / "a"), "--data", str(speech), "--limit", "2", "--plot",
                                 str(tmp_path / "e.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "e.png").read_bytes()[:8] == png
    # not an AmNet, a report without a trace, a damaged trace: one-line errors, nothing written
    result = runner.invoke(app, ["eval", str(source), "--data", str(speech), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "not an AmNet" in result.output and not (tmp_path / "x.png").exists()
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    report["eval"]["figures"]["trace"]["backlog_ms"][0] = "x"
    (tmp_path / "a" / "report.json").write_text(json.dumps(report))
    result = runner.invoke(app, ["report", str(tmp_path / "a"), "--amnet-plot", str(tmp_path / "y.png")])
    assert result.exit_code != 0 and "malformed" in result.output and not (tmp_path / "y.png").exists()


def test_the_compute_loss_moves_frames_to_the_fast_branch(speech, tmp_path):
    source = save_model(tiny(), tmp_path / "source")
    lines = []
    compress.run_method("amnet-finetune", config(speech, steps=40, loss="avg", compute_weight=20.0, lr=1e-2,
                                                 checkpoint_every=40, spec_augment=False),
                        model=str(source), out=tmp_path / "a", log=lines.append)
    fast = [float(line.split(" fast ")[1].split()[0]) for line in lines if line.startswith("step ")]
    assert len(fast) == 4 and fast[-1] > fast[0] + 0.2 and fast[-1] > 0.8


def test_gradual_sparse_branches_reach_their_sparsities(speech, tmp_path):
    source = save_model(tiny(), tmp_path / "source")
    compress.run_method("amnet-finetune", config(speech, branches="sparse", prune_until=4, prune_every=2),
                        model=str(source), out=tmp_path / "s")
    model, _ = load_model(tmp_path / "s")
    layer = model.encoder.post_rnn.layers[0]
    numel = layer.weight_hh.numel()
    assert abs(1 - layer.nonzeros("hh", 0) / numel - 0.15) < 0.01
    assert abs(1 - layer.nonzeros("hh", 1) / numel - 0.80) < 0.01


def test_interrupted_amnet_finetune_resumes_to_identical_parameters(speech, tmp_path, monkeypatch):
    source = save_model(tiny(), tmp_path / "source")
    cfg = config(speech, branches="sparse", prune_until=4, prune_every=2, random_steps=4, entropy_threshold=2.0)
    import asrshrink.training.amnet as amnet_module

    assert_interrupted_run_resumes("amnet-finetune", amnet_module, cfg, source, tmp_path, monkeypatch)


def test_options_are_checked_before_any_work(speech, tmp_path):
    for changes, message in ((dict(slow_compression=0.7, fast_compression=0.6), "--slow-compression"),
                             (dict(branches="sparse", data_aware=True), "--data-aware"),
                             (dict(entropy_threshold=2.0), "--random-steps"),
                             (dict(loss="max"), "--loss")):
        with pytest.raises(AsrshrinkError, match=message):
            config(speech, **changes).check()


def test_the_command_has_help_with_an_example():
    result = runner.invoke(app, ["amnet-finetune", "--help"])
    assert result.exit_code == 0 and "Example: asrshrink amnet-finetune" in result.output

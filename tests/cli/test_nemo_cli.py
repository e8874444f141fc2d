"""Commands on a NeMo ``.nemo`` archive: info (per-layer figures), dump, and the calibrated methods."""

import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from asrshrink.cli.main import app
from asrshrink.models.checkpoint import load_model

runner = CliRunner()


@pytest.fixture()
def nemo_model(nemo_fixture_dir):
    return str(nemo_fixture_dir / "conformer" / "model.nemo")


def test_info_gives_components_layers_and_flops(nemo_model):
    result = runner.invoke(app, ["info", nemo_model, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["family"] == "nemo-conformer-transducer" and info["params"] == 794_273
    names = [layer["name"] for layer in info["encoder_layers"]]
    assert names == ["encoder.pre_encode", "encoder.layers.0", "encoder.layers.1"]
    assert sum(layer["params"] for layer in info["encoder_layers"]) == info["params_by_component"]["encoder"]
    assert sum(layer["flops_per_frame"] for layer in info["encoder_layers"]) == info["flops"]["encoder_per_frame"]
    assert info["flops_frames"] == 250 and info["encoder_frame_seconds"] == pytest.approx(0.04)
    assert info["vocabulary"]["kind"] == "sentencepiece"
    text = runner.invoke(app, ["info", nemo_model])
    assert text.exit_code == 0 and "encoder.layers.1" in text.stdout and "250 encoder frames" in text.stdout


def test_dump_writes_nemo_features_encoder_and_tokens(nemo_model, nemo_fixture_dir, tmp_path):
    ref = np.load(nemo_fixture_dir / "conformer" / "outputs.npz")
    wav = tmp_path / "u1.wav"
    sf.write(wav, ref["waveform"][1, :ref["waveform_len"][1]], 16000, subtype="FLOAT")
    result = runner.invoke(app, ["dump", nemo_model, str(wav), "-o", str(tmp_path / "d.npz")])
    assert result.exit_code == 0, result.output
    out = np.load(tmp_path / "d.npz")
    assert out["u1.tokens"].tolist() == ref["single1_tokens"].tolist()
    assert np.abs(out["u1.encoder"] - ref["single1_encoder_out"][0].T).max() <= 1e-4
    assert np.abs(out["u1.features"] - ref["single1_features"][0, :, :91].T).max() <= 1e-4


@pytest.mark.parametrize("command, status", [
    (["psvd", "--rank-threshold", "0.3", "--iterations", "1"], "factorised"),
    (["svd", "--rank-threshold", "0.3", "--data-aware"], "factorised"),
    (["prune", "--sparsity", "0.5", "--method", "sparsegpt"], "pruned (sparsegpt)"),
])
def test_calibrated_methods_compress_the_conformer_layers(nemo_model, tiny_data, tmp_path, command, status):
    out = tmp_path / "out"
    result = runner.invoke(app, [command[0], nemo_model, *command[1:], "--calib", str(tiny_data), "-o", str(out),
                                 "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {(r["layer"], r["side"]): r for r in report["layers"]}
    for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
        assert rows[(f"encoder.layers.0.self_attn.{name}", "linear")]["status"] == status
    assert rows[("encoder.layers.0.conv.pointwise_conv1", "linear")]["status"] == status
    if command[0] == "psvd":
        refits = [r for r in report["post_training"] if r["layer"].startswith("encoder.layers.")]
        assert refits and all(r["error_after"] <= r["error_before"] for r in refits)
    model, _ = load_model(out / "model.safetensors")
    assert model.family == "nemo-conformer-transducer"
    shown = runner.invoke(app, ["report", str(out), "--markdown"])
    assert shown.exit_code == 0 and f"| {command[0]} |" in shown.output
    assert "encoder.layers.0.self_attn.linear_q" in (out / "report.md").read_text()
    params = report["after"]["params"]
    assert runner.invoke(app, ["gate", str(out), "--max-params", str(params)]).exit_code == 0
    assert runner.invoke(app, ["gate", str(out), "--max-params", str(params - 1)]).exit_code == 1

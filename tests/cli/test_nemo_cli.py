"""Commands on a NeMo ``.nemo`` archive: info (per-layer figures), dump, and the calibrated methods' refusal."""

import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from asrshrink.cli.main import app
from tests.helpers import assert_one_line_error

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


@pytest.mark.parametrize("command", [
    ["psvd", "--rank-threshold", "0.3"],
    ["svd", "--rank-threshold", "0.3", "--data-aware"],
    ["prune", "--sparsity", "0.5", "--method", "sparsegpt"],
])
def test_calibrated_methods_refuse_conformer_layers_instead_of_skipping_them(nemo_model, tiny_data, tmp_path,
                                                                              command):
    out = tmp_path / "out"
    result = runner.invoke(app, [command[0], nemo_model, *command[1:], "--calib", str(tiny_data), "-o", str(out)])
    assert_one_line_error(result, "calibrates LSTM layers", "encoder.layers.0")
    assert not out.exists()

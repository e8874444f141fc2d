"""``asrshrink svd --structure projection`` end to end: compress, info, report, gate, export, and refusals."""

import json

import pytest
from typer.testing import CliRunner

from asrshrink.cli.main import app
from tests.helpers import assert_one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def model_path(mlperf_fixture_dir):
    return str(mlperf_fixture_dir / "rnnt_random_small.pt")


@pytest.mark.parametrize("data_aware", [False, True])
def test_svd_projection_writes_a_projected_model_that_info_report_gate_and_export_read(model_path, tiny_data,
                                                                                       tmp_path, data_aware):
    out = tmp_path / "proj"
    args = ["svd", model_path, "--structure", "projection", "--rank-threshold", "0.1", "-o", str(out), "--json",
            "--eval", str(tiny_data)]
    if data_aware:
        args += ["--data-aware", "--calib", str(tiny_data)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["options"]["structure"] == "projection" and report["options"]["data_aware"] is data_aware
    assert report["after"]["params"] < report["before"]["params"]
    assert report["after"]["flops"]["encoder_per_frame"] < report["before"]["flops"]["encoder_per_frame"]
    rows = report["layers"]
    assert [r["layer"] for r in rows] == [f"encoder.pre_rnn.layers.{i}" for i in range(2)] + [
        f"encoder.post_rnn.layers.{i}" for i in range(3)]
    assert all(r["side"] == "projection" and r["status"] == "projected" and r["rank"] for r in rows)
    assert "| encoder.pre_rnn.layers.0 | projection |" in (out / "report.md").read_text()
    info = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert info["params"] == report["after"]["params"]
    assert info["structure"]["encoder.pre_rnn.layers.0"]["type"] == "projected_lstm"
    assert info["structure"]["joint_net.encoder_proj"]["type"] == "projected_input_linear"
    text = runner.invoke(app, ["info", str(out)])
    assert text.exit_code == 0 and "compressed layers" in text.output and "projection" in text.output
    shown = runner.invoke(app, ["report", str(out), "--json"])
    assert shown.exit_code == 0, shown.output
    params = report["after"]["params"]
    assert runner.invoke(app, ["gate", str(out), "--max-params", str(params)]).exit_code == 0
    assert runner.invoke(app, ["gate", str(out), "--max-params", str(params - 1)]).exit_code == 1
    if not data_aware:
        exported = runner.invoke(app, ["export", str(out), "-o", str(tmp_path / "onnx"), "--json"])
        assert exported.exit_code == 0, exported.output
        diffs = json.loads(exported.stdout)["parity"]["max_abs_diff"]
        assert max(v for kinds in diffs.values() for v in kinds.values()) <= 1e-4


@pytest.mark.parametrize("args, fragment", [
    (["--structure", "lstmp"], "--structure"),
    (["--structure", "projection", "--mode", "rollout"], "--structure projection"),
    (["--structure", "projection", "--components", "joint"], "--structure projection"),
])
def test_bad_projection_options(model_path, tmp_path, args, fragment):
    result = runner.invoke(app, ["svd", model_path, "-o", str(tmp_path / "o"), *args])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_projection_on_a_conformer_is_a_one_line_error(nemo_fixture_dir, tmp_path):
    model = str(nemo_fixture_dir / "conformer" / "model.nemo")
    for components in ("encoder", "prediction"):
        result = runner.invoke(app, ["svd", model, "--structure", "projection", "--components", components,
                                     "-o", str(tmp_path / "o")])
        assert_one_line_error(result, "--structure projection")
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_help_shows_the_projection_example():
    result = runner.invoke(app, ["svd", "--help"])
    assert result.exit_code == 0 and "--structure projection" in " ".join(result.output.split())

"""The prune command through Typer's CliRunner: outputs, sparsity in info, one-line errors, no partial files."""

import json

import pytest
from typer.testing import CliRunner

from asrshrink.cli.main import app
from asrshrink.report import options_summary
from tests.helpers import assert_one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def model_path(mlperf_fixture_dir):
    return str(mlperf_fixture_dir / "rnnt_random_small.pt")


def test_help_has_an_example():
    result = runner.invoke(app, ["prune", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output


def test_prune_writes_model_and_reports_and_info_shows_sparsity(model_path, tiny_data, tmp_path):
    out = tmp_path / "pruned"
    result = runner.invoke(app, ["prune", model_path, "--sparsity", "0.9", "--components", "all", "-o", str(out),
                                 "--json", "--eval", str(tiny_data)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "asrshrink.report/1" and report["command"] == "prune"
    assert all(row["sparsity"] == pytest.approx(0.9, abs=1e-4) for row in report["layers"])
    assert report["after"]["sparse_bytes"] < report["before"]["sparse_bytes"] == report["before"]["bytes"]
    assert report["compression_ratio"]["storage"]["model"] > 3 and set(report["eval"]) >= {"before", "after"}
    assert "Sparse storage" in (out / "report.md").read_text()
    info = runner.invoke(app, ["info", str(out), "--json"])
    data = json.loads(info.stdout)
    assert data["sparse_bytes"] == report["after"]["sparse_bytes"] and data["params"] == report["after"]["params"]
    assert data["structure"]["encoder.pre_rnn.layers.0"]["type"] == "sparse_lstm"
    # report and gate size a pruned model by its sparse storage, not its dense float32 bytes
    rows = json.loads(runner.invoke(app, ["report", str(out), "--json"]).stdout)
    assert rows[0]["bytes"] == report["after"]["sparse_bytes"] and rows[0]["compression_ratio"] > 3
    limit = (report["after"]["sparse_bytes"] + report["after"]["bytes"]) / 2e6
    assert runner.invoke(app, ["gate", str(out), "--max-size-mb", str(limit)]).exit_code == 0
    table = runner.invoke(app, ["info", str(out)], terminal_width=200)
    assert "sparsity 90.0%" in table.stdout and "non-zero parameters" in table.stdout


def test_sparsegpt_logs_every_matrix(model_path, tiny_data, tmp_path):
    out = tmp_path / "sparsegpt"
    result = runner.invoke(app, ["prune", model_path, "--sparsity", "0.5", "--method", "sparsegpt", "--calib",
                                 str(tiny_data), "--global", "-o", str(out)], terminal_width=300)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("(magnitude ") == 10  # 5 encoder layers, 2 sides
    report = json.loads((out / "report.json").read_text())
    assert report["options"]["global_threshold"] and report["options"]["calib_used"]["utterances"] == 3
    assert options_summary(report["options"]) == "sparsity 0.5 sparsegpt, global"
    layers = report["layers"]
    total = sum(r["shape"][0] * r["shape"][1] for r in layers)
    assert sum(r["shape"][0] * r["shape"][1] - r["nonzeros"] for r in layers) == round(0.5 * total)


@pytest.mark.parametrize("args, fragment", [
    (["--sparsity", "1"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    ([], "--sparsity is required"),
    (["--sparsity", "0.5", "--method", "obs"], "--method must be one of"),
    (["--sparsity", "0.5", "--components", "decoder"], "--components"),
    (["--sparsity", "0.5", "--method", "sparsegpt", "--components", "joint"], "--components must include"),
    (["--sparsity", "0.5", "--calib", "somewhere"], "--calib is read only by"),
    (["--sparsity", "0.5", "--method", "wanda", "--num-utterances", "0"], "--num-utterances"),
])
def test_bad_options(model_path, tmp_path, args, fragment):
    out = tmp_path / "o"
    result = runner.invoke(app, ["prune", model_path, "-o", str(out), *args])
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_bad_eval_data_is_refused_before_any_output(model_path, tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(app, ["prune", model_path, "--sparsity", "0.5", "-o", str(out), "--eval",
                                 str(tmp_path / "nowhere")])
    assert_one_line_error(result, "nowhere")
    assert not out.exists()

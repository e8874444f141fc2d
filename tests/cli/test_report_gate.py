"""``asrshrink report`` and ``asrshrink gate`` on reports of real svd runs: rows, plot, exit codes, error lines."""

import json
import sys

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from asrshrink.cli.main import app
from tests.helpers import assert_one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def outputs(mlperf_fixture_dir, tmp_path_factory):
    """Two svd outputs of the small random MLPerf model: rank 8 with --eval, threshold 0.5 without."""
    root = tmp_path_factory.mktemp("reports")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, text in enumerate(["hello world", "a b c"]):
        sf.write(data / f"u{i}.wav", (0.1 * rng.standard_normal(4000 + 1000 * i)).astype(np.float32), 16000)
        (data / f"u{i}.txt").write_text(text)
    model = str(mlperf_fixture_dir / "rnnt_random_small.pt")
    for name, args in (("rank8", ["--rank", "8", "--eval", str(data)]), ("t05", ["--rank-threshold", "0.5"])):
        result = runner.invoke(app, ["svd", model, "-o", str(root / name), *args])
        assert result.exit_code == 0, result.output
    return root / "rank8", root / "t05"


def read(out):
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("command", ["report", "gate"])
def test_help_has_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Example:" in result.output


def test_report_rows_and_plot(outputs, tmp_path):
    png = tmp_path / "wer-size.png"
    result = runner.invoke(app, ["report", *map(str, outputs), "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(map(str, outputs))
    assert [r["options"] for r in rows] == ["rank 8", "threshold 0.5"]
    for row, out in zip(rows, outputs):
        report = read(out)
        assert row["command"] == "svd" and row["params"] == report["after"]["params"]
        assert row["bytes"] == report["after"]["bytes"]
        assert row["encoder_flops_per_frame"] == report["after"]["flops"]["encoder_per_frame"]
    assert rows[0]["wer_after"] == read(outputs[0])["eval"]["after"]["wer"] and rows[1]["wer_after"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not plotted" in result.stderr and str(outputs[1]) in result.stderr


def test_report_table_and_markdown(outputs):
    table = runner.invoke(app, ["report", *map(str, outputs)], env={"COLUMNS": "160"})
    assert table.exit_code == 0, table.output
    for out in outputs:
        assert f"{read(out)['after']['params']:,}" in table.stdout
    markdown = runner.invoke(app, ["report", str(outputs[0] / "report.json"), "--markdown"])
    lines = markdown.stdout.splitlines()
    assert len(lines) == 3 and lines[2].startswith(f"| {outputs[0] / 'report.json'} | svd | rank 8 |")


def test_plot_without_any_wer_or_matplotlib(outputs, tmp_path, monkeypatch):
    png = tmp_path / "p.png"
    assert_one_line_error(runner.invoke(app, ["report", str(outputs[1]), "--plot", str(png)]), "--eval PATH")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert_one_line_error(runner.invoke(app, ["report", str(outputs[0]), "--plot", str(png)]), "asrshrink[plot]")
    assert not png.exists()


@pytest.mark.parametrize("content, fragment", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ('{"schema": "something/1"}', "expected 'asrshrink.report/1'"),
    ('{"schema": "asrshrink.report/2"}', "upgrade asrshrink"),
    ('{"schema": "asrshrink.report/1", "command": "svd", "before": {}, "eval": null}', "before.params is missing"),
])
def test_bad_reports_are_one_line_errors(tmp_path, content, fragment):
    folder = tmp_path / "out"
    folder.mkdir()
    if content is not None:
        (folder / "report.json").write_text(content)
    for command in (["report"], ["gate", "--max-params", "1"]):
        result = runner.invoke(app, [command[0], str(folder), *command[1:]])
        assert_one_line_error(result, str(folder / "report.json"), fragment)


def test_gate_passes_loose_bounds(outputs):
    report = read(outputs[0])
    e = report["eval"]
    result = runner.invoke(app, ["gate", str(outputs[0]), "--max-size-mb", "100", "--max-params", "10000000",
                                 "--max-wer", str(e["after"]["wer"] + 1),
                                 "--max-wer-increase", str(e["after"]["wer"] - e["before"]["wer"] + 1), "--json"])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["passed"] and [b["passed"] for b in verdict["bounds"]] == [True] * 4
    assert verdict["bounds"][0]["measured"] == report["after"]["bytes"] / 1e6
    assert result.stderr.count("pass ") == 4


def test_gate_fails_tight_bounds_one_line_each(outputs):
    report = read(outputs[0])
    e = report["eval"]
    increase = e["after"]["wer"] - e["before"]["wer"]
    result = runner.invoke(app, ["gate", str(outputs[0] / "report.json"), "--max-size-mb", "0.1",
                                 "--max-params", "1000", "--max-wer", str(e["after"]["wer"] - 0.5),
                                 "--max-wer-increase", str(increase - 0.5)])
    assert result.exit_code == 1, result.output
    fails = [line for line in result.stderr.splitlines() if line.startswith("fail ")]
    assert len(fails) == 4
    assert fails[0] == f"fail --max-size-mb: size {report['after']['bytes'] / 1e6:.3f} MB > 0.100 MB"
    assert fails[1] == f"fail --max-params: parameters {report['after']['params']:,} > 1,000"
    assert fails[2].startswith(f"fail --max-wer: WER {e['after']['wer']:.2f} % > ")
    assert fails[3].startswith(f"fail --max-wer-increase: WER increase {increase:.2f} points > ")


def test_gate_wer_bound_without_eval_fails(outputs):
    result = runner.invoke(app, ["gate", str(outputs[1]), "--max-params", "10000000", "--max-wer-increase", "1",
                                 "--json"])
    assert result.exit_code == 1, result.output
    bounds = json.loads(result.stdout)["bounds"]
    assert [(b["passed"], b["measured"]) for b in bounds][1] == (False, None)
    assert "fail --max-wer-increase: the report has no WER: run svd/psvd with --eval PATH" in result.stderr


def test_gate_needs_a_bound(outputs):
    assert_one_line_error(runner.invoke(app, ["gate", str(outputs[0])]), "give at least one bound")
    assert_one_line_error(runner.invoke(app, ["gate", str(outputs[0]), "--max-size-mb", "-1"]), "--max-size-mb")


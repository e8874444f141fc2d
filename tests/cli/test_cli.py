"""The command line through Typer's CliRunner: exit codes, JSON outputs, one-line errors, no partial files."""

import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from asrshrink.cli.main import app
from tests.helpers import assert_one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def model_path(mlperf_fixture_dir):
    return str(mlperf_fixture_dir / "rnnt_random_small.pt")


@pytest.mark.parametrize("command", ["eval", "info", "dump", "svd", "psvd"])
def test_help_has_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Example:" in result.output


def test_info_json(model_path):
    result = runner.invoke(app, ["info", model_path, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["family"] == "mlperf-rnnt" and data["params"] == 2_990_621
    assert sum(data["params_by_component"].values()) == data["params"]
    assert data["flops"]["encoder_per_frame"] > 0


def test_eval_json_and_hypotheses(model_path, tiny_data, tmp_path):
    hyp = tmp_path / "hyp.jsonl"
    result = runner.invoke(app, ["eval", model_path, "--data", str(tiny_data), "--json", "--hypotheses", str(hyp)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_utterances"] == 3 and data["num_words"] == 7
    assert data["wer"] >= 0 and data["audio_seconds"] == pytest.approx((4000 + 5000 + 6000) / 16000)
    rows = [json.loads(line) for line in hyp.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["u0", "u1", "u2"] and rows[1]["reference"] == "a b c"


def test_eval_beam_reports_its_search(model_path, tiny_data, tmp_path):
    greedy = json.loads(runner.invoke(app, ["eval", model_path, "--data", str(tiny_data), "--json"]).stdout)
    assert greedy["search"] == "greedy" and greedy["beam"] is None
    hyp = tmp_path / "hyp.jsonl"
    for width in (1, 3):
        result = runner.invoke(app, ["eval", model_path, "--data", str(tiny_data), "--json", "--beam", str(width),
                                     "--hypotheses", str(hyp)])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["search"] == "beam" and data["beam"] == width and f"search: beam, width {width}" in result.stderr
        rows = [json.loads(line) for line in hyp.read_text().splitlines()]
        assert all(isinstance(r["score"], float) and r["score"] <= 0 for r in rows)
        if width == 1:
            assert data["word_errors"] == greedy["word_errors"]


def test_eval_beam_must_be_positive(model_path, tiny_data):
    assert_one_line_error(runner.invoke(app, ["eval", model_path, "--data", str(tiny_data), "--beam", "0"]),
                          "--beam must be at least 1")


def test_eval_limit(model_path, tiny_data):
    result = runner.invoke(app, ["eval", model_path, "--data", str(tiny_data), "--json", "--limit", "2"])
    assert result.exit_code == 0 and json.loads(result.stdout)["num_utterances"] == 2


def test_dump_writes_every_array(model_path, tiny_data, tmp_path):
    out = tmp_path / "dump.npz"
    result = runner.invoke(app, ["dump", model_path, str(tiny_data / "u0.wav"), str(tiny_data / "u2.wav"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    arrays = np.load(out)
    assert sorted(arrays.files) == sorted(f"{s}.{k}" for s in ("u0", "u2") for k in ("features", "encoder", "tokens"))
    assert arrays["u0.features"].shape == (9, 240) and arrays["u0.encoder"].shape == (5, 256)


def test_bad_audio_gives_one_line_and_no_partial_output(model_path, tiny_data, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEjunk")
    out = tmp_path / "dump.npz"
    result = runner.invoke(app, ["dump", model_path, str(tiny_data / "u0.wav"), str(bad), "-o", str(out)])
    assert_one_line_error(result, str(bad))
    assert not out.exists() and not list(tmp_path.glob(".dump.npz*"))


def test_too_short_audio_names_the_file(model_path, tmp_path):
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(100, np.float32), 16000)
    result = runner.invoke(app, ["dump", model_path, str(short), "-o", str(tmp_path / "x.npz")])
    assert_one_line_error(result, str(short), "too short")


def test_corrupt_model(tmp_path, tiny_data):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"garbage" * 100)
    result = runner.invoke(app, ["eval", str(bad), "--data", str(tiny_data)])
    assert_one_line_error(result, str(bad), "corrupt")


def test_missing_data(model_path, tmp_path):
    result = runner.invoke(app, ["eval", model_path, "--data", str(tmp_path / "nowhere")])
    assert_one_line_error(result, "nowhere")


def test_empty_after_filtering(model_path, tiny_data):
    result = runner.invoke(app, ["eval", model_path, "--data", str(tiny_data), "--max-duration", "0.1"])
    assert_one_line_error(result, "max-duration")


def test_missing_transcript(model_path, tiny_data):
    (tiny_data / "u1.txt").unlink()
    result = runner.invoke(app, ["eval", model_path, "--data", str(tiny_data)])
    assert_one_line_error(result, "u1")


def test_svd_writes_model_and_reports(model_path, tiny_data, tmp_path):
    out = tmp_path / "svd"
    result = runner.invoke(app, ["svd", model_path, "--rank-threshold", "0.1", "-o", str(out), "--json",
                                 "--eval", str(tiny_data)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "asrshrink.report/1" and report["command"] == "svd"
    assert report["after"]["params"] < report["before"]["params"]
    assert report["compression_ratio"]["by_component"]["encoder"] > 5
    assert set(report["eval"]) >= {"before", "after", "num_words"}
    assert json.loads((out / "report.json").read_text())["output"]["sha256"] == report["output"]["sha256"]
    assert "| encoder.pre_rnn.layers.0 | ih |" in (out / "report.md").read_text()
    info = runner.invoke(app, ["info", str(out), "--json"])
    assert json.loads(info.stdout)["params"] == report["after"]["params"]
    assert json.loads(info.stdout)["structure"]


def test_psvd_runs_and_logs_every_layer(model_path, tiny_data, tmp_path):
    out = tmp_path / "psvd"
    result = runner.invoke(app, ["psvd", model_path, "--calib", str(tiny_data), "--iterations", "1",
                                 "--rank", "16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [r["layer"] for r in report["post_training"]] == [f"encoder.pre_rnn.layers.{i}" for i in range(2)] + [
        f"encoder.post_rnn.layers.{i}" for i in range(3)]
    assert result.stderr.count("relative output error") == 5


@pytest.mark.parametrize("args, fragment", [
    (["--rank-threshold", "1.5"], "--rank-threshold"),
    (["--components", "decoder"], "--components"),
    (["--mode", "diagonal"], "--mode"),
])
def test_svd_bad_options(model_path, tmp_path, args, fragment):
    result = runner.invoke(app, ["svd", model_path, "-o", str(tmp_path / "o"), *args])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_resume_without_an_interrupted_run(tmp_path):
    result = runner.invoke(app, ["psvd", "--resume", str(tmp_path)])
    assert_one_line_error(result, "no interrupted run")


def test_bad_eval_data_is_refused_before_any_output(model_path, tmp_path):
    out = tmp_path / "o"
    result = runner.invoke(app, ["svd", model_path, "-o", str(out), "--eval", str(tmp_path / "nowhere")])
    assert_one_line_error(result, "nowhere")
    assert not out.exists() or not any(out.iterdir())


def test_output_must_be_a_directory(model_path, tmp_path):
    target = tmp_path / "model.safetensors"
    result = runner.invoke(app, ["svd", model_path, "-o", str(target)])
    assert_one_line_error(result, "-o takes a directory")
    assert not target.exists()


def test_hypotheses_into_a_directory_is_a_one_line_error(model_path, tiny_data, tmp_path):
    result = runner.invoke(app, ["eval", model_path, "--data", str(tiny_data), "--hypotheses", str(tmp_path)])
    assert_one_line_error(result, str(tmp_path))


@pytest.mark.parametrize("args, fragment", [
    (["--iterations", "0"], "--iterations"),
    (["--components", "joint"], "--components must include"),
    (["--rank", "4", "--compression-ratio", "3"], "not both"),
    (["--num-utterances", "0"], "--num-utterances"),
])
def test_psvd_bad_options(model_path, tiny_data, tmp_path, args, fragment):
    result = runner.invoke(app, ["psvd", model_path, "--calib", str(tiny_data), "-o", str(tmp_path / "o"), *args])
    assert_one_line_error(result, fragment)

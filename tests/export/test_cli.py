"""``asrshrink export`` and ``asrshrink eval`` of an export directory through Typer's CliRunner."""

import json

import pytest
import torch
from typer.testing import CliRunner

from asrshrink.cli.main import app
from asrshrink.export import check
from asrshrink.models.checkpoint import save_model
from asrshrink.models.mlperf_rnnt import MlperfRnnt
from tests.helpers import assert_one_line_error
from tests.export.test_onnx import TINY

runner = CliRunner()


@pytest.fixture()
def model_path(tmp_path):
    torch.manual_seed(0)
    return str(save_model(MlperfRnnt(TINY).eval(), tmp_path / "model"))


def test_export_then_eval_gives_the_pytorch_wer(tmp_path):
    """On the bundled (trained) model and speech, where hypotheses are not empty: a random model decodes every
    clip to "", and 100 % == 100 % could not fail."""
    out = tmp_path / "onnx"
    result = runner.invoke(app, ["export", "-o", str(out), "--int8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "asrshrink.export/1" and report["source"]["path"].endswith("model.safetensors")
    assert {"encoder.onnx", "decoder.onnx", "joiner.onnx", "encoder.int8.onnx", "tokens.txt"} <= set(report["files"])
    assert "the same as PyTorch" in result.stderr
    runs, hyps = {}, {}
    for name, target in (("torch", []), ("onnx", [str(out)]), ("int8", [str(out / "encoder.int8.onnx")])):
        file = tmp_path / f"{name}.jsonl"
        result = runner.invoke(app, ["eval", *target, "--limit", "8", "--json", "--hypotheses", str(file)])
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(result.stdout)
        hyps[name] = [json.loads(line)["hypothesis"] for line in file.read_text().splitlines()]
    words = sum(len(h.split()) for h in hyps["torch"])
    assert words > 0.5 * runs["torch"]["num_words"]  # the model really transcribes: the comparison can fail
    assert hyps["onnx"] == hyps["torch"] and runs["onnx"]["wer"] == runs["torch"]["wer"] < 100
    assert runs["int8"]["num_utterances"] == 8 and sum(len(h.split()) for h in hyps["int8"]) > 0


def test_help_has_an_example():
    result = runner.invoke(app, ["export", "--help"])
    assert result.exit_code == 0 and "Example:" in result.output


def test_output_that_is_a_file(model_path, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    result = runner.invoke(app, ["export", model_path, "-o", str(target)])
    assert_one_line_error(result, str(target), "-o takes a directory")
    assert target.read_text() == "keep me"


def test_output_that_is_another_folder(model_path, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    result = runner.invoke(app, ["export", model_path, "-o", str(tmp_path / "notes")])
    assert_one_line_error(result, "not empty")
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["a.txt"]


def test_bad_opset(model_path, tmp_path):
    result = runner.invoke(app, ["export", model_path, "-o", str(tmp_path / "o"), "--opset", "9"])
    assert_one_line_error(result, "--opset")
    assert not (tmp_path / "o").exists()


def test_a_parity_failure_writes_nothing(model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(check, "ATOL", 0.0)
    out = tmp_path / "out" / "onnx"
    result = runner.invoke(app, ["export", model_path, "-o", str(out)])
    assert_one_line_error(result, str(out), "differs from PyTorch", "nothing was written")
    assert list((tmp_path / "out").iterdir()) == []


def test_eval_of_an_incomplete_export(model_path, tiny_data, tmp_path):
    out = tmp_path / "onnx"
    assert runner.invoke(app, ["export", model_path, "-o", str(out)]).exit_code == 0
    (out / "joiner.onnx").unlink()
    result = runner.invoke(app, ["eval", str(out), "--data", str(tiny_data)])
    assert_one_line_error(result, "joiner.onnx", "export again")
    result = runner.invoke(app, ["eval", str(out / "encoder.int8.onnx"), "--data", str(tiny_data)])
    assert_one_line_error(result, "encoder.int8.onnx", "--int8")
    (out / "joiner.onnx").write_bytes(b"not a model")
    result = runner.invoke(app, ["eval", str(out), "--data", str(tiny_data)])
    assert_one_line_error(result, "joiner.onnx", "onnxruntime cannot load it")

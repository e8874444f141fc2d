"""The hostile-input table: every case through the real CLI (CliRunner, in-process), asserting exit code 2,
exactly one ``error:`` line naming the file or option (and the fix's key words), no traceback, and not one
file written or changed anywhere under the test's folder.

Models: zero-byte, truncated, garbage, pickles that would run code (zip, legacy, raw protocols 0 and 2),
missing / extra / mis-shaped / empty / 1-D / integer / NaN / Inf tensors, configs with unbounded or
inconsistent sizes, bad structure metadata, unknown family, newer format, FIFOs and devices. Data: missing,
empty, corrupt, too short, too long, bad manifests. Options: every range check. Reports: every schema
violation that ``report`` and ``gate`` would otherwise crash on.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from asrshrink.cli.main import app
from tests.helpers import assert_one_line_error
from tests.reliability.conftest import Assets, snapshot

runner = CliRunner()


class RunsCode:
    """Unpickling this would call os.system."""

    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


# --- hostile model files ----------------------------------------------------------------------------------------
# Each builder writes a model file into ``d`` and returns its path; the fragments must appear in the error.

def _native(a: Assets, d: Path, *, tensors=None, meta=None, edit_meta=None, edit_tensors=None,
            name="m.safetensors") -> Path:
    t, m = a.native_parts()
    if edit_tensors:
        edit_tensors(t)
    if edit_meta:
        edit_meta(m)
    path = d / name
    save_file(tensors if tensors is not None else t, str(path),
              metadata=meta if meta is not None else {"asrshrink": json.dumps(m)})
    return path


def _foreign(a: Assets, d: Path, edit, name="m.pt") -> Path:
    sd = a.state_dict()
    edit(sd)
    path = d / name
    torch.save({"state_dict": sd}, path)
    return path


def _bytes(d: Path, data: bytes, name="m.pt") -> Path:
    (d / name).write_bytes(data)
    return d / name


def _set(mapping: dict, key: str, value) -> None:
    mapping[key] = value


def _fifo(a: Assets, d: Path) -> Path:
    os.mkfifo(d / "fifo.pt")
    return d / "fifo.pt"


HH = "encoder.pre_rnn.lstm.weight_hh_l0"
NATIVE_HH = "encoder.pre_rnn.layers.0.lstm.weight_hh_l0"

MODELS: dict[str, tuple[Callable[[Assets, Path], Path], tuple[str, ...]]] = {
    "zero-bytes": (lambda a, d: _bytes(d, b""), ("empty file",)),
    "garbage": (lambda a, d: _bytes(d, b"\x07" + np.random.default_rng(3).bytes(3000)),
                ("not a PyTorch checkpoint",)),
    "text": (lambda a, d: _bytes(d, b"these are not weights\n"), ("not a PyTorch checkpoint",)),
    "truncated-zip": (lambda a, d: _bytes(d, a.foreign.read_bytes()[:5000]), ("corrupt or truncated",)),
    "truncated-safetensors": (lambda a, d: _bytes(d, a.native.read_bytes()[:3000], "m.safetensors"),
                              ("corrupt or truncated",)),
    "pickle-zip-os-system": (lambda a, d: (torch.save({"state_dict": {}, "x": RunsCode()}, d / "m.pt"), d / "m.pt")[1],
                             ("would run code", "system")),
    "pickle-raw-p2": (lambda a, d: _bytes(d, pickle.dumps(RunsCode(), protocol=2)), ("would run code", "system")),
    "pickle-raw-p0": (lambda a, d: _bytes(d, pickle.dumps(RunsCode(), protocol=0)), ("would run code", "system")),
    "pickle-legacy": (lambda a, d: (torch.save({"x": RunsCode()}, d / "m.pt", _use_new_zipfile_serialization=False),
                                    d / "m.pt")[1], ("would run code", "system")),
    "no-state-dict": (lambda a, d: (torch.save({"epoch": 3}, d / "m.pt"), d / "m.pt")[1], ("no state dict found",)),
    "unknown-layout": (lambda a, d: (torch.save({"state_dict": {"conv.weight": torch.zeros(2, 2)}}, d / "m.pt"),
                                     d / "m.pt")[1], ("not a checkpoint of a known model family", "mlperf-rnnt")),
    "missing-tensor": (lambda a, d: _foreign(a, d, lambda sd: sd.pop("encoder.post_rnn.lstm.bias_hh_l1")),
                       ("missing keys", "encoder.post_rnn.lstm.bias_hh_l1")),
    "extra-tensor": (lambda a, d: _foreign(a, d, lambda sd: _set(sd, "encoder.extra.weight", torch.zeros(3))),
                     ("unexpected keys", "encoder.extra.weight")),
    "wrong-shape": (lambda a, d: _foreign(a, d, lambda sd: _set(sd, "encoder.post_rnn.lstm.weight_hh_l1",
                                                                torch.zeros(96, 20))),
                    ("encoder.post_rnn.lstm.weight_hh_l1", "(96, 20)", "(96, 24)")),
    "weight-hh-zero-columns": (lambda a, d: _foreign(a, d, lambda sd: _set(sd, HH, torch.zeros(1024, 0))),
                               (HH, "(1024, 0)")),
    "weight-hh-1d": (lambda a, d: _foreign(a, d, lambda sd: _set(sd, HH, torch.zeros(96))), (HH, "(96,)")),
    "int-tensor-pt": (lambda a, d: _foreign(a, d, lambda sd: _set(sd, HH, sd[HH].to(torch.int32))),
                      (HH, "int32", "floating-point")),
    "nan-pt": (lambda a, d: _foreign(a, d, lambda sd: sd[HH].view(-1)[:3].fill_(float("nan"))), (HH, "3 NaN")),
    "inf-pt": (lambda a, d: _foreign(a, d, lambda sd: sd[HH].view(-1)[:2].fill_(float("inf"))), (HH, "2 infinite")),
    "nan-safetensors": (lambda a, d: _native(a, d, edit_tensors=lambda t: t[NATIVE_HH].view(-1)[0].fill_(float("nan"))),
                        (NATIVE_HH, "1 NaN")),
    "int-safetensors": (lambda a, d: _native(a, d, edit_tensors=lambda t: _set(t, NATIVE_HH, t[NATIVE_HH].to(torch.int64))),
                        (NATIVE_HH, "int64", "floating-point")),
    "hidden-2-to-22": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(m["config"], "encoder_hidden", 2 ** 22)),
                       ("encoder_hidden", "4194304")),
    "hidden-moderate": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(m["config"], "encoder_hidden", 4096)),
                        ("its config says",)),
    "layers-many": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(m["config"], "encoder_post_layers", 5000)),
                    ("encoder_post_layers", "5000")),
    "negative-size": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(m["config"], "joint_hidden", -3)),
                      ("joint_hidden", "-3")),
    "nan-dropout": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(m["config"], "dropout", float("nan"))),
                    ("dropout", "nan")),
    "huge-n-fft": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(m["config"]["feature"], "n_fft", 1 << 30)),
                   ("feature.n_fft",)),
    "config-not-object": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(m, "config", [1, 2])),
                          ("config is list",)),
    "unknown-family": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(m, "family", "whisper")),
                       ("unknown model family 'whisper'", "mlperf-rnnt")),
    "newer-format": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(m, "format_version", 99)),
                     ("newer asrshrink", "upgrade")),
    "metadata-not-json": (lambda a, d: _native(a, d, meta={"asrshrink": "{not json"}), ("not JSON",)),
    "no-metadata": (lambda a, d: _native(a, d, meta={}), ("without asrshrink metadata",)),
    "structure-unknown-layer": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(
        m, "structure", {"encoder.nothing": {"type": "dense", "in": 2, "out": 2, "bias": True}})),
        ("encoder.nothing", "not a layer")),
    "structure-unknown-type": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(
        m, "structure", {"joint_net.output": {"type": "quantum", "in": 16, "out": 29}})),
        ("joint_net.output", "unknown layer type 'quantum'")),
    "structure-rank-too-big": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(
        m, "structure", {"joint_net.output": {"type": "lowrank", "in": 16, "out": 29, "rank": 40, "groups": 1,
                                              "bias": True}})), ("joint_net.output", "rank 40")),
    "structure-rank-zero": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(
        m, "structure", {"joint_net.output": {"type": "lowrank", "in": 16, "out": 29, "rank": 0, "groups": 1,
                                              "bias": True}})), ("joint_net.output", "rank is 0")),
    "structure-wrong-interface": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(
        m, "structure", {"joint_net.output": {"type": "lowrank", "in": 16, "out": 7, "rank": 2, "groups": 1,
                                              "bias": True}})), ("joint_net.output", "give 7 where")),
    "structure-not-object": (lambda a, d: _native(a, d, edit_meta=lambda m: _set(m, "structure", [1])),
                             ("compression structure",)),
    "fifo": (_fifo, ("a FIFO",)),
    "missing-file": (lambda a, d: d / "nope.pt", ("no such file",)),
    "folder-without-model": (lambda a, d: (d / "empty").mkdir() or d / "empty", ("has no model.safetensors",)),
}


def _model_argv(command: str, model: str, a: Assets, d: Path) -> list[str]:
    return {
        "info": ["info", model],
        "eval": ["eval", model, "--data", str(a.data)],
        "svd": ["svd", model, "--rank", "2", "-o", str(d / "out")],
        "psvd": ["psvd", model, "--calib", str(a.data), "--num-utterances", "3", "-o", str(d / "out")],
        "prune": ["prune", model, "--sparsity", "0.5", "-o", str(d / "out")],
        "export": ["export", model, "-o", str(d / "out"), "--data", str(a.data)],
        "dump": ["dump", model, str(a.data / "u0.wav"), "-o", str(d / "out.npz")],
    }[command]


def _run_refused(argv: list[str], d: Path, fragments, *, input_files: dict | None = None):
    before = snapshot(d)
    result = runner.invoke(app, argv)
    assert_one_line_error(result, *fragments)
    assert snapshot(d) == before, "a refused command wrote or changed files"
    return result


MODEL_COMMANDS = ("info", "eval", "svd", "export")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
@pytest.mark.parametrize("case", list(MODELS))
def test_hostile_model(case, command, assets, tmp_path):
    build, fragments = MODELS[case]
    d = tmp_path / "in"
    d.mkdir()
    path = build(assets, d)
    _run_refused(_model_argv(command, str(path), assets, d), tmp_path, (str(path), *fragments))


@pytest.mark.parametrize("command", ["psvd", "prune", "dump"])
@pytest.mark.parametrize("case", ["zero-bytes", "pickle-zip-os-system", "weight-hh-zero-columns", "nan-pt",
                                  "int-safetensors", "hidden-2-to-22", "structure-rank-too-big", "fifo"])
def test_hostile_model_other_commands(case, command, assets, tmp_path):
    build, fragments = MODELS[case]
    d = tmp_path / "in"
    d.mkdir()
    path = build(assets, d)
    _run_refused(_model_argv(command, str(path), assets, d), tmp_path, (str(path), *fragments))


def test_a_device_as_model_is_refused_without_reading_it(tmp_path):
    _run_refused(["info", "/dev/zero"], tmp_path, ("/dev/zero", "a device"))


def test_the_pickled_code_never_ran(assets, tmp_path):
    marker = tmp_path / "ran"

    class Touch:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for i, protocol in enumerate((0, 2)):
        path = tmp_path / f"p{i}.pt"
        path.write_bytes(pickle.dumps(Touch(), protocol=protocol))
        result = runner.invoke(app, ["info", str(path)])
        assert_one_line_error(result, "would run code")
        assert "weights_only" not in result.output
    assert not marker.exists()


# --- hostile data -------------------------------------------------------------------------------------------------

def _folder(d: Path, clips: dict[str, tuple[int, str | None]], name="data") -> Path:
    """A folder of noise clips: {stem: (samples, transcript or None)}."""
    folder = d / name
    folder.mkdir()
    rng = np.random.default_rng(1)
    for stem, (samples, text) in clips.items():
        sf.write(folder / f"{stem}.wav", (0.1 * rng.standard_normal(samples)).astype(np.float32), 16000)
        if text is not None:
            (folder / f"{stem}.txt").write_text(text)
    return folder


def _corrupt(d: Path) -> Path:
    folder = _folder(d, {"a": (6000, "a b"), "b": (6000, "c d")})
    (folder / "b.wav").write_bytes(b"RIFF\x00\x00garbage")
    return folder


def _manifest(d: Path, lines: list[str]) -> Path:
    (d / "m.jsonl").write_text("\n".join(lines) + "\n")
    return d / "m.jsonl"


DATA: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "missing": (lambda d: d / "nowhere", ("does not exist",)),
    "empty-folder": (lambda d: (d / "e").mkdir() or d / "e", ("no dataset found",)),
    "no-transcripts": (lambda d: _folder(d, {"a": (6000, None)}), ("no transcripts",)),
    "corrupt-audio": (lambda d: _corrupt(d), ("b.wav",)),
    "too-short": (lambda d: _folder(d, {"a": (6000, "a b"), "b": (100, "c")}), ("b.wav", "short")),
    "bad-jsonl": (lambda d: _manifest(d, ['{"audio_filepath": "x.wav", "text": "a"}', "{oops"]), ("m.jsonl",)),
    "manifest-missing-audio": (lambda d: _manifest(d, ['{"audio_filepath": "gone.wav", "text": "a b"}']),
                               ("gone.wav",)),
    "empty-transcripts": (lambda d: _folder(d, {"a": (6000, "!! ?? --"), "b": (6000, "")}), ("transcripts are empty",)),
}


def _data_argv(command: str, data: str, a: Assets, d: Path) -> list[str]:
    return {
        "eval": ["eval", str(a.native), "--data", data],
        "svd": ["svd", str(a.native), "--rank", "2", "--eval", data, "-o", str(d / "out")],
        "psvd": ["psvd", str(a.native), "--calib", data, "--iterations", "1", "-o", str(d / "out")],
        "export": ["export", str(a.native), "--data", data, "-o", str(d / "out")],
    }[command]


@pytest.mark.parametrize("command", ["eval", "svd", "psvd", "export"])
@pytest.mark.parametrize("case", list(DATA))
def test_hostile_data(case, command, assets, tmp_path):
    build, fragments = DATA[case]
    d = tmp_path / "in"
    d.mkdir()
    data = build(d)
    _run_refused(_data_argv(command, str(data), assets, d), tmp_path, fragments)


def test_psvd_calibration_of_only_long_clips_gives_advice_that_works(assets, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    data = _folder(d, {"long": (16000 * 16, "a b c")})
    result = _run_refused(["psvd", str(assets.native), "--calib", str(data), "-o", str(d / "out")], tmp_path,
                          ("--calib", "longer than 15 s"))
    assert "--max-duration" not in result.output


def test_dump_with_missing_and_clashing_audio(assets, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _run_refused(["dump", str(assets.native), str(d / "gone.wav"), "-o", str(d / "o.npz")], tmp_path, ("gone.wav",))
    (d / "x").mkdir()
    one = _folder(d, {"u": (6000, None)}, "a")
    two = _folder(d, {"u": (6000, None)}, "b")
    _run_refused(["dump", str(assets.native), str(one / "u.wav"), str(two / "u.wav"), "-o", str(d / "o.npz")],
                 tmp_path, ("share the file stem",))


# --- bad option values --------------------------------------------------------------------------------------------

OPTIONS: dict[str, tuple[Callable[[Assets, Path], list[str]], tuple[str, ...]]] = {
    "eval-batch-size-0": (lambda a, d: ["eval", str(a.native), "--data", str(a.data), "--batch-size", "0"],
                          ("--batch-size",)),
    "eval-limit-0": (lambda a, d: ["eval", str(a.native), "--data", str(a.data), "--limit", "0"], ("--limit",)),
    "eval-limit-negative": (lambda a, d: ["eval", str(a.native), "--data", str(a.data), "--limit", "-2"], ("--limit",)),
    "eval-max-duration-0": (lambda a, d: ["eval", str(a.native), "--data", str(a.data), "--max-duration", "0"],
                            ("--max-duration",)),
    "eval-hypotheses-dir": (lambda a, d: ["eval", str(a.native), "--data", str(a.data), "--hypotheses", str(d)],
                            ("--hypotheses",)),
    "eval-hypotheses-under-a-file": (lambda a, d: (d / "f").write_text("keep") and [
        "eval", str(a.native), "--data", str(a.data), "--hypotheses", str(d / "f" / "h.jsonl")], ("--hypotheses",)),
    "svd-threshold-0": (lambda a, d: ["svd", str(a.native), "--rank-threshold", "0", "-o", str(d / "o")],
                        ("--rank-threshold",)),
    "svd-threshold-1.5": (lambda a, d: ["svd", str(a.native), "--rank-threshold", "1.5", "-o", str(d / "o")],
                          ("--rank-threshold",)),
    "svd-rank-0": (lambda a, d: ["svd", str(a.native), "--rank", "0", "-o", str(d / "o")], ("--rank",)),
    "svd-mode": (lambda a, d: ["svd", str(a.native), "--mode", "diagonal", "-o", str(d / "o")], ("--mode",)),
    "svd-components": (lambda a, d: ["svd", str(a.native), "--components", "ears", "-o", str(d / "o")],
                       ("--components",)),
    "svd-ratio-below-1": (lambda a, d: ["svd", str(a.native), "--compression-ratio", "0.5", "-o", str(d / "o")],
                          ("--compression-ratio",)),
    "svd-rank-and-budget": (lambda a, d: ["svd", str(a.native), "--rank", "2", "--target-params", "9",
                                          "-o", str(d / "o")], ("--rank", "--target-params")),
    "svd-eval-limit-0": (lambda a, d: ["svd", str(a.native), "--rank", "2", "--eval", str(a.data), "--eval-limit",
                                       "0", "-o", str(d / "o")], ("--eval-limit",)),
    "svd-out-is-file": (lambda a, d: (d / "f").write_text("keep") and ["svd", str(a.native), "-o", str(d / "f")],
                        ("-o",)),
    "svd-out-safetensors": (lambda a, d: ["svd", str(a.native), "-o", str(d / "m.safetensors")], ("-o",)),
    "svd-out-foreign-folder": (lambda a, d: ((d / "mine").mkdir(), (d / "mine" / "thesis.tex").write_text("x"),
                                             ["svd", str(a.native), "-o", str(d / "mine")])[2],
                               ("thesis.tex", "-o")),
    "svd-out-under-a-file": (lambda a, d: (d / "f").write_text("keep") and ["svd", str(a.native), "-o",
                                                                           str(d / "f" / "sub")], ("-o",)),
    "psvd-iterations-0": (lambda a, d: ["psvd", str(a.native), "--iterations", "0", "-o", str(d / "o")],
                          ("--iterations",)),
    "psvd-refits-0": (lambda a, d: ["psvd", str(a.native), "--refits", "0", "-o", str(d / "o")], ("--refits",)),
    "psvd-variant": (lambda a, d: ["psvd", str(a.native), "--variant", "magic", "-o", str(d / "o")], ("--variant",)),
    "psvd-num-utterances-0": (lambda a, d: ["psvd", str(a.native), "--num-utterances", "0", "-o", str(d / "o")],
                              ("--num-utterances",)),
    "psvd-joint-only": (lambda a, d: ["psvd", str(a.native), "--components", "joint", "-o", str(d / "o")],
                        ("--components",)),
    "psvd-resume-nothing": (lambda a, d: ["psvd", "--resume", str(d)], ("--resume",)),
    "prune-no-sparsity": (lambda a, d: ["prune", str(a.native), "-o", str(d / "o")], ("--sparsity",)),
    "prune-sparsity-1": (lambda a, d: ["prune", str(a.native), "--sparsity", "1", "-o", str(d / "o")],
                         ("--sparsity",)),
    "prune-method": (lambda a, d: ["prune", str(a.native), "--sparsity", "0.5", "--method", "random", "-o",
                                   str(d / "o")], ("--method",)),
    "prune-calib-with-magnitude": (lambda a, d: ["prune", str(a.native), "--sparsity", "0.5", "--calib", str(a.data),
                                                 "-o", str(d / "o")], ("--calib",)),
    "export-opset": (lambda a, d: ["export", str(a.native), "-o", str(d / "o"), "--opset", "9"], ("--opset",)),
    "export-out-is-file": (lambda a, d: (d / "f").write_text("keep") and ["export", str(a.native), "-o",
                                                                         str(d / "f")], ("-o",)),
    "gate-no-bound": (lambda a, d: ["gate", str(a.svd_out)], ("give at least one bound",)),
    "gate-nan": (lambda a, d: ["gate", str(a.svd_out), "--max-size-mb", "nan"], ("--max-size-mb", "finite")),
    "gate-inf": (lambda a, d: ["gate", str(a.svd_out), "--max-wer", "inf"], ("--max-wer", "finite")),
    "gate-negative": (lambda a, d: ["gate", str(a.svd_out), "--max-params", "-1"], ("--max-params",)),
    "report-both-formats": (lambda a, d: ["report", str(a.svd_out), "--markdown", "--json"], ("--markdown",)),
    "report-plot-not-png": (lambda a, d: ["report", str(a.svd_out), "--plot", str(d / "p.jpg")], ("--plot",)),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_bad_option(case, assets, tmp_path):
    build, fragments = OPTIONS[case]
    d = tmp_path / "in"
    d.mkdir()
    argv = build(assets, d)
    _run_refused(argv, tmp_path, fragments)


# --- malformed reports (report and gate) -------------------------------------------------------------------------

def _report_edit(a: Assets, d: Path, edit) -> Path:
    report = json.loads((a.svd_out / "report.json").read_text())
    edit(report)
    folder = d / "r"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps(report))
    return folder


REPORTS: dict[str, tuple[Callable[[Assets, Path], Path], tuple[str, ...]]] = {
    "missing-eval": (lambda a, d: _report_edit(a, d, lambda r: r.pop("eval")), ("eval is missing",)),
    "missing-command": (lambda a, d: _report_edit(a, d, lambda r: r.pop("command")), ("command is missing",)),
    "string-sparse-bytes": (lambda a, d: _report_edit(a, d, lambda r: _set(r["after"], "sparse_bytes", "12")),
                            ("after.sparse_bytes", "number")),
    "nan-wer": (lambda a, d: _report_edit(a, d, lambda r: _set(r["eval"]["after"], "wer", float("nan"))),
                ("eval.after.wer",)),
    "eval-without-after": (lambda a, d: _report_edit(a, d, lambda r: r["eval"].pop("after")),
                           ("eval.after.wer is missing",)),
    "eval-a-list": (lambda a, d: _report_edit(a, d, lambda r: _set(r, "eval", [1])), ("eval",)),
    "params-float": (lambda a, d: _report_edit(a, d, lambda r: _set(r["after"], "params", 1.5)),
                     ("after.params", "integer")),
    "after-missing": (lambda a, d: _report_edit(a, d, lambda r: r.pop("after")), ("after.params is missing",)),
    "flops-null": (lambda a, d: _report_edit(a, d, lambda r: _set(r["after"], "flops", None)),
                   ("after.flops.encoder_per_frame",)),
    "no-schema": (lambda a, d: _report_edit(a, d, lambda r: r.pop("schema")), ("schema None",)),
    "newer-schema": (lambda a, d: _report_edit(a, d, lambda r: _set(r, "schema", "asrshrink.report/9")),
                     ("upgrade asrshrink",)),
    "not-an-object": (lambda a, d: ((d / "r").mkdir(), (d / "r" / "report.json").write_text("[1, 2]"), d / "r")[2],
                      ("schema None",)),
    "not-json": (lambda a, d: ((d / "r").mkdir(), (d / "r" / "report.json").write_text("{oops"), d / "r")[2],
                 ("not valid JSON",)),
    "no-report": (lambda a, d: ((d / "r").mkdir(), d / "r")[1], ("no such file",)),
}


@pytest.mark.parametrize("command", ["report", "gate"])
@pytest.mark.parametrize("case", list(REPORTS))
def test_malformed_report(case, command, assets, tmp_path):
    build, fragments = REPORTS[case]
    d = tmp_path / "in"
    d.mkdir()
    folder = build(assets, d)
    argv = ["report", str(folder)] if command == "report" else ["gate", str(folder), "--max-params", "100000000"]
    _run_refused(argv, tmp_path, ("report.json", *fragments))

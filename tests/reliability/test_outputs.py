"""All-or-nothing output folders: the run lock, failures while writing (full disk, file too large, a report
that cannot be written), and ``psvd --resume`` refusing anything that does not match the interrupted run."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from asrshrink.cli.main import app
from asrshrink.models import checkpoint
from asrshrink.output import OutputLock, lock_path
from tests.helpers import assert_one_line_error
from tests.reliability.conftest import Assets, copy_folder, snapshot

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from pathlib import Path
from asrshrink.output import OutputLock
lock = OutputLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture()
def holder(tmp_path):
    """A separate process holding the lock of tmp_path / "out" (as a running asrshrink would)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("command", ["svd", "prune", "psvd", "export"])
def test_a_second_run_on_a_locked_folder_is_refused(command, holder, assets, tmp_path):
    out, proc = holder
    argv = {"svd": ["svd", str(assets.native), "--rank", "2"],
            "prune": ["prune", str(assets.native), "--sparsity", "0.5"],
            "psvd": ["psvd", str(assets.native), "--calib", str(assets.data)],
            "export": ["export", str(assets.native), "--data", str(assets.data)]}[command]
    before = snapshot(tmp_path)
    result = runner.invoke(app, [*argv, "-o", str(out)])
    assert_one_line_error(result, str(out), "in use by another asrshrink run", f"pid {proc.pid}", "choose another -o")
    assert snapshot(tmp_path) == before


def test_the_lock_is_released_when_its_holder_is_killed(holder, assets):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = runner.invoke(app, ["svd", str(assets.native), "--rank", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json", "report.md"]
    assert not lock_path(out).exists()


def test_lock_file_names_the_holder(tmp_path):
    out = tmp_path / "o"
    with OutputLock(out):
        record = json.loads(lock_path(out).read_text())
        assert record["pid"] == os.getpid() and "command" in record
        with pytest.raises(Exception, match="in use by another asrshrink run"):
            # flock locks belong to the open file description: a second open in this process conflicts too
            OutputLock(out).acquire()
    assert not lock_path(out).exists()


def _earlier_output(assets: Assets, tmp_path: Path) -> Path:
    return copy_folder(assets.svd_out, tmp_path / "out")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_a_full_disk_while_writing_the_model_leaves_the_folder_as_it_was(code, assets, tmp_path, monkeypatch):
    out = _earlier_output(assets, tmp_path)
    before = snapshot(tmp_path)

    def full(fd):
        raise OSError(code, os.strerror(code), "model.safetensors")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    result = runner.invoke(app, ["svd", str(assets.native), "--rank", "3", "-o", str(out)])
    assert_one_line_error(result, os.strerror(code), "free disk space")
    assert snapshot(tmp_path) == before


def test_a_report_that_cannot_be_written_publishes_no_model(assets, tmp_path, monkeypatch):
    import asrshrink.report as report_module

    out = _earlier_output(assets, tmp_path)
    before = snapshot(tmp_path)

    def refuse(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report_module, "write_text_atomic", refuse)
    result = runner.invoke(app, ["prune", str(assets.native), "--sparsity", "0.3", "-o", str(out)])
    assert_one_line_error(result, "report.md", "No space left on device")
    assert snapshot(tmp_path) == before


def test_a_full_disk_during_psvd_leaves_no_progress_behind(assets, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = checkpoint.os.fsync

    def full_on_second(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), ".progress/model.safetensors")
        return real(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", full_on_second)
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["psvd", str(assets.native), "--calib", str(assets.data), "--iterations", "1",
                                 "-o", str(tmp_path / "out")])
    assert_one_line_error(result, "No space left on device")
    assert calls["n"] == 2 and snapshot(tmp_path) == before


def test_a_real_file_size_limit_gives_one_line_and_no_output(assets, tmp_path):
    """RLIMIT_FSIZE makes the kernel itself refuse the write (EFBIG): no monkeypatching."""
    out = tmp_path / "out"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "asrshrink", "svd", str(assets.native), "--rank", "3", "-o",
                           str(out)], capture_output=True, text=True, preexec_fn=limit, cwd=REPO, timeout=120,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "300"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "File too large" in lines[-1] and "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before


# --- resume --------------------------------------------------------------------------------------------------

@pytest.fixture()
def interrupted(assets, tmp_path) -> Path:
    return copy_folder(assets.interrupted, tmp_path / "psvd-out")


@pytest.mark.parametrize("option, value, saved", [
    ("--rank-threshold", "0.4", "0.25"), ("--iterations", "5", "2"), ("--variant", "joint", "paper"),
    ("--mode", "rollout", "stacked"), ("--num-utterances", "2", "3"), ("--refits", "2", "1"),
    ("--components", "prediction", "encoder"), ("--seed", "7", "0"), ("--rank", "3", "(none)"),
])
def test_resume_refuses_a_contradicting_option(option, value, saved, interrupted, tmp_path):
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["psvd", "--resume", str(interrupted), option, value])
    assert_one_line_error(result, f"{option} {value} contradicts", f"used {saved}", f"drop {option}")
    assert snapshot(tmp_path) == before


def test_resume_refuses_another_model_and_another_output(interrupted, assets, tmp_path):
    before = snapshot(tmp_path)
    assert_one_line_error(runner.invoke(app, ["psvd", str(assets.svd_out), "--resume", str(interrupted)]),
                          "not the model the interrupted run", "drop MODEL")
    assert_one_line_error(runner.invoke(app, ["psvd", "--resume", str(interrupted), "-o", str(tmp_path / "x")]),
                          "-o", "contradicts --resume")
    assert snapshot(tmp_path) == before


def test_resume_accepts_options_that_agree_and_the_same_model(interrupted, assets):
    result = runner.invoke(app, ["psvd", str(assets.native), "--resume", str(interrupted), "--rank-threshold",
                                 "0.25", "--iterations", "2", "--calib", str(assets.data)])
    assert result.exit_code == 0, result.output
    assert not (interrupted / ".progress").exists()
    assert json.loads((interrupted / "report.json").read_text())["options"]["psvd"]["iterations"] == 2


def test_resume_refuses_a_checkpoint_whose_options_disagree(interrupted, tmp_path):
    """The issue's silent mix: options.json from one run, the progress model from another."""
    path = interrupted / ".progress" / "options.json"
    saved = json.loads(path.read_text())
    saved["svd"]["threshold"] = 0.4
    path.write_text(json.dumps(saved))
    before = snapshot(tmp_path)
    assert_one_line_error(runner.invoke(app, ["psvd", "--resume", str(interrupted)]), "svd.threshold",
                          "0.25 there, 0.4 here")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", [["svd", "--rank", "2"], ["prune", "--sparsity", "0.5"],
                                     ["psvd", "--iterations", "1"]])
def test_a_fresh_run_does_not_discard_an_interrupted_one(command, interrupted, assets, tmp_path):
    before = snapshot(tmp_path)
    result = runner.invoke(app, [command[0], str(assets.native), *command[1:], "--calib", str(assets.data),
                                 "-o", str(interrupted)] if command[0] == "psvd" else
                           [command[0], str(assets.native), *command[1:], "-o", str(interrupted)])
    assert_one_line_error(result, "holds an interrupted psvd run", f"--resume {interrupted}")
    assert snapshot(tmp_path) == before


def test_ctrl_c_before_the_first_layer_leaves_nothing(assets, tmp_path, monkeypatch):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    import asrshrink.methods.psvd as psvd_method

    monkeypatch.setattr(psvd_method, "psvd", stop)
    before = snapshot(tmp_path)
    result = runner.invoke(app, ["psvd", str(assets.native), "--calib", str(assets.data), "-o",
                                 str(tmp_path / "out")])
    assert result.exit_code == 130 and "nothing to resume" in result.output
    assert snapshot(tmp_path) == before

"""Calibration across processes (torchrun, gloo on CPU): each process walks its shard of the calibration set
and the statistics are summed before each solve, so two processes give the one-process model."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from asrshrink.cli.main import app
from asrshrink.models.checkpoint import load_model, save_model
from asrshrink.models.layers import matrices
from tests.methods.test_conformer_methods import tiny as tiny_conformer
from tests.methods.test_psvd import tiny as tiny_rnnt

runner = CliRunner()


@pytest.mark.parametrize("family, command", [
    ("rnnt", ["psvd", "--rank-threshold", "0.3", "--iterations", "2"]),
    ("conformer", ["psvd", "--rank-threshold", "0.3", "--iterations", "1", "--data-aware"]),
    ("conformer", ["prune", "--sparsity", "0.5", "--method", "sparsegpt"]),
])
def test_two_processes_give_the_one_process_model(family, command, tmp_path):
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, text in enumerate(["a b c", "ab ba", "cab", "a a b", "bac ca", "c"]):  # spelt by both vocabularies
        sf.write(calib / f"u{i}.wav", (0.1 * rng.standard_normal(3000 + 700 * i)).astype(np.float32), 16000)
        (calib / f"u{i}.txt").write_text(text)
    source = save_model(tiny_rnnt() if family == "rnnt" else tiny_conformer(), tmp_path / "source")
    args = [command[0], str(source), *command[1:], "--calib", str(calib)]
    single = runner.invoke(app, [*args, "-o", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "asrshrink", *args, "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                           "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "shared by 2 processes" in run.stdout + run.stderr
    reference = effective(load_model(source)[0])
    one, _ = load_model(tmp_path / "one" / "model.safetensors")
    two, _ = load_model(tmp_path / "two" / "model.safetensors")
    changed = 0
    assert effective(one).keys() == effective(two).keys()
    for (name, a), (_, b) in zip(effective(one).items(), effective(two).items()):
        # float32 sums over other batch compositions differ in their last bits; the least-squares fits carry
        # that to ~1e-5 (without the all-reduce the shards' fits differ by ~1e-1)
        assert float((a - b).abs().max()) <= 2e-4 * max(1.0, float(a.abs().max())), name
        changed += not torch.equal(a, reference[name]) if name in reference else 1
    assert changed > 0  # the method did compress something


def effective(model):
    """Every matrix as its effective weight (low-rank factors are defined up to signs) and every other tensor."""
    out = {f"{name}.{side}": m.weight for name, module in model.named_modules()
           for side, m in matrices(module).items()}
    return {**out, **{k: v for k, v in model.state_dict().items() if not k.endswith((".up", ".down", "weight"))}}


def _training_speech(tmp_path, seed):
    """Eight short noise utterances with transcripts spelt by the tiny model's vocabulary."""
    rng = np.random.default_rng(seed)
    data = tmp_path / "speech"
    data.mkdir()
    for i, text in enumerate(["a b c", "ab ba", "cab", "a a b", "bac ca", "c", "abc", "ba"]):
        sf.write(data / f"u{i}.wav", (0.1 * rng.standard_normal(3000 + 500 * i)).astype(np.float32), 16000)
        (data / f"u{i}.txt").write_text(text)
    return data


def test_two_process_distillation_equals_one_process_with_the_same_global_batch(tmp_path):
    data = _training_speech(tmp_path, seed=1)
    teacher = save_model(tiny_rnnt(), tmp_path / "teacher")
    common = ["distill", str(teacher), "--data", str(data), "--student-config", '{"encoder_hidden": 16}',
              "--kd-weight", "0.5", "--steps", "6", "--lr", "3e-3", "--no-spec-augment", "--checkpoint-every", "3"]
    single = runner.invoke(app, [*common, "--max-batch", "4", "--max-frames", "4000", "-o", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "asrshrink", *common, "--max-batch", "2", "--max-frames", "2000",
                          "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1",
                                                                           "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    one, _ = load_model(tmp_path / "one" / "model.safetensors")
    two, _ = load_model(tmp_path / "two" / "model.safetensors")
    start, _ = load_model(teacher)
    assert one.state_dict().keys() == two.state_dict().keys()
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        # the per-label transducer loss is exact across the shards; the lattice KD term (a mean over each
        # share's lattice nodes, weighted by labels) is close, not exact
        assert float((a - b).abs().max()) <= 5e-4, name  # measured 7e-5; a step moves weights by ~3e-3
    assert not torch.equal(one.state_dict()["joint_net.output.weight"], start.state_dict()["joint_net.output.weight"])


def _cmdline(proc) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def _killed_run_resumes_to_the_uninterrupted_parameters(command: list[str], tmp_path, steps: int):
    """Run ``command`` to the end (-o straight); run it again (-o killed), kill -9 every process of it (the
    launcher and, under torchrun, its workers, which start sessions of their own) once its first checkpoint is
    written, then --resume it: the final parameters equal the uninterrupted run's. Returns both models."""
    import os
    import signal
    import time

    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}

    def run(*extra):
        done = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run("-o", str(tmp_path / "straight"))
    killed = subprocess.Popen([*command, "-o", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    checkpoint = tmp_path / "killed" / ".progress" / "train_state.pt"
    deadline = time.monotonic() + 240
    while not checkpoint.is_file() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    mine = [killed.pid] + [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) !=
                           killed.pid and str(tmp_path / "killed").encode() in _cmdline(p)]
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed.wait()
    while any(Path(f"/proc/{pid}").exists() and _cmdline(Path(f"/proc/{pid}")) for pid in mine[1:]):
        time.sleep(0.02)
    assert checkpoint.is_file() and not (tmp_path / "killed" / "model.safetensors").exists()
    assert 0 < torch.load(checkpoint, weights_only=True)["step"] < steps
    run("--resume", str(tmp_path / "killed"))
    a, _ = load_model(tmp_path / "straight" / "model.safetensors")
    b, _ = load_model(tmp_path / "killed" / "model.safetensors")
    assert a.state_dict().keys() == b.state_dict().keys()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    return a, b


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the run's processes in /proc")
@pytest.mark.parametrize("processes", [1, 2])
def test_distillation_killed_with_sigkill_resumes_to_the_uninterrupted_parameters(processes, tmp_path):
    """kill -9 (no checkpoint on the way out) after the first checkpoint, then --resume (under torchrun for two
    processes): the final parameters equal an uninterrupted run's."""
    data = _training_speech(tmp_path, seed=2)
    teacher = save_model(tiny_rnnt(), tmp_path / "teacher")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
              "-m", "asrshrink"] if processes > 1 else [sys.executable, "-m", "asrshrink"]
    _killed_run_resumes_to_the_uninterrupted_parameters(
        [*launch, "distill", str(teacher), "--data", str(data), "--student-config", '{"encoder_hidden": 16}',
         "--kd-weight", "0.5", "--steps", "60", "--lr", "3e-3", "--checkpoint-every", "3", "--max-batch", "2",
         "--max-frames", "2000"], tmp_path, steps=60)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the run's processes in /proc")
def test_amnet_finetune_killed_with_sigkill_resumes_to_the_uninterrupted_parameters(tmp_path):
    """kill -9 an amnet-finetune run (sparse branches on the gradual schedule, random then Gumbel phases, an
    L_amr stage) after its first checkpoint, then --resume: the final parameters and masks equal an
    uninterrupted run's."""
    data = _training_speech(tmp_path, seed=3)
    source = save_model(tiny_rnnt(), tmp_path / "source")
    a, _ = _killed_run_resumes_to_the_uninterrupted_parameters(
        [sys.executable, "-m", "asrshrink", "amnet-finetune", str(source), "--data", str(data),
         "--branches", "sparse", "--prune-until", "20", "--prune-every", "5", "--random-steps", "20",
         "--entropy-threshold", "2.0", "--amr-steps", "15", "--steps", "60", "--lr", "3e-3",
         "--checkpoint-every", "3", "--max-batch", "2", "--max-frames", "2000", "--arbitrator-hidden", "8"],
        tmp_path, steps=60)
    assert a.arbitrator is not None

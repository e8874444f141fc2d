"""kill -9 at random moments of a real ``asrshrink psvd`` run, then ``--resume``: is the result byte-identical
to an uninterrupted run?

    python benchmarks/psvd_kill_resume.py [--trials 20] [--seed 0] [--num-utterances 24] [--iterations 3]

Every run is the real CLI in a subprocess (``python -m asrshrink psvd``) on the bundled reference model and
``--num-utterances`` bundled calibration utterances, ``--rank-threshold 0.2``. Two uninterrupted runs give
the reference ``model.safetensors`` (and show that it is reproducible), the number L of layer fits and the
mean time between two of them. Each trial starts the same command into its own folder and kills it
(SIGKILL) at a random moment among the layer fits, where an interruption has something to lose: it reads
the run's per-layer log lines, and after the k-th (k seeded, uniform in 1..L) waits a random part (uniform)
of one layer's time. Then it does what the CLI says: ``psvd --resume OUT`` (when the kill came after the last
layer and the run had already finished, there is nothing to resume). A trial counts as byte-identical when
OUT/model.safetensors has the reference's sha256, OUT holds exactly model.safetensors, report.json and
report.md, and nothing (lock, staging folder) is left beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "200"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def timed_run(command: list[str]) -> tuple[float, tuple[float, float, int]]:
    """Run ``command`` to the end; its wall time, and when (seconds after the start) its first and last
    per-layer log lines ("iteration N layer ...") appeared and how many there were."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stamps = [time.perf_counter() - start for line in proc.stderr if line.startswith("iteration ")]
    if proc.wait() != 0 or not stamps:
        raise SystemExit(f"the uninterrupted run failed: {command}")
    return time.perf_counter() - start, (stamps[0], stamps[-1], len(stamps))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "asrshrink", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-utterances", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    options = ["--rank-threshold", "0.2", "--num-utterances", str(args.num_utterances),
               "--iterations", str(args.iterations)]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        times, windows = [], []
        for name in ("reference", "reference-again"):
            total, window = timed_run(cli("psvd", *options, "-o", str(tmp / name)))
            times.append(total)
            windows.append(window)
        reference = sha256(tmp / "reference" / "model.safetensors")
        assert sha256(tmp / "reference-again" / "model.safetensors") == reference, "two runs differ"
        layers_total = windows[0][2]
        gap = sum((w[1] - w[0]) / max(w[2] - 1, 1) for w in windows) / len(windows)
        print(f"two uninterrupted runs: {times[0]:.1f} s and {times[1]:.1f} s, the same model (sha256 "
              f"{reference[:16]}…); {layers_total} layer fits, {gap:.2f} s apart on average")
        identical, kinds = 0, {"resumed": 0, "restarted": 0, "finished before the kill": 0}
        for trial in range(args.trials):
            parent = tmp / f"trial{trial:02d}"
            parent.mkdir()
            out = parent / "out"
            # A random moment among the layer fits: after the k-th per-layer log line, a random part of one
            # layer's time (the reference runs' mean gap between two such lines).
            k = rng.randrange(layers_total)
            delay = rng.uniform(0.0, gap)
            started = time.perf_counter()
            proc = subprocess.Popen(cli("psvd", *options, "-o", str(out)), env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            seen = 0
            for line in proc.stderr:
                if line.startswith("iteration "):
                    seen += 1
                    if seen == k + 1:
                        break
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            when = time.perf_counter() - started
            layers = "?"
            resumed = subprocess.run(cli("psvd", "--resume", str(out)), env=ENV, capture_output=True, text=True)
            if resumed.returncode == 0:
                kind = "resumed"
                line = next((x for x in resumed.stderr.splitlines() if x.startswith("resuming")), "")
                layers = line.removeprefix("resuming ")
            elif ("no finished layer to resume from" in resumed.stderr
                  or ("no interrupted run to resume here" in resumed.stderr and not (out / "report.json").is_file())):
                kind = "restarted"
                subprocess.run(cli("psvd", *options, "-o", str(out)), env=ENV, check=True, capture_output=True)
            elif "no interrupted run to resume here" in resumed.stderr and (out / "report.json").is_file():
                kind = "finished before the kill"
            else:
                raise SystemExit(f"trial {trial}: unexpected resume result {resumed.returncode}: "
                                 f"{resumed.stderr.strip().splitlines()[-1:]}")
            kinds[kind] += 1
            files = sorted(p.name for p in out.iterdir())
            leftovers = sorted(p.name for p in parent.iterdir() if p.name != "out")
            same = (files == ["model.safetensors", "report.json", "report.md"] and not leftovers
                    and sha256(out / "model.safetensors") == reference)
            identical += same
            print(f"trial {trial + 1:2d}: kill -9 {delay:.2f} s after layer fit {k + 1} ({when:.1f} s), {kind}"
                  + (f" ({layers})" if kind == "resumed" else "")
                  + (": byte-identical" if same else f": DIFFERENT (files {files}, left beside {leftovers})"),
                  flush=True)
        print(f"{identical}/{args.trials} byte-identical "
              f"({', '.join(f'{n} {k}' for k, n in kinds.items())})")


if __name__ == "__main__":
    main()

"""Two ``asrshrink psvd`` runs on one ``-o`` at the same time: does the second always refuse?

    python benchmarks/concurrent_output.py [--trials 20] [--num-utterances 8]

Each trial starts run A (the real CLI in a subprocess, bundled model, ``--num-utterances`` bundled
calibration utterances, 2 iterations), waits until A holds the folder's lock (its lock file names A's pid),
then starts run B with the same command and ``-o``. The trial passes when B exits with code 2 and one
``error:`` line saying the folder is in use by A's pid, A exits 0, and A was still running when B ended
(so the two really overlapped). Prints "N/20 refused".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "COLUMNS": "300"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--num-utterances", type=int, default=8)
    args = parser.parse_args()
    refused = 0
    with tempfile.TemporaryDirectory() as tmp:
        for trial in range(args.trials):
            out = Path(tmp) / f"trial{trial:02d}" / "out"
            command = [sys.executable, "-m", "asrshrink", "psvd", "--num-utterances", str(args.num_utterances),
                       "--iterations", "2", "-o", str(out)]
            a = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            lock = out.parent / f".{out.name}.lock"
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    if json.loads(lock.read_text() or "{}").get("pid") == a.pid:
                        break
                except (OSError, ValueError):
                    pass
                time.sleep(0.02)
            b = subprocess.run(command, env=ENV, capture_output=True, text=True)
            overlapped = a.poll() is None
            a_err = a.communicate()[1]
            lines = b.stderr.strip().splitlines()
            ok = (b.returncode == 2 and overlapped and a.returncode == 0 and len(lines) >= 1
                  and lines[-1].startswith("error: ") and "in use by another asrshrink run" in lines[-1]
                  and f"pid {a.pid}" in lines[-1] and "Traceback" not in b.stderr)
            refused += ok
            print(f"trial {trial + 1:2d}: B exit {b.returncode}, A exit {a.returncode}, overlapped {overlapped}: "
                  + (lines[-1] if lines else "(no output)") if not ok else
                  f"trial {trial + 1:2d}: refused ({lines[-1][:100]}…)", flush=True)
            if not ok and a_err:
                print("  A:", a_err.strip().splitlines()[-1:])
        print(f"{refused}/{args.trials} refused")


if __name__ == "__main__":
    main()

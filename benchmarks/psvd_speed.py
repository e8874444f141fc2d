"""Wall time and peak memory of 3-iteration PSVD at threshold 0.2 on an MLPerf-size RNN-T (45.3 M parameters),
through the same code path as ``asrshrink psvd`` (audio files read from disk, featurized, per-layer progress
checkpoints written).

    python benchmarks/psvd_speed.py [--utterances 400] [--seconds 7] [--iterations 3] [--threads 2]

Random weights (the cost does not depend on the values) and noise audio written as 16 kHz FLAC files into a
temporary folder (an LSTM's cost does not depend on what it hears). Prints the per-layer log, the phases'
wall time and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from asrshrink import compress  # noqa: E402
from asrshrink.config import CalibConfig, SvdConfig  # noqa: E402
from asrshrink.methods.psvd import PsvdConfig  # noqa: E402
from asrshrink.models.checkpoint import save_model  # noqa: E402
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=7.0)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = save_model(MlperfRnnt(MlperfRnntConfig()).eval(), tmp / "model")
        audio = tmp / "calib"
        audio.mkdir()
        for i in range(args.utterances):
            n = int(args.seconds * 16000 * rng.uniform(0.8, 1.2))
            sf.write(audio / f"u{i:04d}.flac", (0.05 * rng.standard_normal(n)).astype(np.float32), 16000)
            (audio / f"u{i:04d}.txt").write_text("calibration")
        print(f"MLPerf-size model, {args.utterances} utterances of about {args.seconds:.0f} s, "
              f"{args.threads} threads, peak memory so far {peak_gb():.2f} GB", flush=True)
        started = time.perf_counter()
        marks = [("start", started)]

        def log(line: str) -> None:
            now = time.perf_counter()
            print(f"{now - started:7.1f} s  {line}", flush=True)
            marks.append((line, now))

        report = compress.run(
            "psvd", model=str(model_path), out=tmp / "out", svd=SvdConfig(threshold=args.threshold),
            calib=CalibConfig(path=str(audio), num_utterances=args.utterances, max_duration=None),
            post=PsvdConfig(iterations=args.iterations), log=log)
        total = time.perf_counter() - started
    print(f"total wall time {total:.1f} s ({total / 60:.1f} min); peak resident memory {peak_gb():.2f} GB")
    print(f"encoder compression ratio {report['compression_ratio']['by_component']['encoder']:.2f}; "
          f"calibration {report['options']['calib_used']['feature_frames']} feature frames")


if __name__ == "__main__":
    main()

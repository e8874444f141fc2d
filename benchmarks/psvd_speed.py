"""Wall time and peak memory of 3-iteration PSVD at threshold 0.2 on an MLPerf-size RNN-T (45.3 M parameters).

    python benchmarks/psvd_speed.py [--utterances 400] [--seconds 7] [--iterations 3] [--threads 2]

Random weights (the cost does not depend on the values) and noise audio (an LSTM's cost does not depend on
what it hears); the calibration audio is featurized as a real run does. Prints one table row per phase and
the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from asrshrink.api import batches_by_duration, featurize  # noqa: E402
from asrshrink.methods.psvd import PsvdConfig, psvd  # noqa: E402
from asrshrink.methods.svd import choose_ranks, svd_compress  # noqa: E402
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig  # noqa: E402


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=7.0)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    model = MlperfRnnt(MlperfRnntConfig()).eval()
    print(f"MLPerf-size model: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{args.utterances} utterances of about {args.seconds:.0f} s; {args.threads} threads")
    rows = []

    t = time.perf_counter()
    lengths = (args.seconds * 16000 * rng.uniform(0.8, 1.2, args.utterances)).astype(int)
    batches = []
    for group in batches_by_duration(list(lengths / 16000), max_seconds=float("inf"), max_batch=args.batch):
        waves = [(0.05 * rng.standard_normal(int(lengths[i]))).astype(np.float32) for i in group]
        feats, feat_lengths = featurize(model, waves)
        batches.append({"features": feats, "feature_lengths": feat_lengths})
    rows.append(("featurize calibration audio", time.perf_counter() - t))

    t = time.perf_counter()
    choices = choose_ranks(model, ["encoder"], threshold=args.threshold)
    compressed = svd_compress(model, choices)
    rows.append(("truncated SVD of 10 encoder matrices", time.perf_counter() - t))

    t = time.perf_counter()
    layer_times = []
    psvd(model, compressed, batches, PsvdConfig(iterations=args.iterations),
         on_layer=lambda report, *_: layer_times.append((report.iteration, report.layer, report.seconds)))
    rows.append((f"PSVD, {args.iterations} iterations", time.perf_counter() - t))
    total = time.perf_counter() - started
    print(f"{'phase':<40}{'seconds':>10}")
    for name, seconds in rows:
        print(f"{name:<40}{seconds:>10.1f}")
    print(f"{'total (including model build)':<40}{total:>10.1f}")
    print(f"peak resident memory: {peak_gb():.2f} GB")
    print("per layer fit (statistics + solve) seconds: " +
          ", ".join(f"{it}:{name.split('encoder.')[-1]} {s:.1f}" for it, name, s in layer_times))
    before = sum(p.numel() for p in model.encoder.parameters())
    after = sum(p.numel() for p in compressed.encoder.parameters())
    print(f"encoder parameters {before:,} -> {after:,} (ratio {before / after:.2f})")


if __name__ == "__main__":
    main()

"""onnxruntime encoder throughput (audio seconds per wall second) of dense and compressed RNN-Ts, next to their
FLOP reduction: does a factorised layer's saving in FLOPs turn into speed once exported?

    python benchmarks/onnx_speed.py [--seconds 10] [--batch 1] [--repeats 5] [--threads 1 2]
                                    [--psvd-utterances 40] [--no-mlperf]

Models: the bundled reference model dense, after SVD at threshold 0.2 and after PSVD at threshold 0.2
(calibrated on ``--psvd-utterances`` bundled calibration utterances, one iteration: its ranks, so its cost,
are SVD's), and an MLPerf-size model (45.3 M parameters, random weights: the cost does not depend on the
values) dense and after SVD at threshold 0.2. Each is exported as ``asrshrink export`` does (encoder.onnx,
the float model); the encoder runs on ``--batch`` utterances of ``--seconds`` seconds of noise features (an
LSTM's cost does not depend on what it hears), best of ``--repeats`` runs. FLOPs are the encoder's per
encoder frame (``asrshrink info``); "speed-up / FLOP cut" near 1 means the saving in FLOPs is all there in
wall time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import onnx  # noqa: E402
import torch  # noqa: E402

from asrshrink import api, compress  # noqa: E402
from asrshrink.config import CalibConfig, SvdConfig  # noqa: E402
from asrshrink.export.onnx import to_onnx  # noqa: E402
from asrshrink.export.runtime import session  # noqa: E402
from asrshrink.methods.psvd import PsvdConfig  # noqa: E402
from asrshrink.methods.svd import choose_ranks, svd_compress  # noqa: E402
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig  # noqa: E402


def models(tmp: Path, psvd_utterances: int, mlperf: bool) -> list[tuple[str, str, api.Transducer]]:
    """(family of models, name, model): each family's first model is its dense baseline."""
    svd = SvdConfig(threshold=0.2)
    reference, _ = api.load_model()
    cases = [("bundled", "dense", reference),
             ("bundled", "svd 0.2", svd_compress(reference, choose_ranks(reference, ["encoder"], threshold=0.2)))]
    if psvd_utterances > 0:
        compress.run("psvd", model=None, out=tmp / "psvd", svd=svd,
                     calib=CalibConfig(num_utterances=psvd_utterances), post=PsvdConfig(iterations=1))
        cases.append(("bundled", "psvd 0.2", api.load_model(tmp / "psvd")[0]))
    if mlperf:
        torch.manual_seed(0)
        big = MlperfRnnt(MlperfRnntConfig()).eval()
        cases += [("mlperf", "dense", big),
                  ("mlperf", "svd 0.2", svd_compress(big, choose_ranks(big, ["encoder"], threshold=0.2)))]
    return cases


def throughput(path: Path, features: torch.Tensor, threads: int, repeats: int, frame_seconds: float) -> float:
    """Audio seconds per wall second of encoder.onnx at ``path`` on ``features`` (B, T, F), best of ``repeats``;
    each feature frame stands for ``frame_seconds`` of audio."""
    encoder = session(path, threads)
    batch, frames = features.shape[:2]
    feeds = {"features": features.numpy(), "feature_lengths": torch.full((batch,), frames).numpy()}
    encoder.run(None, feeds)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encoder.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return batch * frames * frame_seconds / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--psvd-utterances", type=int, default=40, help="0 skips the PSVD model")
    parser.add_argument("--no-mlperf", action="store_true", help="skip the MLPerf-size model")
    args = parser.parse_args()
    import onnxruntime

    print(f"encoder.onnx on {args.batch} x {args.seconds:.0f} s of audio, best of {args.repeats}; "
          f"onnxruntime {onnxruntime.__version__}, {os.cpu_count()} CPUs")
    speed_columns = "".join(f"{f'{t} thr a/w':>12}{'speed-up':>10}{'/FLOP cut':>10}" for t in args.threads)
    print(f"{'model':<20}{'enc MFLOPs/fr':>14}{'FLOP cut':>10}{speed_columns}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline: dict[str, tuple[float, dict[int, float]]] = {}
        for family, name, model in models(tmp, args.psvd_utterances, not args.no_mlperf):
            path = tmp / f"{family}-{name.replace(' ', '-')}.onnx"
            onnx.save(to_onnx(model)["encoder"], path)
            flops = api.describe(model)["flops"]["encoder_per_frame"]
            # A feature frame is 30 ms of audio for the MLPerf featurizer: 10 ms hop, 3 frames spliced into one
            # (FeatureConfig.frame_shift_seconds), so --seconds of audio is seconds / 0.03 frames.
            frame_seconds = model.feature_config.frame_shift_seconds
            torch.manual_seed(0)
            features = torch.randn(args.batch, round(args.seconds / frame_seconds), model.feature_config.feature_dim)
            speeds = {t: throughput(path, features, t, args.repeats, frame_seconds) for t in args.threads}
            base_flops, base_speeds = baseline.setdefault(family, (flops, speeds))
            cut = base_flops / flops
            cells = "".join(f"{speeds[t]:>12.1f}{speeds[t] / base_speeds[t]:>10.2f}"
                            f"{speeds[t] / base_speeds[t] / cut:>10.2f}" for t in args.threads)
            print(f"{family + ' ' + name:<20}{flops / 1e6:>14.2f}{cut:>10.2f}{cells}", flush=True)


if __name__ == "__main__":
    main()

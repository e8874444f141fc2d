"""Decoding speed (audio seconds per wall second) of an MLPerf-size RNN-T (45.3 M parameters) and a small one.

    python benchmarks/eval_speed.py [--threads 2] [--utterances 16] [--seconds 7]

Random weights decode degenerately (30 labels at every frame), so the joint's blank logit is shifted until
about one label is emitted per encoder frame (60 ms; read speech runs at about 15 characters per second),
which makes the decoder's share of the time realistic. The audio is noise: the cost of an LSTM does not
depend on what it hears. Prints a table: featurize + encode + greedy decode, batch 1 and batched.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from asrshrink.api import encode, featurize  # noqa: E402
from asrshrink.evaluate.decoding import greedy_decode  # noqa: E402
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig  # noqa: E402

SIZES = {
    "mlperf (45.3 M)": MlperfRnntConfig(),
    "small (3.5 M)": MlperfRnntConfig(encoder_hidden=256, pred_hidden=256, pred_layers=1, joint_hidden=256),
}


def calibrate_blank(model: MlperfRnnt, waves: list[np.ndarray], labels_per_frame: float = 1.0) -> float:
    """Shift the blank logit until greedy decoding emits about ``labels_per_frame`` labels per frame."""
    feats, lengths = featurize(model, waves[:2])
    enc, enc_lengths = encode(model, feats, lengths)
    lo, hi = -20.0, 20.0
    bias = model.joint_net.output.bias
    base = float(bias[model.vocabulary.blank])
    for _ in range(12):
        mid = (lo + hi) / 2
        with torch.no_grad():
            bias[model.vocabulary.blank] = base + mid
        rate = sum(map(len, greedy_decode(model, enc, enc_lengths))) / int(enc_lengths.sum())
        lo, hi = (mid, hi) if rate > labels_per_frame else (lo, mid)
    return rate


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(model: MlperfRnnt, waves: list[np.ndarray], batch: int) -> tuple[float, float]:
    """Seconds for featurize + encode, and for greedy decoding, over all waves in batches of ``batch``."""
    t_enc = t_dec = 0.0
    for i in range(0, len(waves), batch):
        chunk = waves[i:i + batch]
        out = {}
        t_enc += timed(lambda: out.update(zip(("f", "l"), featurize(model, chunk))) or
                       out.update(zip(("e", "el"), encode(model, out["f"], out["l"]))))
        t_dec += timed(lambda: greedy_decode(model, out["e"], out["el"]))
    return t_enc, t_dec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--utterances", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=7.0)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    waves = [(0.05 * rng.standard_normal(int(args.seconds * 16000))).astype(np.float32)
             for _ in range(args.utterances)]
    audio = args.utterances * args.seconds
    print(f"{args.utterances} utterances x {args.seconds:.0f} s, {args.threads} threads, torch {torch.__version__}")
    print(f"{'model':<18}{'params':>12}{'batch':>7}{'labels/frame':>14}{'encode s':>10}{'decode s':>10}"
          f"{'audio s / wall s':>18}")
    for name, config in SIZES.items():
        torch.manual_seed(0)
        model = MlperfRnnt(config).eval()
        rate = calibrate_blank(model, waves)
        params = sum(p.numel() for p in model.parameters())
        for batch in (1, args.batch):
            t_enc, t_dec = run(model, waves, batch)
            print(f"{name:<18}{params:>12,}{batch:>7}{rate:>14.2f}{t_enc:>10.1f}{t_dec:>10.1f}"
                  f"{audio / (t_enc + t_dec):>18.1f}", flush=True)


if __name__ == "__main__":
    main()

"""Decoding speed (audio seconds per wall second) of an MLPerf-size RNN-T (45.3 M parameters), a small one, and a
Conformer transducer of NeMo's Conformer-Small size (d_model 176, 16 layers, 4 heads, kernel 31, 1,024 tokens).

    python benchmarks/eval_speed.py [--threads 2] [--utterances 16] [--seconds 7]

Random weights decode degenerately (they never emit blank, so 30 labels at every frame). The benchmark
therefore decodes random-weight models with at most one label per frame: exactly one label per 60 ms frame,
close to read speech (about 15 characters per second, 0.9 labels per frame). A trained model's real decode
also spends a blank evaluation of the joint per frame, which is cheap next to the prediction step. When the
bundled reference model is installed it is also measured on the bundled test sample, decoding normally.
The random-weight audio is noise: an LSTM's or a Conformer's cost does not depend on what it hears (the
Conformer's attention grows with the utterance length, which is the same for every row). Prints a table:
featurize + encode, greedy decode, and audio seconds per wall second, batch 1 and batched.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from asrshrink.api import encode, featurize, load_model, open_dataset  # noqa: E402
from asrshrink.evaluate.decoding import greedy_decode  # noqa: E402
from asrshrink.models.base import Transducer  # noqa: E402
from asrshrink.models.checkpoint import ASSETS, DEFAULT_MODEL  # noqa: E402
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig  # noqa: E402
from asrshrink.models.nemo_conformer import NemoConformerConfig, NemoConformerTransducer  # noqa: E402

#: NeMo's stt_en_conformer_transducer_small sizes (random weights, a 1,024-token vocabulary).
CONFORMER_SMALL = NemoConformerConfig(
    d_model=176, n_layers=16, n_heads=4, conv_kernel_size=31, subsampling="striding", subsampling_factor=4,
    subsampling_conv_channels=176, pred_hidden=320, pred_rnn_layers=1, joint_hidden=320,
    vocabulary={"labels": [f"<{i}>" for i in range(1024)], "blank": 1024})
SIZES = {
    "mlperf (45.3 M)": lambda: MlperfRnnt(MlperfRnntConfig()),
    "small (3.5 M)": lambda: MlperfRnnt(MlperfRnntConfig(encoder_hidden=256, pred_hidden=256, pred_layers=1,
                                                         joint_hidden=256)),
    "conformer-small": lambda: NemoConformerTransducer(CONFORMER_SMALL),
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(model: Transducer, waves: list[np.ndarray], batch: int, max_symbols: int) -> tuple[float, float]:
    """Seconds for featurize + encode, and for greedy decoding, over all waves in batches of ``batch``."""
    t_enc = t_dec = 0.0
    for i in range(0, len(waves), batch):
        chunk = waves[i:i + batch]
        out = {}
        t_enc += timed(lambda: out.update(zip(("f", "l"), featurize(model, chunk))) or
                       out.update(zip(("e", "el"), encode(model, out["f"], out["l"]))))
        t_dec += timed(lambda: greedy_decode(model, out["e"], out["el"], max_symbols))
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
    print(f"{args.utterances} utterances x {args.seconds:.0f} s, {args.threads} threads, torch {torch.__version__}")
    print(f"{'model':<24}{'params':>12}{'batch':>7}{'audio s':>9}{'encode s':>10}{'decode s':>10}"
          f"{'audio s / wall s':>18}")
    cases = []
    for name, build in SIZES.items():
        torch.manual_seed(0)
        cases.append((name + ", random", build().eval(), waves, 1))
    if DEFAULT_MODEL.is_file() and (ASSETS / "speech" / "test").is_dir():
        model, _ = load_model(DEFAULT_MODEL)
        data = open_dataset(ASSETS / "speech" / "test", vocabulary=model.vocabulary, limit=args.utterances * 4, seed=0)
        cases.append(("bundled, trained", model, [u.audio for u in data], None))
    for name, model, audio_list, max_symbols in cases:
        params = sum(p.numel() for p in model.parameters())
        seconds = sum(len(w) for w in audio_list) / 16000
        for batch in (1, args.batch):
            t_enc, t_dec = run(model, audio_list, batch, max_symbols)
            print(f"{name:<24}{params:>12,}{batch:>7}{seconds:>9.0f}{t_enc:>10.1f}{t_dec:>10.1f}"
                  f"{seconds / (t_enc + t_dec):>18.1f}", flush=True)


if __name__ == "__main__":
    main()

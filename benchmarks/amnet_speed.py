"""Encoder wall time of an AmNet with hard switching, in PyTorch and in onnxruntime, against the dense model, as
the share of frames on the fast branch grows: does per-frame switching turn the fast branch's FLOP saving into
wall time?

    python benchmarks/amnet_speed.py [--branches mf sparse] [--ratios 0 0.25 0.5 0.75 1] [--utterances 8]
                                     [--repeats 3] [--amnet PATH] [--plot amnet_speed.png]

Without ``--amnet``, an AmNet is built from the bundled model as ``amnet-finetune`` builds it (its defaults:
MF 35 % / 60 %, sparse 15 % / 80 %, an arbitrator of 2 layers with decision feedback), with no fine-tuning
(speed does not depend on the weights' values) and an arbitrator set by hand so that its decisions follow one
input feature: every frame's first stacked feature is overwritten with +1 (fast) or -1 (slow), for a seeded
random ``ratio`` share of the decision frames (so the branch changes often, the hard case for switching), and
the arbitrator, whose weights are all zero but for that feature's path, picks the fast branch where it is
positive. Its LSTM layers and projection run at their full size, so the arbitrator costs what a trained one
does. ``--amnet PATH`` measures a saved AmNet at its own decisions instead (one row).

Features: the first ``--utterances`` of the bundled test sample, one at a time (batch 1, as a device streams
them), one thread; each figure is the best of ``--repeats`` passes over them, in milliseconds of encoder wall
time per second of audio. Rows: the dense model (PyTorch's fused LSTM, the ONNX LSTM op), and the AmNet at each
ratio (PyTorch ``encode`` with hard switching; the exported encoder.onnx, whose decisions and outputs are
checked against PyTorch's here). FLOPs per frame as ``asrshrink info`` counts them, arbitrator included.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

from asrshrink.audio.datasets import open_dataset  # noqa: E402
from asrshrink.config import AmnetConfig  # noqa: E402
from asrshrink.evaluate.amnet import frame_costs  # noqa: E402
from asrshrink.evaluate.transcribe import featurize  # noqa: E402
from asrshrink.export.onnx import to_onnx  # noqa: E402
from asrshrink.export.runtime import session  # noqa: E402
from asrshrink.models.checkpoint import DEFAULT_MODEL, bundled_speech, load_model  # noqa: E402
from asrshrink.training.amnet import build_amnet  # noqa: E402


def steer(model) -> None:
    """Make the arbitrator pick the fast branch exactly where the first feature of its input is positive: each
    LSTM layer's unit 0 becomes tanh(tanh(x)) of its input's first entry (input and output gates open, forget
    gate shut), every other weight zero, and the projection a large multiple of the last layer's unit 0."""
    arb = model.arbitrator
    h = arb.hidden_size
    with torch.no_grad():
        for p in arb.parameters():
            p.zero_()
        for k in range(arb.num_layers):
            getattr(arb.rnn, f"bias_ih_l{k}")[:h] = 10.0            # input gate
            getattr(arb.rnn, f"bias_ih_l{k}")[h:2 * h] = -10.0      # forget gate
            getattr(arb.rnn, f"bias_ih_l{k}")[3 * h:] = 10.0        # output gate
            getattr(arb.rnn, f"weight_ih_l{k}")[2 * h, 0] = 4.0     # candidate of unit 0 from the first input
        arb.proj.weight[1, 0], arb.proj.weight[0, 0] = 20.0, -20.0


def pattern(features: torch.Tensor, ratio: float, factor: int, seed: int) -> torch.Tensor:
    """features (1, T, F) with feature 0 of the first feature frame of each decision frame set to +1 on a seeded
    random ``ratio`` share of the decision frames (fast), -1 elsewhere."""
    frames = -(-features.shape[1] // factor)
    fast = torch.zeros(frames, dtype=torch.bool)
    fast[torch.randperm(frames, generator=torch.Generator().manual_seed(seed))[:round(ratio * frames)]] = True
    out = features.clone()
    out[0, ::factor, 0] = torch.where(fast, 1.0, -1.0)[:out[0, ::factor].shape[0]]
    return out


def best_of(run, inputs, repeats: int) -> float:
    """Best total seconds of ``run`` over every input, of ``repeats`` passes (after one warm-up pass)."""
    for x in inputs:
        run(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for x in inputs:
            run(x)
        best = min(best, time.perf_counter() - start)
    return best


def measure(name, model, inputs, audio, repeats, tmp: Path, check: bool) -> dict:
    """Wall time (ms per audio second) of ``model``'s encoder in PyTorch and in onnxruntime on ``inputs``."""
    path = tmp / f"{name.replace(' ', '-')}.onnx"
    onnx.save(to_onnx(model)["encoder"], path)
    ort = session(path, threads=1)
    feeds = [{"features": f.numpy(), "feature_lengths": n.numpy()} for f, n in inputs]
    row = {"name": name, "onnx_bytes": path.stat().st_size}
    amnet = model.arbitrator is not None
    with torch.no_grad():
        if amnet:
            fast, frames, q = 0, 0, []
            costs, arb = model.branch_flops(), model.arbitrator.flops_per_step()
            for (f, n), feed in zip(inputs, feeds):
                enc, _, trace = model.encode_amortized(f, n, sampling="hard")
                chosen = trace.decisions[0].argmax(-1)
                fast, frames = fast + int(chosen.sum()), frames + len(chosen)
                q.append(frame_costs(trace.decisions, costs, arb)[0])
                if check:
                    out = ort.run(None, feed)
                    if not np.array_equal(out[2][0], chosen.numpy()):
                        raise SystemExit(f"{name}: onnxruntime chose other branches than PyTorch")
                    diff = float(np.abs(out[0] - model.joint_encoder(enc).numpy()).max())
                    if diff > 1e-4:
                        raise SystemExit(f"{name}: onnxruntime's encoder output differs by {diff:.2g}")
            row["fast"] = fast / frames
            row["mflops"] = float(torch.cat(q).mean()) / 1e6
        else:
            row["fast"] = None
            row["mflops"] = model.flops()["encoder"] / 1e6
        torch_s = best_of(lambda x: model.encode(*x), inputs, repeats)
    onnx_s = best_of(lambda feed: ort.run(None, feed), feeds, repeats)
    row.update(torch_ms=1000 * torch_s / audio, onnx_ms=1000 * onnx_s / audio)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--branches", nargs="+", default=["mf", "sparse"], choices=["mf", "sparse"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amnet", type=Path, help="a saved AmNet (amnet-finetune output) to measure as it is")
    parser.add_argument("--plot", type=Path, help="also write a PNG plot (needs matplotlib)")
    parser.add_argument("--no-check", action="store_true", help="skip the PyTorch / onnxruntime agreement check")
    args = parser.parse_args()
    import onnxruntime

    torch.set_num_threads(1)
    dense, _ = load_model(DEFAULT_MODEL)
    dense.eval()
    dataset = open_dataset(bundled_speech("test", "--data"), vocabulary=dense.vocabulary,
                           sample_rate=dense.feature_config.sample_rate, limit=args.utterances)
    features = [featurize(dense, [u.audio]) for u in dataset]
    audio = sum(u.duration for u in dataset)
    print(f"encoder wall time, ms per second of audio (lower is faster): {len(features)} bundled test utterances "
          f"({audio:.1f} s), batch 1, 1 thread, best of {args.repeats}; torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows.append(measure("dense", dense, features, audio, args.repeats, tmp, False))
        if args.amnet:
            model, _ = load_model(args.amnet)
            rows.append(measure(f"amnet {args.amnet.name}", model.eval(), features, audio, args.repeats, tmp,
                                not args.no_check))
        for kind in ([] if args.amnet else args.branches):
            model = build_amnet(dense, AmnetConfig(data="-", branches=kind, sparse_schedule="magnitude")).eval()
            steer(model)
            for ratio in args.ratios:
                inputs = [(pattern(f, ratio, dense.time_reduction, seed=i), n) for i, (f, n) in enumerate(features)]
                rows.append(measure(f"{kind} fast {ratio:g}", model, inputs, audio, args.repeats, tmp,
                                    not args.no_check))
                print(f"  measured {rows[-1]['name']}", flush=True)
    base = rows[0]
    print("| model | fast-branch frames | encoder MFLOPs / frame | encoder.onnx MB | PyTorch ms / audio s | "
          "x dense | onnxruntime ms / audio s | x dense |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        fast = "" if r["fast"] is None else f"{r['fast']:.0%}"
        print(f"| {r['name']} | {fast} | {r['mflops']:.2f} | {r['onnx_bytes'] / 1e6:.2f} | {r['torch_ms']:.1f} | "
              f"{r['torch_ms'] / base['torch_ms']:.2f} | {r['onnx_ms']:.1f} | {r['onnx_ms'] / base['onnx_ms']:.2f} |")
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from asrshrink.io import atomic_write

    base = rows[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in sorted({r["name"].split()[0] for r in rows[1:]}):
        mine = [r for r in rows[1:] if r["name"].split()[0] == kind and r["fast"] is not None]
        for key, style, label in (("torch_ms", "-o", "PyTorch"), ("onnx_ms", "--s", "onnxruntime")):
            ax.plot([r["fast"] for r in mine], [r[key] for r in mine], style, label=f"{kind} AmNet, {label}")
    for key, color, label in (("torch_ms", "gray", "dense, PyTorch"), ("onnx_ms", "black", "dense, onnxruntime")):
        ax.axhline(base[key], color=color, linestyle=":", label=label)
    ax.set_xlabel("share of frames on the fast branch")
    ax.set_ylabel("encoder ms per second of audio (1 thread)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The AmNet compute and latency models (Macoskey et al. 2021, eqs. 5-7) and the figures of an AmNet model on a
dataset: branch ratios, encoder FLOPs per frame, the modelled response delay per utterance at a device speed mu,
and measured wall time with hard switching.

FLOPs are counted as ``asrshrink info`` counts them: 2 per multiply-add of the gate matmuls, per encoder output
frame (= decision frame), the layers below the time stacking counted once per feature frame they run, and the
arbitrator's decision included. The paper counts one FLOP per multiply-add (its "FLOPs/frame" equals the
parameter count for a dense encoder), so its mu = 650 MFLOP/s is 1.3 GFLOP/s here.

Dimension letters: B batch, T' decision (encoder output) frames, N branches.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from asrshrink.models.base import Transducer

#: The default device speed: this share of what the dense encoder needs to keep up with real time (the paper's
#: 650 MFLOP/s is 46 % of its baseline's 1.42 G multiply-adds per second: "less than half").
DEFAULT_MU_SHARE = 0.45


def frame_costs(decisions: torch.Tensor, branch_flops: list[int] | torch.Tensor, arbitrator_flops: int
                ) -> torch.Tensor:
    """q_t: decisions (B, T', N) -> FLOPs of each decision frame (B, T') = sum_n d_t(n) C_n + C_arbitrator
    (differentiable in soft decisions)."""
    costs = torch.as_tensor(branch_flops, dtype=decisions.dtype, device=decisions.device)
    return decisions @ costs + float(arbitrator_flops)


def _valid(q: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.arange(q.shape[1], device=q.device).unsqueeze(0) < lengths.to(q.device).unsqueeze(1)


def average_cost(q: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """L_avg (eq. 5) of each utterance: mean of q (B, T') over its own frames -> (B,)."""
    valid = _valid(q, lengths).to(q.dtype)
    return (q * valid).sum(1) / valid.sum(1).clamp(min=1)


def backlog_levels(q: torch.Tensor, lengths: torch.Tensor, budget: float) -> torch.Tensor:
    """l_t (eq. 7) at every frame: l_t = max(l_{t-1} + q_t - budget, 0) from l_0 = 0 over each utterance's own
    frames (frames past its end keep its l_T), with budget = mu / rho the FLOPs the device does while one frame
    arrives. q (B, T') -> (B, T') FLOPs; linear time, differentiable (a sub-gradient at the kinks)."""
    valid = _valid(q, lengths)
    level = q.new_zeros(q.shape[0])
    levels = []
    for t in range(q.shape[1]):
        level = torch.where(valid[:, t], torch.relu(level + q[:, t] - budget), level)
        levels.append(level)
    return torch.stack(levels, 1) if levels else q.new_zeros(q.shape[0], 0)


def backlog(q: torch.Tensor, lengths: torch.Tensor, budget: float) -> torch.Tensor:
    """l_T (eq. 7) of each utterance (B,) in FLOPs: the last of ``backlog_levels``."""
    levels = backlog_levels(q, lengths, budget)
    return levels[:, -1] if levels.shape[1] else q.new_zeros(q.shape[0])


def amortized_latency(q: torch.Tensor, lengths: torch.Tensor, mu: float, rho: float) -> torch.Tensor:
    """L_amr (eq. 6): the response delay l_T / mu in seconds of each utterance (B,), at device speed ``mu``
    FLOPs/s and ``rho`` decision frames per second."""
    return backlog(q, lengths, mu / rho) / mu


def default_mu(dense_flops: int, rho: float) -> float:
    """``DEFAULT_MU_SHARE`` of the FLOPs/s the dense encoder needs for real time."""
    return DEFAULT_MU_SHARE * dense_flops * rho


def decision_rate(model: Transducer) -> float:
    """Decision (encoder output) frames per second of audio."""
    return 1.0 / (model.feature_config.frame_shift_seconds * model.time_reduction)


def dense_equivalent(model: Transducer) -> int:
    """FLOPs per decision frame of the dense encoder an AmNet's branches stand for (every branched layer as a dense
    LSTM layer of its sizes)."""
    return sum(rate * 2 * 4 * m.hidden_size * (m.input_size + m.hidden_size)
               for name, rate in model.branch_layer_rates().items() for m in [model.get_submodule(name)])


def amnet_costs(model) -> dict[str, int] | None:
    """What the figures need of an AmNet, for a PyTorch model or an ONNX export (which stores it in its
    metadata, ``OnnxTransducer.amnet``): encoder FLOPs of a decision frame on each branch (``branch_flops``),
    the arbitrator's FLOPs per decision and parameters, and the dense equivalent's FLOPs per frame. None for a
    model that is not an AmNet."""
    if not isinstance(model, Transducer):
        return getattr(model, "amnet", None)
    if model.arbitrator is None:
        return None
    return {"branch_flops": model.branch_flops(), "arbitrator_flops": model.arbitrator.flops_per_step(),
            "arbitrator_params": sum(p.numel() for p in model.arbitrator.parameters()),
            "dense_flops": dense_equivalent(model)}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


@torch.no_grad()
def amnet_figures(model, dataset, *, mu: float | None = None, rho: float | None = None,
                  dense: Transducer | None = None, dense_flops: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Run the AmNet ``model`` with hard switching on every utterance of ``dataset`` alone (batch 1, as a
    device streams it) and return: branch ratios (slow/fast), encoder FLOPs per frame (over all frames; and the
    distribution of each utterance's mean), the modelled delay l_T / mu per utterance (mean, p90) against the
    dense encoder's at the same mu, and the encoder's wall time against ``dense`` (the original model) on the
    same features. ``dense_flops`` (default: ``dense``'s encoder FLOPs) sets the default mu. ``model`` may be
    an AmNet's ONNX export (``OnnxTransducer``), ``dense`` any model with ``encode``."""
    from asrshrink.evaluate.decoding import single_thread
    from asrshrink.evaluate.transcribe import featurize

    model.eval()
    known = amnet_costs(model)
    costs, arb = known["branch_flops"], known["arbitrator_flops"]
    if dense_flops is None:
        dense_flops = dense.flops()["encoder"] if isinstance(dense, Transducer) else known["dense_flops"]
    rho = rho if rho is not None else decision_rate(model)
    mu = mu if mu is not None else default_mu(dense_flops, rho)
    frames = [0] * len(costs)
    per_utt_flops, latency, dense_latency = [], [], []
    wall = {"amnet": 0.0, "dense": 0.0}
    audio = 0.0
    trace_of = None
    with single_thread():  # the device the latency model stands for runs one thread
        for i in range(len(dataset)):
            u = dataset[i]
            audio += u.duration
            features, lengths = featurize(model, [u.audio])
            start = time.perf_counter()
            _, enc_lengths, trace = model.encode_amortized(features, lengths, sampling="hard")
            wall["amnet"] += time.perf_counter() - start
            if dense is not None:
                start = time.perf_counter()
                dense.encode(features, lengths)
                wall["dense"] += time.perf_counter() - start
            n = int(trace.lengths[0])
            chosen = trace.decisions[0, :n].argmax(-1)
            for b in range(len(costs)):
                frames[b] += int((chosen == b).sum())
            q = frame_costs(trace.decisions, costs, arb).double()
            per_utt_flops.append(float(average_cost(q, trace.lengths)[0]))
            qd = torch.full_like(q, float(dense_flops))
            # l_t / mu in ms at every frame (eqs. 6-7); the last is the utterance's response delay
            ms, dense_ms = (backlog_levels(x, trace.lengths, mu / rho)[0, :n] * (1000 / mu) for x in (q, qd))
            latency.append(float(ms[-1]) if n else 0.0)
            dense_latency.append(float(dense_ms[-1]) if n else 0.0)
            if trace_of is None or n > len(trace_of["branch"]):  # the longest utterance's frame-by-frame trace
                trace_of = {"utterance": u.id, "duration": float(u.duration), "branch": chosen.tolist(),
                            "backlog_ms": [round(float(v), 3) for v in ms],
                            "dense_backlog_ms": [round(float(v), 3) for v in dense_ms]}
            if progress:
                progress(i + 1, len(dataset))
    total = max(sum(frames), 1)
    mean_flops = sum(f * c for f, c in zip(frames, costs)) / total + arb
    out = {
        "mu": mu, "rho": rho, "branch_flops": costs, "arbitrator_flops": arb, "dense_flops": dense_flops,
        "arbitrator_params": known["arbitrator_params"],
        "branch_ratios": [f / total for f in frames], "frames": total,
        "flops_per_frame": {"mean": mean_flops, "relative_to_dense": mean_flops / max(dense_flops, 1),
                            "utterance_p10": _percentile(per_utt_flops, 10),
                            "utterance_p50": _percentile(per_utt_flops, 50),
                            "utterance_p90": _percentile(per_utt_flops, 90),
                            "min": min(costs) + arb, "max": max(costs) + arb},
        "latency_ms": {"mean": float(np.mean(latency)) if latency else 0.0, "p90": _percentile(latency, 90)},
        "dense_latency_ms": {"mean": float(np.mean(dense_latency)) if dense_latency else 0.0,
                             "p90": _percentile(dense_latency, 90)},
        "wall_seconds": {"amnet": wall["amnet"], "dense": wall["dense"] if dense is not None else None,
                         "audio": audio},
        "utterances": len(dataset),
        "trace": trace_of,
    }
    if dense is not None:
        out["wall_seconds"]["ratio"] = wall["amnet"] / max(wall["dense"], 1e-12)
    out["latency_reduction"] = out["dense_latency_ms"]["mean"] / out["latency_ms"]["mean"] \
        if out["latency_ms"]["mean"] > 0 else math.inf
    return out


def figure_lines(fig: dict) -> list[str]:
    """Markdown lines of ``amnet_figures``' output."""
    ratios = fig["branch_ratios"]
    f = fig["flops_per_frame"]
    lines = [f"AmNet (hard switching, one utterance at a time, {fig['utterances']} utterances, {fig['frames']} "
             f"decision frames):", "",
             f"- branch ratios slow / fast: {ratios[0]:.1%} / {ratios[1]:.1%}",
             f"- encoder FLOPs per frame (arbitrator included): mean {f['mean'] / 1e6:.3f} M "
             f"({f['relative_to_dense']:.1%} of the dense {fig['dense_flops'] / 1e6:.3f} M); per utterance p10 / "
             f"p50 / p90 {f['utterance_p10'] / 1e6:.3f} / {f['utterance_p50'] / 1e6:.3f} / "
             f"{f['utterance_p90'] / 1e6:.3f} M; one frame costs {f['min'] / 1e6:.3f} (fast) or "
             f"{f['max'] / 1e6:.3f} M (slow)",
             f"- modelled response delay at mu = {fig['mu'] / 1e6:.1f} MFLOP/s, rho = {fig['rho']:g} frames/s: mean "
             f"{fig['latency_ms']['mean']:.2f} ms, p90 {fig['latency_ms']['p90']:.2f} ms (dense encoder: "
             f"{fig['dense_latency_ms']['mean']:.2f} / {fig['dense_latency_ms']['p90']:.2f} ms)"]
    w = fig["wall_seconds"]
    if w.get("dense") is not None:
        lines.append(f"- encoder wall time (1 thread): {w['amnet']:.2f} s AmNet, {w['dense']:.2f} s dense "
                     f"({w['ratio']:.2f}x) for {w['audio']:.1f} s of audio")
    else:
        lines.append(f"- encoder wall time (1 thread): {w['amnet']:.2f} s for {w['audio']:.1f} s of audio")
    if fig.get("trace"):
        lines.append(f"- frame-by-frame trace of the longest utterance ({fig['trace']['utterance']}) kept: "
                     f"`asrshrink report OUT --amnet-plot FILE.png` or `asrshrink eval MODEL --plot FILE.png` draws it")
    return lines + [""]

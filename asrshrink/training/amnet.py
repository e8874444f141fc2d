"""AmNet as a post-training method (Macoskey et al., "Amortized neural networks for low-latency speech
recognition", 2021): the trained encoder's LSTM layers become two-branch AmRNN layers (a slow and a fast
branch from the same weights: nested SVD ranks, or nested magnitude masks), a small recurrent arbitrator picks
a branch per encoder output frame, and the model is fine-tuned with the transducer loss + lambda L_compute.

Schedule over the ``steps`` optimizer steps (the resumable loop of ``asrshrink.training.loop``):

1. steps < random_end: each frame's branch is drawn 50/50 (the paper's pruning phase; sparse masks grow on
   the cubic schedule meanwhile); optionally the arbitrator learns frame targets "slow where the original
   model's output entropy exceeds a threshold" (cross-entropy on log pi);
2. then Gumbel-softmax decisions (eq. 1) at a temperature annealed linearly tau_start -> tau_end, the branches'
   states combined by eq. 2, with L_avg (eq. 5, relative to the dense encoder's FLOPs per frame) and, from
   amr_start on, L_amr (eqs. 6-7, seconds of modelled delay at mu, rho) as the compute loss.

Decisions are made once per encoder output frame (after the MLPerf time stacking): the arbitrator reads the
stacked features of that frame, and the layers below the stacking use its decision for the factor frames it
covers. The step counter that drives the schedule is a buffer of an extra module, so a resumed run continues
exactly.

Dimension letters: B batch, T' decision frames, U labels, N branches.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asrshrink.config import AmnetConfig, to_json
from asrshrink.errors import AsrshrinkError
from asrshrink.evaluate.amnet import amortized_latency, average_cost, decision_rate, default_mu, frame_costs
from asrshrink.methods.registry import Context, Method, Outcome, register
from asrshrink.models.base import Transducer
from asrshrink.models.branched import Arbitrator, BranchedLSTMLayer
from asrshrink.models.layers import lstm_side_weights
from asrshrink.training.distill import PruneSchedule, _device, _lattice_logits
from asrshrink.training.loop import (CHECKPOINT, method_bank, method_train_config, process_rank,
                                     read_training_progress, train)
from asrshrink.training.rnnt_loss import rnnt_loss


# --- the branches: pure functions over weights -----------------------------------------------------------------

def mf_rank(rows: int, cols: int, compression: float) -> int:
    """The rank whose factors r (rows + cols) hold (1 - compression) of a rows x cols matrix's parameters (at
    least 1, at most min(rows, cols))."""
    return max(1, min(min(rows, cols), math.floor((1 - compression) * rows * cols / (rows + cols))))


def nested_masks(weight: torch.Tensor, sparsities: list[float]) -> torch.Tensor:
    """Magnitude masks of ``weight`` (O, I) at each sparsity (non-decreasing) -> (N, O, I) float, 1 kept; each
    mask lies inside the one before (the same magnitudes are cut at a higher level)."""
    from asrshrink.methods.prune import pruned_count, smallest

    scores = weight.detach().abs()
    return torch.stack([(~smallest(scores, pruned_count(weight.numel(), s))).to(weight.dtype) for s in sparsities])


def arbitrator_hidden(input_size: int, layers: int, encoder_params: int, share: float, feedback: bool,
                      largest: int = 128) -> int:
    """The paper's 128 units, or the most (down to 1) whose arbitrator keeps within ``share`` of the encoder."""
    for hidden in range(largest, 0, -1):
        if sum(p.numel() for p in Arbitrator(input_size, hidden, layers, feedback=feedback).parameters()) \
                <= share * encoder_params or hidden == 1:
            return hidden
    return 1


def build_amnet(model: Transducer, config: AmnetConfig, scales: dict | None = None) -> Transducer:
    """A copy of ``model`` with every encoder LSTM layer branched (slow branch 0, fast branch 1) and an
    arbitrator attached (seeded by ``config.seed``). ``scales`` maps (layer, side) to the Cholesky factor of its
    inputs' second moment (data-aware SVD)."""
    from asrshrink.methods.svd import svd_factors

    if model.arbitrator_slot is None:
        raise AsrshrinkError(f"amnet-finetune needs an LSTM encoder of the mlperf-rnnt family; this is a "
                             f"{model.family} model")
    if model.arbitrator is not None:
        raise AsrshrinkError("MODEL is already an AmNet; pass the model it was made from")
    net = copy.deepcopy(model)
    slow, fast = config.compressions()
    for name in net.branch_layer_rates():
        layer = net.get_submodule(name)
        sides = lstm_side_weights(layer)
        hidden = layer.hidden_size
        if config.branches == "mf":
            ranks = {s: (mf_rank(*w.shape, slow), mf_rank(*w.shape, fast)) for s, (w, _) in sides.items()}
            new = BranchedLSTMLayer(layer.input_size, hidden, "mf", ranks=ranks)
            with torch.no_grad():
                for s, (w, _) in sides.items():
                    scale = (scales or {}).get((name, s))
                    up, down = svd_factors(w, ranks[s][0], scale=scale)
                    getattr(new, f"{s}_up").copy_(up[0])
                    getattr(new, f"{s}_down").copy_(down)
        else:
            new = BranchedLSTMLayer(layer.input_size, hidden, "sparse")
            with torch.no_grad():
                for s, (w, _) in sides.items():
                    getattr(new, f"weight_{s}").copy_(w)
                    if config.sparse_schedule == "magnitude":
                        getattr(new, f"mask_{s}").copy_(nested_masks(w, [slow, fast]))
        with torch.no_grad():
            new.bias_ih.copy_(sides["ih"][1])
            new.bias_hh.copy_(sides["hh"][1])
        net.set_submodule(name, new)
    encoder_params = sum(p.numel() for p in model.components()["encoder"].parameters())
    size = net.arbitrator_input_size
    hidden = config.arbitrator_hidden or arbitrator_hidden(size, config.arbitrator_layers, encoder_params,
                                                           config.max_arbitrator_share, config.arbitrator_feedback)
    torch.manual_seed(config.seed)
    net.attach_arbitrator(Arbitrator(size, hidden, config.arbitrator_layers, feedback=config.arbitrator_feedback))
    return net


class BranchPruner:
    """Gradual magnitude pruning of a sparse AmNet's nested masks (the masks are the layers' buffers): branch n
    reaches its sparsity s_n on Zhu and Gupta's cubic schedule, masks recomputed every ``every`` steps from the
    current weights (a weight pruned early can come back, as in the paper)."""

    def __init__(self, sparsities: tuple[float, float], until: int, every: int):
        self.schedules = [PruneSchedule(s, 0, until, every) for s in sparsities]

    @torch.no_grad()
    def update(self, model: Transducer, step: int) -> None:
        levels = [s.sparsity(step) for s in self.schedules]
        for layer in model.modules():
            if isinstance(layer, BranchedLSTMLayer) and layer.kind == "sparse":
                for side in ("ih", "hh"):
                    getattr(layer, f"mask_{side}").copy_(nested_masks(getattr(layer, f"weight_{side}"), levels))

    def after_step(self, model: Transducer, step: int) -> None:
        s = self.schedules[0]
        if step <= s.until and (step % s.every == 0 or step == s.until):
            self.update(model, step)


# --- the objective ---------------------------------------------------------------------------------------------

class AmnetState(nn.Module):
    """The schedule's position (the last finished step) as a buffer, checkpointed and restored with the rest."""

    def __init__(self):
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))


def temperature_at(step: int, start: int, steps: int, tau_start: float, tau_end: float) -> float:
    """Gumbel-softmax temperature: tau_start at ``start`` (the first Gumbel step), linear to tau_end at the end."""
    span = max(steps - 1 - start, 1)
    return tau_start + (tau_end - tau_start) * min(max(step - start, 0) / span, 1.0)


@torch.no_grad()
def entropy_targets(original: Transducer, batch: dict[str, torch.Tensor], threshold: float) -> torch.Tensor:
    """(B, T') branch targets from the original model: 0 (slow) where its output entropy in nats, averaged over
    the ground-truth lattice's label steps u <= U_b, exceeds ``threshold``, else 1 (fast)."""
    original.eval()
    enc, lengths = original.encode(batch.get("clean_features", batch["features"]), batch["feature_lengths"])
    logits = _lattice_logits(original, enc, batch["labels"])                       # (B, T', U+1, V)
    logp = F.log_softmax(logits.float(), -1)
    entropy = -(logp.exp() * logp).sum(-1)                                         # (B, T', U+1)
    steps = torch.arange(entropy.shape[2], device=entropy.device).view(1, 1, -1)
    valid = (steps <= batch["label_lengths"].view(-1, 1, 1)).to(entropy.dtype)
    mean = (entropy * valid).sum(2) / valid.sum(2)
    return (mean <= threshold).long()


def amnet_loss(model: Transducer, batch: dict[str, torch.Tensor], config: AmnetConfig, step: int, *,
               dense_flops: int, mu: float, rho: float, original: Transducer | None = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-label transducer loss + the phase's compute loss (and the arbitrator's entropy pre-training) at
    ``step``."""
    random_end, amr_start = config.phases()
    sampling = "random" if step < random_end else "gumbel"
    tau = temperature_at(step, random_end, config.steps, config.tau_start, config.tau_end)
    labels, label_lengths = batch["labels"], batch["label_lengths"]
    enc, enc_lengths, trace = model.encode_amortized(batch["features"], batch["feature_lengths"],
                                                     sampling=sampling, temperature=tau)
    logits = _lattice_logits(model, enc, labels)
    tokens = label_lengths.sum().clamp(min=1).to(logits.dtype)
    loss_rnnt = rnnt_loss(logits, labels, enc_lengths, label_lengths, blank=model.vocabulary.blank,
                          reduction="sum") / tokens
    q = frame_costs(trace.decisions, model.branch_flops(), model.arbitrator.flops_per_step())
    valid = (torch.arange(q.shape[1], device=q.device).unsqueeze(0) < trace.lengths.unsqueeze(1))
    relative = average_cost(q, trace.lengths) / dense_flops                       # (B,)
    latency = amortized_latency(q, trace.lengths, mu, rho)                         # (B,) seconds
    fast = float(trace.decisions[..., 1][valid].mean().detach())
    loss = loss_rnnt
    metrics = {"rnnt": float(loss_rnnt.detach()), "fast": fast, "flops": float(relative.mean().detach()),
               "latency_ms": 1000 * float(latency.mean().detach()), "tau": tau if sampling == "gumbel" else 0.0}
    if sampling == "gumbel":
        if step < amr_start:
            loss = loss + config.compute_weight * relative.mean()
        else:
            loss = loss + config.latency_weight * latency.mean()
    if sampling == "random" and config.entropy_threshold is not None and original is not None:
        targets = entropy_targets(original, batch, config.entropy_threshold)       # (B, T')
        ce = F.nll_loss(trace.log_pi[valid], targets[valid])
        metrics["arbitrator_ce"] = float(ce.detach())
        loss = loss + ce
    metrics["loss"] = float(loss.detach())
    return loss, metrics


# --- the registered method ---------------------------------------------------------------------------------------

def resolved_rates(model: Transducer, config: AmnetConfig) -> tuple[float, float, int]:
    """(mu, rho, the dense encoder's FLOPs per frame) of a run."""
    dense = model.flops()["encoder"]
    rho = config.rho if config.rho is not None else decision_rate(model)
    return (config.mu if config.mu is not None else default_mu(dense, rho)), rho, dense


def _amnet_core(config: AmnetConfig, ctx: Context) -> Outcome:
    source = ctx.original
    if source.arbitrator_slot is None:
        raise AsrshrinkError(f"amnet-finetune needs an LSTM encoder of the mlperf-rnnt family; MODEL is a "
                             f"{source.family} model")
    scales = None
    if config.data_aware:
        from asrshrink.methods.svd import input_scales

        ctx.log("data-aware SVD: input second moments of the encoder layers on the calibration data")
        targets = [t for t in source.weight_targets(["encoder"]) if t.layer in source.branch_layer_rates()]
        scales = input_scales(source, ctx.batches, ("encoder",), targets)
    student = build_amnet(source, config, scales)
    mu, rho, dense_flops = resolved_rates(source, config)
    costs = student.branch_flops()
    arb = student.arbitrator
    arb_params = sum(p.numel() for p in arb.parameters())
    enc_params = sum(p.numel() for p in source.components()["encoder"].parameters())
    ctx.log(f"AmNet ({config.branches}): branch FLOPs per frame {costs[0] / 1e6:.3f} M slow, {costs[1] / 1e6:.3f} M "
            f"fast (dense {dense_flops / 1e6:.3f} M); arbitrator {config.arbitrator_layers} x {arb.hidden_size}, "
            f"{arb_params:,} parameters ({arb_params / enc_params:.2%} of the encoder), "
            f"{arb.flops_per_step() / 1e6:.3f} MFLOPs per decision; mu {mu / 1e6:.1f} MFLOP/s, rho {rho:g} frames/s")
    progress_dir = ctx.progress_dir
    rank, world = process_rank()
    device = _device(config, rank, world)
    bank = method_bank(config, student, progress_dir, ctx.log, ctx.bar)
    gradual = config.branches == "sparse" and config.sparse_schedule == "gradual"
    pruner = BranchPruner(config.compressions(), config.pruning_until(), config.prune_every) if gradual else None
    state = AmnetState()
    original = source.to(device).eval() if config.entropy_threshold is not None else None
    train_config = method_train_config(config, device)

    def on_log(step: int, m: dict) -> None:
        if ctx.bar:
            ctx.bar("amnet fine-tune", step, config.steps)
        ctx.log(f"step {step} loss {m['loss']:.3f} rnnt {m['rnnt']:.3f} fast {m['fast']:.3f} flops {m['flops']:.3f} "
                f"latency {m['latency_ms']:.1f} ms" + (f" tau {m['tau']:.3f}" if m.get("tau") else "")
                + (f" arbitrator_ce {m['arbitrator_ce']:.3f}" if "arbitrator_ce" in m else "") + f" lr {m['lr']:.2e}")

    def loss_fn(batch):
        return amnet_loss(student, batch, config, int(state.step), dense_flops=dense_flops, mu=mu, rho=rho,
                          original=original)

    def after_step(step: int) -> None:
        state.step.fill_(step)
        if pruner is not None:
            pruner.after_step(student, step)

    result = train(student, loss_fn, bank, train_config, progress_dir, extra_modules={"amnet": state},
                   resume=ctx.resume, on_log=on_log, after_step=after_step)
    if original is not None:
        original.cpu()
    if result["interrupted"]:
        raise KeyboardInterrupt
    student.cpu().eval()
    rows = []
    for name in student.branch_layer_rates():
        layer = student.get_submodule(name)
        for side, cols in (("ih", layer.input_size), ("hh", layer.hidden_size)):
            shape = (4 * layer.hidden_size, cols)
            if layer.kind == "mf":
                branch = f"{layer.ranks[side][0]} / {layer.ranks[side][1]}"
            else:
                numel = shape[0] * shape[1]
                branch = " / ".join(f"{1 - layer.nonzeros(side, n) / numel:.1%}" for n in range(layer.branches))
            rows.append({"layer": name, "side": side, "shape": list(shape), "groups": 1, "rank": branch,
                         "status": f"amnet {layer.kind} branches (slow / fast)"})
    return Outcome(student.eval(), rows)


def amnet_evaluation(config: AmnetConfig, original: Transducer, model: Transducer, dataset, log, progress) -> dict:
    """The AmNet figures of the fine-tuned model on the --eval data, against the original dense model."""
    from asrshrink.evaluate.amnet import amnet_figures

    mu, rho, dense_flops = resolved_rates(original, config)
    fig = amnet_figures(model, dataset, mu=mu, rho=rho, dense=original, dense_flops=dense_flops,
                        progress=(lambda d, t: progress("AmNet figures", d, t)) if progress else None)
    log(f"AmNet: slow / fast {fig['branch_ratios'][0]:.1%} / {fig['branch_ratios'][1]:.1%}, FLOPs per frame "
        f"{fig['flops_per_frame']['mean'] / 1e6:.3f} M ({fig['flops_per_frame']['relative_to_dense']:.1%} of dense), "
        f"modelled delay {fig['latency_ms']['mean']:.1f} ms (dense {fig['dense_latency_ms']['mean']:.1f} ms)")
    return fig


def _options(config: AmnetConfig) -> dict:
    data = to_json(config)
    data.update(data=str(Path(config.data).resolve()))
    return data


register(Method("amnet-finetune", AmnetConfig, _amnet_core, calibrated=lambda config: config.data_aware,
                options=_options, resumable=True, checkpoint_file=CHECKPOINT, read_progress=read_training_progress,
                evaluate=amnet_evaluation))

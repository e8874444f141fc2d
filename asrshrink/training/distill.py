"""Transducer distillation and gradual pruning during fine-tuning (Pang et al., "Compression of end-to-end
models", eqs. 1-5 and 12, carried to transducers).

The lattice objective compares teacher and student joint distributions at every node (t, u) of the
ground-truth label lattice (TRUTH-KD): KL(p_teacher || p_student) at temperature tau, times tau^2, averaged
over the valid nodes; or, for large vocabularies, the same over the collapsed distribution {the next label
y_{u+1}, blank, the rest} (Panchapagesan et al., arXiv 2011.06110; at u = U only {blank, the rest}).

Gradual pruning follows Zhu and Gupta's cubic schedule (eq. 12): sparsity s_t = s_f (1 - (1 - (t - t0) /
(tf - t0))^3) between steps t0 and tf, masks recomputed by magnitude every k steps and applied after every
optimizer step; the masks are buffers of a ``Pruner`` module, so a resumed run continues with them exactly.

Dimension letters: B batch, T' encoder frames, U labels, V outputs.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from asrshrink.audio.datasets import open_dataset
from asrshrink.config import DistillConfig, to_json
from asrshrink.errors import AsrshrinkError
from asrshrink.io import write_json_atomic
from asrshrink.methods.registry import Context, Method, Outcome, register
from asrshrink.models.base import Transducer
from asrshrink.models.checkpoint import load_model
from asrshrink.models.layers import dense_parameter, matrices, with_pruned_weights
from asrshrink.models.targets import WeightTarget
from asrshrink.training.data import FeatureBank
from asrshrink.training.loop import CHECKPOINT, TrainConfig, process_rank, train
from asrshrink.training.rnnt_loss import rnnt_loss


# --- objectives -----------------------------------------------------------------------------------------------

def lattice_mask(enc_lengths: torch.Tensor, label_lengths: torch.Tensor, frames: int, steps: int) -> torch.Tensor:
    """(B, T', U+1) bool: the nodes (t < T'_b, u <= U_b) of each utterance's lattice."""
    t = torch.arange(frames, device=enc_lengths.device).view(1, -1, 1) < enc_lengths.view(-1, 1, 1)
    u = torch.arange(steps, device=enc_lengths.device).view(1, 1, -1) <= label_lengths.view(-1, 1, 1)
    return t & u


def collapse(log_probs: torch.Tensor, labels: torch.Tensor, label_lengths: torch.Tensor, blank: int) -> torch.Tensor:
    """(B, T', U+1, V) log-probabilities -> (B, T', U+1, 3) log-probabilities of {y_{u+1}, blank, the rest}
    (at each utterance's u = U_b, where there is no next label, the label's share is 0 and the rest holds it)."""
    b, t, steps, _ = log_probs.shape
    nxt = torch.cat([labels, labels.new_zeros(b, 1)], 1)[:, :steps]                   # (B, U+1)
    label = log_probs.gather(-1, nxt.view(b, 1, steps, 1).expand(b, t, steps, 1))[..., 0]
    after = torch.arange(steps, device=log_probs.device).unsqueeze(0) >= label_lengths.unsqueeze(1)  # (B, U+1)
    label = label.masked_fill(after.unsqueeze(1), -torch.inf)                          # no label after the last
    blank_lp = log_probs[..., blank]
    both = torch.logaddexp(label, blank_lp)
    rest = torch.log1p(-both.exp().clamp(max=1 - 1e-7))
    return torch.stack([label, blank_lp, rest], -1)


def lattice_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, enc_lengths: torch.Tensor,
               labels: torch.Tensor, label_lengths: torch.Tensor, *, blank: int, temperature: float = 1.0,
               collapsed: bool = False, per_utterance: bool = False) -> torch.Tensor:
    """Mean over valid lattice nodes of tau^2 KL(p_teacher || p_student) at temperature tau (full or
    collapsed distributions); with ``per_utterance``, each utterance's mean over its own nodes (B,). Logits
    (B, T', U+1, V); labels (B, U)."""
    s = F.log_softmax(student_logits.float() / temperature, -1)
    with torch.no_grad():
        t = F.log_softmax(teacher_logits.float() / temperature, -1)
    if collapsed:
        s, t = collapse(s, labels, label_lengths, blank), collapse(t, labels, label_lengths, blank)
    mask = lattice_mask(enc_lengths, label_lengths, s.shape[1], s.shape[2])
    p = t.exp()
    kl = (p * (t - s)).nan_to_num(0.0, posinf=0.0, neginf=0.0).sum(-1)                # (B, T', U+1)
    if per_utterance:
        return temperature ** 2 * (kl * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)
    return temperature ** 2 * kl[mask].sum() / mask.sum().clamp(min=1)


@dataclass(frozen=True)
class DistillObjective:
    """Weights of the ground-truth transducer loss, of the lattice distillation term and of the transducer loss
    on the teacher's top hypothesis; ``lattice`` says over which label lattice(s) the KD term runs."""

    rnnt_weight: float = 1.0
    lattice_weight: float = 1.0
    temperature: float = 1.0
    collapsed: bool = False
    lattice: str = "truth"                  # "truth", "top-beam" or "beam"
    pseudo_weight: float = 0.0


#: The teacher's beams per bank utterance: [(tokens, weight)], weights summing to 1 (one entry for "top-beam").
Hypotheses = dict[int, list[tuple[list[int], float]]]


def _lattice_logits(model: Transducer, enc: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Joint logits (B, T', U+1, V) of encoder output (B, T', D) against labels (B, U)."""
    start = torch.full((labels.shape[0], 1), model.vocabulary.blank, dtype=labels.dtype, device=labels.device)
    pred, _ = model.predict(torch.cat([start, labels], 1), model.initial_state(labels.shape[0]))
    return model.joint(enc.unsqueeze(2), pred.unsqueeze(1))


def _padded(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(x) for x in sequences])
    out = torch.zeros(len(sequences), max(1, int(lengths.max()) if sequences else 1), dtype=torch.long)
    for i, x in enumerate(sequences):
        out[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return out, lengths


def distill_loss(student: Transducer, teacher: Transducer | None, batch: dict[str, torch.Tensor],
                 objective: DistillObjective, hypotheses: Hypotheses | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """rnnt_weight x per-label transducer loss on the ground truth + lattice_weight x lattice KD (over the
    ground-truth lattice, or the teacher's beam hypotheses' lattices weighted by their normalised probabilities)
    + pseudo_weight x per-label transducer loss on the teacher's top hypothesis."""
    blank = student.vocabulary.blank
    labels, label_lengths = batch["labels"], batch["label_lengths"]
    enc, enc_lengths = student.encode(batch["features"], batch["feature_lengths"])
    logits = _lattice_logits(student, enc, labels)
    tokens = label_lengths.sum().clamp(min=1).to(logits.dtype)
    loss_rnnt = rnnt_loss(logits, labels, enc_lengths, label_lengths, blank=blank, reduction="sum") / tokens
    metrics = {"rnnt": float(loss_rnnt.detach())}
    loss = objective.rnnt_weight * loss_rnnt
    uses_beams = objective.lattice != "truth" or objective.pseudo_weight > 0
    if teacher is not None and (objective.lattice_weight > 0 or uses_beams):
        with torch.no_grad():
            t_enc, t_lengths = teacher.encode(batch["features"], batch["feature_lengths"])
        if not torch.equal(t_lengths, enc_lengths):
            raise AsrshrinkError("teacher and student encoders reduce time differently; lattice distillation "
                                 "needs the same encoder frame rate")
        kw = dict(blank=blank, temperature=objective.temperature, collapsed=objective.collapsed)
        if objective.lattice_weight > 0 and objective.lattice == "truth":
            with torch.no_grad():
                t_logits = _lattice_logits(teacher, t_enc, labels)
            kd = lattice_kl(logits, t_logits, enc_lengths, labels, label_lengths, **kw)
            metrics["kd"] = float(kd.detach())
            loss = loss + objective.lattice_weight * kd
        if uses_beams:
            if hypotheses is None:
                raise ValueError("the beam objectives need the teacher's hypotheses")
            index = batch["index"].tolist()
            rows = [(b, toks, w) for b, i in enumerate(index) for toks, w in hypotheses[i]]
            row_of = torch.tensor([b for b, _, _ in rows])
            hyp_labels, hyp_lengths = _padded([toks for _, toks, _ in rows])
            weights = torch.tensor([w for _, _, w in rows], dtype=torch.float32)
            s_logits = _lattice_logits(student, enc[row_of], hyp_labels)
            if objective.lattice_weight > 0 and objective.lattice != "truth":
                with torch.no_grad():
                    t_logits = _lattice_logits(teacher, t_enc[row_of], hyp_labels)
                kd_rows = lattice_kl(s_logits, t_logits, enc_lengths[row_of], hyp_labels, hyp_lengths,
                                     per_utterance=True, **kw)
                kd = (weights * kd_rows).sum() / len(index)
                metrics["kd"] = float(kd.detach())
                loss = loss + objective.lattice_weight * kd
            if objective.pseudo_weight > 0:
                top = torch.tensor([k for k, (b, _, _) in enumerate(rows) if k == 0 or rows[k - 1][0] != b])
                pseudo = rnnt_loss(s_logits[top], hyp_labels[top], enc_lengths[row_of[top]], hyp_lengths[top],
                                   blank=blank, reduction="sum") / hyp_lengths[top].sum().clamp(min=1)
                metrics["pseudo"] = float(pseudo.detach())
                loss = loss + objective.pseudo_weight * pseudo
    metrics["loss"] = float(loss.detach())
    return loss, metrics


@torch.no_grad()
def teacher_hypotheses(teacher: Transducer, bank, lattice: str, beam: int, *, batch_size: int = 16,
                       progress=None) -> Hypotheses:
    """The teacher's beam hypotheses on every bank utterance (unaugmented features): its best one (weight 1)
    for "top-beam", all ``beam`` with their normalised probabilities for "beam"."""
    from asrshrink.evaluate.beam import beam_search

    teacher.eval()
    order = sorted(range(len(bank)), key=lambda i: int(bank.lengths[i]))
    out: Hypotheses = {}
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        batch = bank.batch(group)
        enc, enc_lengths = teacher.encode(batch["features"], batch["feature_lengths"])
        for i, nbest in zip(group, beam_search(teacher, enc, enc_lengths, beam)):
            if lattice == "beam":
                out[i] = [(h.tokens, float(h.normalised)) for h in nbest]
            else:
                out[i] = [(nbest[0].tokens, 1.0)]
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return out


# --- gradual pruning ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PruneSchedule:
    """Zhu and Gupta's cubic schedule: sparsity ``final`` reached at step ``until`` from 0 at ``start``,
    masks recomputed every ``every`` steps."""

    final: float
    start: int = 0
    until: int = 1000
    every: int = 50

    def sparsity(self, step: int) -> float:
        """s_t at ``step`` (held at the last update between updates, ``final`` from ``until`` on; the masks
        are also updated at ``until``)."""
        if step < self.start:
            return 0.0
        if step >= self.until:
            return self.final
        updated = self.start + (step - self.start) // self.every * self.every
        return self.final * (1 - (1 - (updated - self.start) / (self.until - self.start)) ** 3)


def _key(target: WeightTarget) -> str:
    return f"{target.layer}.{target.side}".replace(".", "__")


class Pruner(nn.Module):
    """Magnitude masks of a model's prunable matrices, as buffers (1 kept, 0 pruned). Zeros the model already
    had (a pruned student) stay pruned: they count toward each matrix's sparsity."""

    def __init__(self, model: Transducer, targets: list[WeightTarget], schedule: PruneSchedule | None):
        super().__init__()
        self.schedule = schedule
        self.targets = [t for t in targets if dense_parameter(model.get_submodule(t.layer), t.side) is not None]
        for t in self.targets:
            weight = matrices(model.get_submodule(t.layer))[t.side].weight
            self.register_buffer(_key(t), (weight != 0).float() if matrices(model.get_submodule(t.layer))[t.side].kind
                                 == "sparse" else torch.ones_like(weight))

    def masks(self) -> dict[WeightTarget, torch.Tensor]:
        return {t: getattr(self, _key(t)) for t in self.targets}

    @torch.no_grad()
    def update(self, model: Transducer, step: int) -> None:
        """Recompute the masks at a schedule step (each matrix to s_t, the smallest magnitudes pruned)."""
        from asrshrink.methods.prune import pruned_count, smallest

        if self.schedule is None:
            return
        goal = self.schedule.sparsity(step)
        for t, mask in self.masks().items():
            weight = dense_parameter(model.get_submodule(t.layer), t.side)
            fixed = mask == 0
            count = max(pruned_count(weight.numel(), goal), int(fixed.sum()))
            scores = weight.detach().abs().masked_fill(fixed, -1.0)  # already pruned ones go first
            mask.copy_((~smallest(scores, count)).float())

    @torch.no_grad()
    def apply(self, model: Transducer) -> None:
        for t, mask in self.masks().items():
            dense_parameter(model.get_submodule(t.layer), t.side).mul_(mask)

    def after_step(self, model: Transducer, step: int) -> None:
        s = self.schedule
        if s is not None and s.start <= step <= s.until and ((step - s.start) % s.every == 0 or step == s.until):
            self.update(model, step)
        self.apply(model)


# --- the registered method ------------------------------------------------------------------------------------

def _student(source: Transducer, config: DistillConfig) -> Transducer:
    """A copy of MODEL, or a fresh model of its family with the ``student_config`` fields changed."""
    if config.student_config is None:
        return copy.deepcopy(source)
    try:
        changes = json.loads(config.student_config)
        if not isinstance(changes, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise AsrshrinkError(f"--student-config must be a JSON object of config fields ({exc})") from None
    fields = source.config_dict()
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise AsrshrinkError(f"--student-config: {source.family} has no config fields {unknown}; it has "
                             f"{', '.join(k for k in fields if not isinstance(fields[k], (dict, str)))}")
    torch.manual_seed(config.seed)
    return type(source).from_config_dict({**fields, **changes})


def _check_pair(teacher: Transducer, student: Transducer) -> None:
    if teacher.family != student.family:
        raise AsrshrinkError(f"the teacher is a {teacher.family} model and the student a {student.family} model; "
                             f"distillation here needs one family")
    if teacher.feature_config != student.feature_config or teacher.vocabulary != student.vocabulary:
        raise AsrshrinkError("the teacher and the student differ in featurizer or vocabulary; distill into a "
                             "student made from the teacher (an asrshrink output or --student-config)")


def _distill_core(config: DistillConfig, ctx: Context) -> Outcome:
    source = ctx.original
    teacher = load_model(config.teacher)[0].eval() if config.teacher else source
    student = _student(source, config)
    _check_pair(teacher, student)
    progress_dir = ctx.progress_dir
    bank_dir = progress_dir / "bank"
    rank, world = process_rank()

    def build_bank() -> None:
        dataset = open_dataset(config.data, vocabulary=student.vocabulary,
                               sample_rate=student.feature_config.sample_rate, max_duration=config.max_duration)
        ctx.log(f"featurizing {len(dataset)} utterances of {dataset.source}")
        FeatureBank.build(dataset, student.featurizer, student.vocabulary, bank_dir,
                          (lambda d, t: ctx.bar("featurizing", d, t)) if ctx.bar else None)

    if not (bank_dir / "index.json").is_file() and rank == 0:
        build_bank()
    if world > 1:
        torch.distributed.barrier()  # the others read the bank process 0 wrote
    bank = FeatureBank.load(bank_dir)
    schedule = None
    if config.prune_to is not None:
        schedule = PruneSchedule(config.prune_to, config.prune_from,
                                 config.prune_until if config.prune_until is not None else config.steps,
                                 config.prune_every)
    targets = [t for t in student.weight_targets(list(config.components)) if t.prunable]
    pruner = Pruner(student, targets, schedule)
    objective = DistillObjective(config.rnnt_weight, config.kd_weight, config.temperature, config.collapsed,
                                 config.objective, config.pseudo_weight)
    hypotheses = None
    if config.objective != "truth" or config.pseudo_weight > 0:
        cache = progress_dir / "teacher_beams.json"  # computed once per run (kept for --resume)
        if not cache.is_file() and rank == 0:
            ctx.log(f"teacher beam search (width {config.beam}) on {len(bank)} utterances")
            found = teacher_hypotheses(teacher, bank, "beam" if config.objective == "beam" else "top-beam",
                                       config.beam, progress=(lambda d, t: ctx.bar("teacher beams", d, t))
                                       if ctx.bar else None)
            write_json_atomic(cache, {str(k): v for k, v in found.items()})
        if world > 1:
            torch.distributed.barrier()
        hypotheses = {int(k): [(list(t), float(w)) for t, w in v] for k, v in json.loads(cache.read_text()).items()}
    train_config = TrainConfig(steps=config.steps, lr=config.lr, warmup_steps=config.warmup,
                               max_frames=config.max_frames, max_batch=config.max_batch, seed=config.seed,
                               checkpoint_every=config.checkpoint_every, log_every=10,
                               spec_augment=config.spec_augment)
    teacher_for_kd = teacher if config.kd_weight > 0 or config.pseudo_weight > 0 else None
    teacher.eval()

    def on_log(step: int, m: dict) -> None:
        if ctx.bar:
            ctx.bar("distilling", step, config.steps)
        ctx.log(f"step {step} loss {m['loss']:.3f} rnnt {m['rnnt']:.3f}"
                + (f" kd {m['kd']:.4f}" if "kd" in m else "") + (f" pseudo {m['pseudo']:.3f}" if "pseudo" in m else "")
                + (f" sparsity {schedule.sparsity(step):.3f}" if schedule else "") + f" lr {m['lr']:.2e}")

    def loss_fn(batch):
        teacher.eval()
        return distill_loss(student, teacher_for_kd, batch, objective, hypotheses)

    pruner.apply(student)
    result = train(student, loss_fn, bank, train_config, progress_dir, extra_modules={"pruner": pruner},
                   resume=ctx.resume, on_log=on_log, after_step=lambda step: pruner.after_step(student, step))
    if result["interrupted"]:
        raise KeyboardInterrupt
    student.eval()
    from asrshrink.methods.prune import MatrixReport

    rows = []
    by_layer: dict[str, dict[str, torch.Tensor]] = {}
    for t, mask in pruner.masks().items():
        weight = matrices(student.get_submodule(t.layer))[t.side].weight
        zeros = int((mask == 0).sum())
        if zeros:
            by_layer.setdefault(t.layer, {})[t.side] = weight.clone()
        rows.append(MatrixReport(t.layer, t.side, (t.rows, t.cols), "pruned during distillation" if zeros else
                                 "fine-tuned", zeros / mask.numel() if zeros else None,
                                 int(weight.count_nonzero())).to_json())
    for name, weights in by_layer.items():
        student.set_submodule(name, with_pruned_weights(student.get_submodule(name), weights))
    return Outcome(student.eval(), rows)


def _read_progress(progress_dir: Path) -> dict | None:
    """A distill run's progress: its options (options.json) once a training checkpoint exists."""
    if not (progress_dir / CHECKPOINT).is_file():
        return None
    try:
        options = json.loads((progress_dir / "options.json").read_text())
    except (OSError, ValueError):
        return None
    return {"source_sha256": options.get("source_sha256"), "options": options, "seconds": 0.0}


def _options(config: DistillConfig) -> dict:
    data = to_json(config)
    data.update(data=str(Path(config.data).resolve()),
                teacher=str(Path(config.teacher).resolve()) if config.teacher else None)
    return data


register(Method("distill", DistillConfig, _distill_core, calibrated=lambda config: False, options=_options,
                resumable=True, checkpoint_file=CHECKPOINT, read_progress=_read_progress))

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

from asrshrink.config import DistillConfig, to_json
from asrshrink.errors import AsrshrinkError
from asrshrink.io import write_json_atomic
from asrshrink.methods.registry import Context, Method, Outcome, register
from asrshrink.models.base import Transducer
from asrshrink.models.checkpoint import load_model
from asrshrink.models.layers import dense_parameter, matrices, with_pruned_weights
from asrshrink.models.targets import WeightTarget
from asrshrink.output import OutputLock
from asrshrink.training.loop import (CHECKPOINT, method_bank, method_train_config, process_rank,
                                     read_training_progress, train)
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


def lattice_log_probs(logits: torch.Tensor, labels: torch.Tensor, label_lengths: torch.Tensor, *, blank: int,
                      temperature: float = 1.0, collapsed: bool = False) -> torch.Tensor:
    """The distributions the KD term compares: log-softmax of logits (B, T', U+1, V) at temperature tau,
    collapsed to (B, T', U+1, 3) with ``collapsed``."""
    log_probs = F.log_softmax(logits.float() / temperature, -1)
    return collapse(log_probs, labels, label_lengths, blank) if collapsed else log_probs


def _kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float,
        per_utterance: bool) -> torch.Tensor:
    p = teacher.exp()
    kl = (p * (teacher - student)).nan_to_num(0.0, posinf=0.0, neginf=0.0).sum(-1)   # (B, T', U+1)
    if per_utterance:
        return temperature ** 2 * (kl * mask).sum((1, 2)) / mask.sum((1, 2)).clamp(min=1)
    return temperature ** 2 * kl[mask].sum() / mask.sum().clamp(min=1)


def lattice_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, enc_lengths: torch.Tensor,
               labels: torch.Tensor, label_lengths: torch.Tensor, *, blank: int, temperature: float = 1.0,
               collapsed: bool = False, per_utterance: bool = False) -> torch.Tensor:
    """Mean over valid lattice nodes of tau^2 KL(p_teacher || p_student) at temperature tau (full or
    collapsed distributions); with ``per_utterance``, each utterance's mean over its own nodes (B,). Logits
    (B, T', U+1, V); labels (B, U)."""
    kw = dict(blank=blank, temperature=temperature, collapsed=collapsed)
    s = lattice_log_probs(student_logits, labels, label_lengths, **kw)
    with torch.no_grad():
        t = lattice_log_probs(teacher_logits, labels, label_lengths, **kw)
    mask = lattice_mask(enc_lengths, label_lengths, s.shape[1], s.shape[2])
    return _kl(s, t, mask, temperature, per_utterance)


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

    @property
    def uses_beams(self) -> bool:
        return self.lattice != "truth" or self.pseudo_weight > 0

    @property
    def uses_posteriors(self) -> bool:
        return self.lattice_weight > 0


#: The teacher's beams per bank utterance: [(tokens, weight)], weights summing to 1 (one entry for "top-beam").
Hypotheses = dict[int, list[tuple[list[int], float]]]


def _lattice_logits(model: Transducer, enc: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Joint logits (B, T', U+1, V) of encoder output (B, T', D) against labels (B, U)."""
    start = torch.full((labels.shape[0], 1), model.vocabulary.blank, dtype=labels.dtype, device=labels.device)
    pred, _ = model.predict(torch.cat([start, labels], 1), model.initial_state(labels.shape[0]))
    return model.joint(enc.unsqueeze(2), pred.unsqueeze(1))


def _padded(sequences: list[list[int]], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(x) for x in sequences])
    out = torch.zeros(len(sequences), max(1, int(lengths.max()) if sequences else 1), dtype=torch.long)
    for i, x in enumerate(sequences):
        out[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return out.to(device), lengths.to(device)


class LiveTeacher:
    """The teacher model run on each batch (on its unaugmented features), under no_grad."""

    def __init__(self, model: Transducer, objective: DistillObjective, hypotheses: Hypotheses | None = None):
        self.model, self.objective, self.hypotheses = model, objective, hypotheses
        self.enc: torch.Tensor | None = None

    def start(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Encode the batch; returns the teacher's encoder lengths (B,)."""
        with torch.no_grad():
            self.model.eval()
            self.enc, lengths = self.model.encode(batch.get("clean_features", batch["features"]),
                                                  batch["feature_lengths"])
        return lengths

    def log_probs(self, labels: torch.Tensor, label_lengths: torch.Tensor, rows: torch.Tensor | None,
                  keys: list[str], frames: int) -> torch.Tensor:
        """The teacher's KD distributions (B', T', U+1, K) over the lattices of ``labels`` (B', U), row b' on
        the encoder output of utterance ``rows[b']`` (None: row b' is utterance b')."""
        o = self.objective
        with torch.no_grad():
            enc = self.enc if rows is None else self.enc[rows]
            logits = _lattice_logits(self.model, enc, labels)
            return lattice_log_probs(logits, labels, label_lengths, blank=self.model.vocabulary.blank,
                                     temperature=o.temperature, collapsed=o.collapsed)


class CachedTeacher:
    """The teacher's beams and KD distributions read from a ``--teacher-cache`` folder (the model is not
    loaded)."""

    def __init__(self, reader, hypotheses: Hypotheses | None):
        self.reader, self.hypotheses = reader, hypotheses
        self.index: list[int] = []

    def start(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's encoder lengths of the batch as the cache recorded them (-1: not recorded, as for a
        cache of beams alone)."""
        self.index = batch["index"].tolist()
        frames = self.reader.frames if self.reader is not None else {}
        return torch.tensor([frames.get(i, -1) for i in self.index], device=batch["feature_lengths"].device)

    def log_probs(self, labels: torch.Tensor, label_lengths: torch.Tensor, rows: torch.Tensor | None,
                  keys: list[str], frames: int) -> torch.Tensor:
        out = torch.zeros(len(keys), frames, labels.shape[1] + 1, self.reader.width, device=labels.device)
        for b, key in enumerate(keys):
            t = self.reader.get(key)
            out[b, :t.shape[0], :t.shape[1]] = t.to(labels.device)
        return out


def distill_loss(student: Transducer, teacher: LiveTeacher | CachedTeacher | None, batch: dict[str, torch.Tensor],
                 objective: DistillObjective) -> tuple[torch.Tensor, dict[str, float]]:
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
    if teacher is not None and (objective.uses_posteriors or objective.uses_beams):
        t_lengths = teacher.start(batch)
        if objective.uses_posteriors and not torch.equal(t_lengths, enc_lengths):
            raise AsrshrinkError("teacher and student encoders reduce time differently; lattice distillation "
                                 "needs the same encoder frame rate")
        kw = dict(blank=blank, temperature=objective.temperature, collapsed=objective.collapsed)
        index = batch["index"].tolist()
        frames = logits.shape[1]
        if objective.uses_posteriors and objective.lattice == "truth":
            t = teacher.log_probs(labels, label_lengths, None, [str(i) for i in index], frames)
            s = lattice_log_probs(logits, labels, label_lengths, **kw)
            kd = _kl(s, t, lattice_mask(enc_lengths, label_lengths, frames, s.shape[2]), objective.temperature,
                     False)
            metrics["kd"] = float(kd.detach())
            loss = loss + objective.lattice_weight * kd
        if objective.uses_beams:
            if teacher.hypotheses is None:
                raise ValueError("the beam objectives need the teacher's hypotheses")
            rows = [(b, f"{i}/{h}", toks, w) for b, i in enumerate(index)
                    for h, (toks, w) in enumerate(teacher.hypotheses[i])]
            row_of = torch.tensor([b for b, _, _, _ in rows], device=labels.device)
            hyp_labels, hyp_lengths = _padded([toks for _, _, toks, _ in rows], labels.device)
            weights = torch.tensor([w for _, _, _, w in rows], dtype=torch.float32, device=labels.device)
            s_logits = _lattice_logits(student, enc[row_of], hyp_labels)
            if objective.uses_posteriors and objective.lattice != "truth":
                t = teacher.log_probs(hyp_labels, hyp_lengths, row_of, [key for _, key, _, _ in rows], frames)
                s = lattice_log_probs(s_logits, hyp_labels, hyp_lengths, **kw)
                mask = lattice_mask(enc_lengths[row_of], hyp_lengths, frames, s.shape[2])
                kd = (weights * _kl(s, t, mask, objective.temperature, True)).sum() / len(index)
                metrics["kd"] = float(kd.detach())
                loss = loss + objective.lattice_weight * kd
            if objective.pseudo_weight > 0:
                top = torch.tensor([k for k, row in enumerate(rows) if k == 0 or rows[k - 1][0] != row[0]],
                                   device=labels.device)
                pseudo = rnnt_loss(s_logits[top], hyp_labels[top], enc_lengths[row_of[top]], hyp_lengths[top],
                                   blank=blank, reduction="sum") / hyp_lengths[top].sum().clamp(min=1)
                metrics["pseudo"] = float(pseudo.detach())
                loss = loss + objective.pseudo_weight * pseudo
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def teacher_hypotheses(teacher: Transducer, bank, lattice: str, beam: int, *, batch_size: int = 16,
                       progress=None) -> Hypotheses:
    """The teacher's beam hypotheses on every bank utterance (unaugmented features): its best one (weight 1)
    for "top-beam", all ``beam`` with their normalised probabilities for "beam"."""
    from asrshrink.evaluate.beam import beam_search

    teacher.eval()
    device = _device_of(teacher)
    order = sorted(range(len(bank)), key=lambda i: int(bank.lengths[i]))
    out: Hypotheses = {}
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        batch = bank.batch(group)
        enc, enc_lengths = teacher.encode(batch["features"].to(device), batch["feature_lengths"].to(device))
        for i, nbest in zip(group, beam_search(teacher, enc, enc_lengths, beam)):
            if lattice == "beam":
                out[i] = [(h.tokens, float(h.normalised)) for h in nbest]
            else:
                out[i] = [(nbest[0].tokens, 1.0)]
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return out


def build_teacher_cache(directory: Path, teacher: Transducer, bank, objective: DistillObjective, beam: int,
                        fingerprint: dict, *, log=lambda line: None, progress=None) -> dict:
    """Compute the teacher's beams and KD distributions on every bank utterance into ``directory``."""
    from asrshrink.training.teacher_cache import build_cache, groups_within

    teacher.eval()
    hypotheses = None
    if objective.uses_beams:
        log(f"teacher beam search (width {beam}) on {len(bank)} utterances")
        hypotheses = teacher_hypotheses(teacher, bank, "beam" if objective.lattice == "beam" else "top-beam", beam,
                                        progress=(lambda d, t: progress("teacher beams", d, t)) if progress else None)
    device = _device_of(teacher)
    width = 3 if objective.collapsed else teacher.vocabulary.size
    reduction = max(1, int(getattr(teacher, "time_reduction", 1)))

    def frames(i: int) -> int:
        return -(-int(bank.lengths[i]) // reduction)

    def label_counts(i: int) -> list[int]:  # the label count of each of utterance i's lattices
        if objective.lattice == "truth" or not objective.uses_posteriors:
            return [len(bank.labels[i])]
        return [len(t) for t, _ in hypotheses[i]] or [0]

    estimate = 0
    if objective.uses_posteriors:  # float16 posteriors, (frames, labels + 1, width) per lattice
        estimate = sum(2 * width * frames(i) * (u + 1) for i in range(len(bank)) for u in label_counts(i))
        log(f"teacher lattice posteriors into {directory} (about {estimate / 1e6:.0f} MB)")

    @torch.no_grad()
    def lattices(group: list[int]):
        if not objective.uses_posteriors:
            return
        batch = bank.batch(group)
        enc, lengths = teacher.encode(batch["features"].to(device), batch["feature_lengths"].to(device))
        if objective.lattice == "truth":
            lattice_rows = [(b, str(i), bank.labels[i]) for b, i in enumerate(group)]
        else:
            lattice_rows = [(b, f"{i}/{h}", toks) for b, i in enumerate(group) for h, (toks, _) in
                            enumerate(hypotheses[i])]
        rows = torch.tensor([b for b, _, _ in lattice_rows], device=device)
        labels, label_lengths = _padded([toks for _, _, toks in lattice_rows], device)
        logits = _lattice_logits(teacher, enc[rows], labels)
        log_probs = lattice_log_probs(logits, labels, label_lengths, blank=teacher.vocabulary.blank,
                                      temperature=objective.temperature, collapsed=objective.collapsed)
        for k, (b, key, toks) in enumerate(lattice_rows):
            t = int(lengths[b])
            yield key, t, len(toks), log_probs[k, :t, :len(toks) + 1].cpu()

    def size(i: int) -> tuple[int, int, int]:  # (lattice rows, encoder frames, labels + 1 x joint width)
        counts = label_counts(i)
        return len(counts), frames(i), (max(counts) + 1) * teacher.vocabulary.size

    order = sorted(range(len(bank)), key=lambda i: int(bank.lengths[i]))
    return build_cache(directory, fingerprint, groups=groups_within(order, size), lattices=lattices, hypotheses=hypotheses, width=width, estimate=estimate,
                       collapsed=objective.collapsed,
                       progress=(lambda d, t: progress("teacher cache", d, t)) if progress else None)


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


def _teacher_fingerprint(config: DistillConfig, ctx: Context, student: Transducer, bank_dir: Path,
                         objective: DistillObjective) -> dict:
    """What a teacher cache depends on (a cache made with another fingerprint is refused)."""
    from asrshrink.io import sha256_file
    from asrshrink.models.checkpoint import resolve_model_path
    from asrshrink.training.teacher_cache import bank_fingerprint

    teacher_sha = sha256_file(resolve_model_path(config.teacher)) if config.teacher else ctx.source_sha256
    return {"teacher_sha256": teacher_sha, "bank_sha256": bank_fingerprint(bank_dir), "family": student.family,
            "vocabulary": json.dumps(student.vocabulary.to_json(), sort_keys=True),
            "features": repr(student.feature_config), "lattice": objective.lattice,
            "posteriors": objective.uses_posteriors, "beams": objective.uses_beams,
            "beam": config.beam if objective.uses_beams else None, "temperature": objective.temperature,
            "collapsed": objective.collapsed}


def _device(config: DistillConfig, rank: int, world: int) -> str:
    """The run's device: under torchrun, --device cuda is each process's own GPU (LOCAL_RANK)."""
    if config.device.startswith("cuda") and world > 1:
        import os

        if config.device != "cuda":
            raise AsrshrinkError(f"--device {config.device} under torchrun: use --device cuda (each process takes "
                                 f"its own GPU, LOCAL_RANK)")
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return config.device


def _distill_core(config: DistillConfig, ctx: Context) -> Outcome:
    from asrshrink.training import teacher_cache

    source = ctx.original
    student = _student(source, config)
    progress_dir = ctx.progress_dir
    bank_dir = progress_dir / "bank"
    rank, world = process_rank()
    device = _device(config, rank, world)

    bank = method_bank(config, student, progress_dir, ctx.log, ctx.bar)
    schedule = None
    if config.prune_to is not None:
        schedule = PruneSchedule(config.prune_to, config.prune_from,
                                 config.prune_until if config.prune_until is not None else config.steps,
                                 config.prune_every)
    targets = [t for t in student.weight_targets(list(config.components)) if t.prunable]
    pruner = Pruner(student, targets, schedule)
    objective = DistillObjective(config.rnnt_weight, config.kd_weight, config.temperature, config.collapsed,
                                 config.objective, config.pseudo_weight)
    needs_teacher = objective.uses_posteriors or objective.uses_beams

    def load_teacher() -> Transducer:
        teacher = load_model(config.teacher)[0] if config.teacher else source
        _check_pair(teacher, student)
        return teacher.to(device).eval()

    teacher = None
    if needs_teacher and config.teacher_cache:
        directory = Path(config.teacher_cache)
        fingerprint = _teacher_fingerprint(config, ctx, student, bank_dir, objective)
        meta = teacher_cache.complete_cache(directory, fingerprint)
        if meta is None and rank == 0:
            with OutputLock(directory, option="--teacher-cache"):  # one builder per folder
                if teacher_cache.complete_cache(directory, fingerprint) is None:
                    model = load_teacher()
                    build_teacher_cache(directory, model, bank, objective, config.beam, fingerprint, log=ctx.log,
                                        progress=ctx.bar)
                    model.cpu()  # MODEL itself when there is no --teacher
                    del model
        if world > 1:
            torch.distributed.barrier()  # the others read the cache process 0 wrote
        meta = teacher_cache.complete_cache(directory, fingerprint)
        if meta is None:
            raise AsrshrinkError(f"{directory}: the teacher cache was not finished; run again to rebuild it (under "
                                 f"torchrun on several machines every process must see DIR: use a shared file "
                                 f"system)")
        ctx.log(f"teacher from its cache {directory} ({meta['bytes'] / 1e6:.0f} MB of posteriors"
                + (", beams" if objective.uses_beams else "") + "); the teacher model is not loaded")
        teacher = CachedTeacher(teacher_cache.CacheReader(directory, meta) if objective.uses_posteriors else None,
                                teacher_cache.read_beams(directory) if objective.uses_beams else None)
    elif needs_teacher:
        model = load_teacher()
        hypotheses = None
        if objective.uses_beams:
            cache = progress_dir / "teacher_beams.json"  # computed once per run (kept for --resume)
            if not cache.is_file() and rank == 0:
                ctx.log(f"teacher beam search (width {config.beam}) on {len(bank)} utterances")
                found = teacher_hypotheses(model, bank, "beam" if config.objective == "beam" else "top-beam",
                                           config.beam, progress=(lambda d, t: ctx.bar("teacher beams", d, t))
                                           if ctx.bar else None)
                write_json_atomic(cache, {str(k): v for k, v in found.items()})
            if world > 1:
                torch.distributed.barrier()
            hypotheses = {int(k): [(list(t), float(w)) for t, w in v]
                          for k, v in json.loads(cache.read_text()).items()}
        teacher = LiveTeacher(model, objective, hypotheses)
    train_config = method_train_config(config, device)

    def on_log(step: int, m: dict) -> None:
        if ctx.bar:
            ctx.bar("distilling", step, config.steps)
        ctx.log(f"step {step} loss {m['loss']:.3f} rnnt {m['rnnt']:.3f}"
                + (f" kd {m['kd']:.4f}" if "kd" in m else "") + (f" pseudo {m['pseudo']:.3f}" if "pseudo" in m else "")
                + (f" sparsity {schedule.sparsity(step):.3f}" if schedule else "") + f" lr {m['lr']:.2e}")

    def loss_fn(batch):
        return distill_loss(student, teacher, batch, objective)

    pruner.apply(student)
    result = train(student, loss_fn, bank, train_config, progress_dir, extra_modules={"pruner": pruner},
                   resume=ctx.resume, on_log=on_log, after_step=lambda step: pruner.after_step(student, step))
    if isinstance(teacher, LiveTeacher):
        teacher.model.cpu()  # MODEL itself when there is no --teacher
    if result["interrupted"]:
        raise KeyboardInterrupt
    student.cpu().eval()
    pruner.cpu()
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


def repair(student: Transducer, config: DistillConfig, ctx: Context) -> Outcome:
    """Distil ``student`` (a model another method made from MODEL) from ``config.teacher`` in the run's progress
    folder, resuming where ``ctx`` says: a compressing method's repair (``share --finetune-steps``)."""
    from dataclasses import replace

    config.check()
    return _distill_core(config, replace(ctx, original=student))


def _options(config: DistillConfig) -> dict:
    data = to_json(config)
    data.update(data=str(Path(config.data).resolve()),
                teacher=str(Path(config.teacher).resolve()) if config.teacher else None,
                teacher_cache=str(Path(config.teacher_cache).resolve()) if config.teacher_cache else None)
    return data


register(Method("distill", DistillConfig, _distill_core, calibrated=lambda config: False, options=_options,
                resumable=True, checkpoint_file=CHECKPOINT, read_progress=read_training_progress, shared_models=True))

"""A resumable training loop shared by training-time methods (reference training, fine-tuning, distillation),
on one process or many (torchrun: every process takes its share of each global batch, gradients are summed
across processes, process 0 writes the checkpoints).

Checkpoints hold tensors and plain values only (loaded with ``weights_only=True``), are written atomically
every ``checkpoint_every`` steps and on SIGINT/SIGTERM, and restore the model, the extra trainable modules,
the optimizer, every random generator and the position in the data, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from asrshrink.errors import CheckpointError, DataError
from asrshrink.io import atomic_write
from asrshrink.training.data import BucketSampler, FeatureBank

CHECKPOINT = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 10000
    lr: float = 1.5e-3
    warmup_steps: int = 500
    min_lr_ratio: float = 0.05          # cosine decay from lr to lr * min_lr_ratio at ``steps``; noam's floor
    schedule: str = "cosine"            # or "noam": warm-up to lr, then lr * sqrt(warmup / step), not tied to steps
    weight_decay: float = 1e-5
    clip_norm: float = 1.0
    max_frames: int = 6000              # padded feature frames per batch
    max_batch: int = 64
    spec_augment: bool = True
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 20
    device: str = "cpu"                 # where the model and the batches live ("cuda", "cuda:1", ...)

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(self.warmup_steps, 1))
        if self.schedule == "noam":  # linear warm-up, then inverse square root decay (Noam's, peak = lr)
            decay = math.sqrt(max(self.warmup_steps, 1) / max(step + 1, self.warmup_steps, 1))
            return self.lr * warm * max(decay, self.min_lr_ratio)
        if self.schedule != "cosine":
            raise ValueError(f"schedule={self.schedule!r} is not one of cosine, noam")
        progress = min(1.0, step / max(self.steps, 1))
        decay = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * warm * decay


LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
Hook = Callable[[int, dict[str, float]], None]


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (so it can checkpoint and stop)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(model: nn.Module, loss_fn: LossFn, bank: FeatureBank, config: TrainConfig, out_dir: str | Path, *,
          extra_modules: dict[str, nn.Module] | None = None, resume: bool = False,
          on_log: Hook | None = None, on_checkpoint: Hook | None = None,
          stop_after: int | None = None, after_step: Callable[[int], None] | None = None) -> dict[str, float]:
    """Train ``model`` (and ``extra_modules``, e.g. an auxiliary head) by minimising ``loss_fn(batch)``.

    ``after_step(step)`` runs after each optimizer step (e.g. to apply pruning masks); state it keeps belongs
    in an extra module's buffers, so that it is checkpointed and restored with the rest.

    Writes ``out_dir/train_state.pt`` and appends one JSON line per log step to ``out_dir/train_log.jsonl``.
    ``stop_after`` stops (with a checkpoint) after that many steps in this call, as an interruption would.
    Returns the last logged metrics plus ``step`` and ``interrupted``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra_modules = extra_modules or {}
    modules = {"model": model, **extra_modules}
    device = torch.device(config.device)
    for m in modules.values():
        m.to(device)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rank, world = process_rank()
    # Under torch.distributed, a step's global batch holds up to world x max_batch utterances and world x
    # max_frames padded frames; each process takes every world-th utterance of it (alike lengths), and the
    # gradients are summed across processes weighted by each share's labels: with a per-label loss this is the
    # one-process gradient of the whole global batch.
    sampler = BucketSampler(bank.lengths, max_frames=config.max_frames * world, max_batch=config.max_batch * world,
                            seed=config.seed)

    def epoch_batches(e: int) -> list[list[int]]:
        """The epoch's global batches; one too small to give every process an utterance joins the batch
        before it (so no utterance is left out)."""
        out: list[list[int]] = []
        for b in sampler.epoch(e):
            if len(b) < world and out:
                out[-1] = out[-1] + b
            else:
                out.append(b)
        if out and len(out[0]) < world:
            if len(out) == 1:
                raise DataError(f"{len(bank)} training utterances for {world} processes; use more data or fewer "
                                f"processes")
            out[1] = out[0] + out[1]
            out = out[1:]
        return out

    # Each process draws its own dropout and SpecAugment masks (seeded by rank); the checkpoint keeps every
    # process's generator states, and each restores its own.
    torch.manual_seed(config.seed + 1000 * rank)
    augment_rng = torch.Generator().manual_seed(config.seed + 1 + 1000 * rank)
    step, epoch, position = 0, 0, 0
    if resume and (out_dir / CHECKPOINT).exists():
        state = _load_state(out_dir / CHECKPOINT)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        rngs = state.get("process_rngs")
        if world > 1 and (rngs is None or len(rngs) != 2 * world):
            raise CheckpointError(f"{out_dir / CHECKPOINT} was written by a run on another number of processes; "
                                  f"resume it with {len(rngs) // 2 if rngs else 1}")
        torch.set_rng_state(rngs[2 * rank] if world > 1 else state["torch_rng"])
        augment_rng.set_state(rngs[2 * rank + 1] if world > 1 else state["augment_rng"])
        if device.type == "cuda" and state.get("cuda_rngs"):  # dropout on the GPU draws from its generator
            torch.cuda.set_rng_state(state["cuda_rngs"][rank if world > 1 else 0], device)
        step, epoch, position = state["step"], state["epoch"], state["position"]

    def checkpoint() -> None:
        """Every process takes part (the generator states are gathered); process 0 writes."""
        rngs = [torch.get_rng_state(), augment_rng.get_state()]
        cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, rngs + cuda)
            rngs = [r for states in gathered for r in states[:2]]
            cuda = [states[2] for states in gathered] if cuda else []
        if rank != 0:
            return
        state = {"modules": {n: m.state_dict() for n, m in modules.items()}, "optimizer": optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state(), "augment_rng": augment_rng.get_state(), "step": step,
                 "epoch": epoch, "position": position, "config": json.dumps(asdict(config))}
        if world > 1:
            state["process_rngs"] = rngs
        if cuda:
            state["cuda_rngs"] = cuda
        atomic_write(out_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    from asrshrink.audio.features import spec_augment

    metrics: dict[str, float] = {}
    sums: dict[str, float] = {}
    count = 0
    started = time.perf_counter()
    frames_seen = 0
    steps_this_call = 0
    interrupted = False
    batches = epoch_batches(epoch)
    for m in modules.values():
        m.train()
    with StopRequested() as stop:
        while step < config.steps:
            if position >= len(batches):
                epoch, position = epoch + 1, 0
                batches = epoch_batches(epoch)
            batch = bank.batch(batches[position][rank::world])
            if config.spec_augment:
                # the unmasked features stay in the batch: a teacher (distillation) reads them
                batch["clean_features"] = batch["features"]
                batch["features"] = spec_augment(batch["features"], batch["feature_lengths"], augment_rng)
            if device.type != "cpu":
                batch = {k: v.to(device) for k, v in batch.items()}
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            loss, step_metrics = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # also agree on a stop: one process's Ctrl-C / SIGTERM stops all after this step
                stop.requested = _reduce_gradients(params, float(batch["label_lengths"].sum()), stop.requested)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            if torch.isfinite(grad_norm):
                optimizer.step()
            step += 1
            if after_step:
                with torch.no_grad():
                    after_step(step)
            position += 1
            steps_this_call += 1
            frames_seen += int(batch["feature_lengths"].sum())
            for k, v in step_metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if step % config.log_every == 0 or step == config.steps:
                elapsed = time.perf_counter() - started
                metrics = {k: v / count for k, v in sums.items()}
                metrics.update(step=step, epoch=epoch, lr=config.lr_at(step - 1), grad_norm=float(grad_norm),
                               frames_per_second=frames_seen / max(elapsed, 1e-9), elapsed=elapsed)
                if rank == 0:
                    with open(out_dir / "train_log.jsonl", "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                if on_log:
                    on_log(step, metrics)
                sums, count = {}, 0
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint()
                if on_checkpoint:
                    on_checkpoint(step, metrics)
            if stop.requested or (stop_after is not None and steps_this_call >= stop_after):
                checkpoint()
                interrupted = True
                break
    for m in modules.values():
        m.eval()
    return {**metrics, "step": step, "interrupted": interrupted}


def method_bank(config, model: nn.Module, progress_dir: Path, log: Callable[[str], None] = lambda line: None,
                bar: Callable[[str, int, int], None] | None = None) -> FeatureBank:
    """A training-time method's featurized ``config.data`` (at most ``config.max_duration`` seconds per
    utterance), built once in ``progress_dir/bank`` by process 0 (a resumed run reuses it) and read by all."""
    from asrshrink.audio.datasets import open_dataset

    bank_dir = progress_dir / "bank"
    rank, world = process_rank()
    if not (bank_dir / "index.json").is_file() and rank == 0:
        dataset = open_dataset(config.data, vocabulary=model.vocabulary, sample_rate=model.feature_config.sample_rate,
                               max_duration=config.max_duration)
        log(f"featurizing {len(dataset)} utterances of {dataset.source}")
        FeatureBank.build(dataset, model.featurizer, model.vocabulary, bank_dir,
                          (lambda d, t: bar("featurizing", d, t)) if bar else None)
    if world > 1:
        torch.distributed.barrier()  # the others read the bank process 0 wrote
    return FeatureBank.load(bank_dir)


def method_train_config(config, device: str) -> TrainConfig:
    """The loop's options from a training-time method's config (steps, lr, warmup, batch sizes, seed,
    checkpoint interval, SpecAugment)."""
    return TrainConfig(steps=config.steps, lr=config.lr, warmup_steps=config.warmup, max_frames=config.max_frames,
                       max_batch=config.max_batch, seed=config.seed, checkpoint_every=config.checkpoint_every,
                       log_every=10, spec_augment=config.spec_augment, device=device)


def read_training_progress(progress_dir: Path) -> dict | None:
    """The resumable progress of a run of a training-time method (``Method.read_progress``): its options
    (options.json, written by the pipeline) once a training checkpoint exists; None before that."""
    if not (progress_dir / CHECKPOINT).is_file():
        return None
    try:
        options = json.loads((progress_dir / "options.json").read_text())
    except (OSError, ValueError):
        return None
    return {"source_sha256": options.get("source_sha256"), "options": options, "seconds": 0.0}


def process_rank() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _reduce_gradients(params: list[torch.Tensor], weight: float, stop: bool) -> bool:
    """Sum every gradient across processes, each process's weighted by its share of ``weight`` (labels), in one
    flattened all-reduce; returns whether any process asked to stop."""
    total = torch.tensor([weight, float(stop)], dtype=torch.float64, device=params[0].device)
    torch.distributed.all_reduce(total)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads]) * (weight / max(float(total[0]), 1e-30))
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
    return bool(total[1] > 0)


def _load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to read the file: say which file and what to do
        raise CheckpointError(f"{path}: cannot resume from this training checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); delete it to start over") from None


def load_trained_modules(out_dir: str | Path, modules: dict[str, nn.Module]) -> int:
    """Load module weights from a training checkpoint (e.g. to export a model); returns its step."""
    state = _load_state(Path(out_dir) / CHECKPOINT)
    for name, module in modules.items():
        module.load_state_dict(state["modules"][name])
    return int(state["step"])

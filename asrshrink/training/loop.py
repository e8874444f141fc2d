"""A resumable training loop shared by training-time methods (reference training, fine-tuning, distillation).

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

from asrshrink.errors import CheckpointError
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
          stop_after: int | None = None) -> dict[str, float]:
    """Train ``model`` (and ``extra_modules``, e.g. an auxiliary head) by minimising ``loss_fn(batch)``.

    Writes ``out_dir/train_state.pt`` and appends one JSON line per log step to ``out_dir/train_log.jsonl``.
    ``stop_after`` stops (with a checkpoint) after that many steps in this call, as an interruption would.
    Returns the last logged metrics plus ``step`` and ``interrupted``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    extra_modules = extra_modules or {}
    modules = {"model": model, **extra_modules}
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sampler = BucketSampler(bank.lengths, max_frames=config.max_frames, max_batch=config.max_batch,
                            seed=config.seed)
    torch.manual_seed(config.seed)
    augment_rng = torch.Generator().manual_seed(config.seed + 1)
    step, epoch, position = 0, 0, 0
    if resume and (out_dir / CHECKPOINT).exists():
        state = _load_state(out_dir / CHECKPOINT)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        augment_rng.set_state(state["augment_rng"])
        step, epoch, position = state["step"], state["epoch"], state["position"]

    def checkpoint() -> None:
        state = {"modules": {n: m.state_dict() for n, m in modules.items()}, "optimizer": optimizer.state_dict(),
                 "torch_rng": torch.get_rng_state(), "augment_rng": augment_rng.get_state(), "step": step,
                 "epoch": epoch, "position": position, "config": json.dumps(asdict(config))}
        atomic_write(out_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    from asrshrink.audio.features import spec_augment

    metrics: dict[str, float] = {}
    sums: dict[str, float] = {}
    count = 0
    started = time.perf_counter()
    frames_seen = 0
    steps_this_call = 0
    interrupted = False
    batches = sampler.epoch(epoch)
    for m in modules.values():
        m.train()
    with StopRequested() as stop:
        while step < config.steps:
            if position >= len(batches):
                epoch, position = epoch + 1, 0
                batches = sampler.epoch(epoch)
            batch = bank.batch(batches[position])
            if config.spec_augment:
                batch["features"] = spec_augment(batch["features"], batch["feature_lengths"], augment_rng)
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            loss, step_metrics = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
            if torch.isfinite(grad_norm):
                optimizer.step()
            step += 1
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

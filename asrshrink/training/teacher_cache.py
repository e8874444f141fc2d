"""The teacher's side of distillation computed once (``asrshrink distill --teacher-cache DIR``).

DIR holds what the distillation objective reads from the teacher, for every utterance of the training bank:
its beam hypotheses (``beams.json``, for the top-beam / beam objectives and pseudo-labels) and its lattice
log-probabilities at the run's temperature (``posteriors-NNNNN.safetensors``, float16: (T', U+1, 3) per
lattice with ``--collapsed``, (T', U+1, V) without), computed on the unaugmented features. ``meta.json`` is
written last: a folder without it is an unfinished cache and is rebuilt. It also records a fingerprint (the
teacher's sha256, the training bank's, the featurizer, vocabulary and objective options), so a cache made for
another teacher, other data or other options is refused rather than silently used; with a complete matching
cache, training does not load the teacher at all.

Keys: the bank position ``i`` for the ground-truth lattice, ``i/h`` for the lattice of its h-th hypothesis.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from asrshrink.errors import AsrshrinkError
from asrshrink.io import sha256_file, write_json_atomic

FORMAT = 1
META = "meta.json"
BEAMS = "beams.json"
SHARD_BYTES = 128 * 2 ** 20
GROUP_ELEMENTS = 2 ** 25  # joint outputs (rows x frames x labels x width) computed at once while building
GROUP_UTTERANCES = 16
OPEN_SHARDS = 32          # shard files a reader keeps open at once


def _shard_name(k: int) -> str:
    return f"posteriors-{k:05d}.safetensors"


def _ours(name: str) -> bool:
    return name in (META, BEAMS) or (name.startswith("posteriors-") and ".safetensors" in name) or ".tmp" in name


def bank_fingerprint(bank_dir: Path) -> str:
    """The training bank's identity: the sha256 of its index (utterance ids, labels and frame counts) and of
    its features (other audio with the same ids and lengths is other data)."""
    return sha256_file(Path(bank_dir) / "index.json") + sha256_file(Path(bank_dir) / "features.f16")


def fingerprint_difference(found: dict, wanted: dict) -> list[str]:
    return sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))


def read_meta(directory: Path) -> dict | None:
    """The cache's meta.json, or None for a folder without one (new, or an unfinished cache)."""
    path = Path(directory) / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format') if isinstance(meta, dict) else '?'} is not {FORMAT}")
    except (OSError, ValueError) as exc:
        raise AsrshrinkError(f"{path}: not a teacher cache this version reads ({exc}); remove {directory} or use "
                             f"another --teacher-cache folder") from None
    return meta


def complete_cache(directory: Path, fingerprint: dict) -> dict | None:
    """The meta of a finished cache in ``directory`` made with ``fingerprint``; None when there is none yet.
    A finished cache of another teacher, data or options is an error naming what differs."""
    meta = read_meta(directory)
    if meta is None:
        return None
    differs = fingerprint_difference(meta.get("fingerprint", {}), fingerprint)
    if differs:
        raise AsrshrinkError(f"{directory}: holds the teacher cache of another run (it differs in "
                             f"{', '.join(differs)}); use another --teacher-cache folder or remove this one")
    return meta


def _prepare_folder(directory: Path) -> None:
    """Make ``directory`` ready for a new cache: refuse a folder holding anything else; drop an unfinished
    cache's files."""
    directory.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in directory.iterdir() if not _ours(p.name))
    if foreign:
        raise AsrshrinkError(f"{directory}: --teacher-cache needs an empty folder or a teacher cache; it holds "
                             f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}")
    for p in directory.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_space(directory: Path, needed: int, collapsed: bool) -> None:
    free = shutil.disk_usage(directory).free
    if needed > 0.9 * free:
        raise AsrshrinkError(f"{directory}: the teacher's posteriors need about {needed / 1e9:.1f} GB and its disk "
                             f"has {free / 1e9:.1f} GB free; "
                             + ("use a folder on a larger disk or less --data" if collapsed else
                                "add --collapsed (3 numbers per lattice node instead of the vocabulary) or use a "
                                "folder on a larger disk"))


class ShardWriter:
    """Accumulates float16 tensors by key and writes them in shards of about ``SHARD_BYTES``."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.to(torch.float16).contiguous()
        self.pending[key] = tensor
        self.size += tensor.numel() * 2
        if self.size >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.directory / _shard_name(len(self.shards))
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.pending, str(tmp))
        os.replace(tmp, path)
        self.shards.append(sorted(self.pending))
        self.total += self.size
        self.pending, self.size = {}, 0


class CacheReader:
    """Reads a finished cache's tensors by key. Shards are memory-mapped when first read, and at most
    ``OPEN_SHARDS`` stay open (the least recently read is closed first), so a cache of thousands of shards
    does not exhaust file descriptors."""

    def __init__(self, directory: Path, meta: dict):
        self.directory = Path(directory)
        self.shard_of: dict[str, int] = {}
        self.frames: dict[int, int] = {int(k): int(v) for k, v in meta["frames"].items()}
        self.lattice_lengths: dict[str, int] = dict(meta["lengths"])
        self.width = int(meta["width"])
        self.handles: OrderedDict[int, object] = OrderedDict()
        for k, keys in enumerate(meta["shards"]):
            for key in keys:
                self.shard_of[key] = k

    def _handle(self, k: int):
        from safetensors import safe_open

        if k in self.handles:
            self.handles.move_to_end(k)
            return self.handles[k]
        path = self.directory / _shard_name(k)
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # a missing or damaged shard: say which and what to do
            raise AsrshrinkError(f"{path}: cannot read this teacher cache shard ({type(exc).__name__}); remove "
                                 f"{self.directory} to rebuild the cache") from None
        self.handles[k] = handle
        while len(self.handles) > OPEN_SHARDS:
            self.handles.popitem(last=False)
        return handle

    def get(self, key: str) -> torch.Tensor:
        """The (T', U+1, K) float32 log-probabilities stored under ``key``, checked against the meta."""
        if key not in self.shard_of:
            raise AsrshrinkError(f"{self.directory}: the teacher cache has no lattice {key!r}; remove it to rebuild")
        k = self.shard_of[key]
        tensor = self._handle(k).get_tensor(key)
        utt = int(key.split("/")[0])
        expected = (self.frames[utt], self.lattice_lengths[key] + 1, self.width)
        if tuple(tensor.shape) != expected or tensor.dtype != torch.float16:
            raise AsrshrinkError(f"{self.directory / _shard_name(k)}: lattice {key!r} is {tensor.dtype} "
                                 f"{tuple(tensor.shape)}, expected float16 {expected}; remove the folder to rebuild")
        return tensor.float()


def groups_within(utterances: list[int], size: Callable[[int], tuple[int, int, int]],
                  elements: int | None = None, most: int | None = None) -> list[list[int]]:
    """Consecutive groups of ``utterances`` whose padded joint output stays within ``elements`` numbers:
    ``size(i)`` is (lattice rows, frames, labels + 1 x width) of utterance i, and a group costs its rows times
    its longest frames times its largest label width (the batch is padded to both). An utterance over the
    budget on its own forms a group alone. At most ``most`` utterances per group (defaults: the module's
    ``GROUP_ELEMENTS`` and ``GROUP_UTTERANCES``)."""
    elements = GROUP_ELEMENTS if elements is None else elements
    most = GROUP_UTTERANCES if most is None else most
    groups: list[list[int]] = []
    current: list[int] = []
    rows = frames = width = 0
    for i in utterances:
        r, t, w = size(i)
        cost = (rows + r) * max(frames, t) * max(width, w)
        if current and (cost > elements or len(current) >= most):
            groups.append(current)
            current, rows, frames, width = [], 0, 0, 0
        current.append(i)
        rows, frames, width = rows + r, max(frames, t), max(width, w)
    if current:
        groups.append(current)
    return groups


def build_cache(directory: Path, fingerprint: dict, *, groups: list[list[int]], lattices: Callable,
                hypotheses: dict | None, width: int, estimate: int, collapsed: bool,
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Write a new cache: ``lattices(group)`` yields (key, frames, label count, log-probs) for each group of
    bank positions in ``groups``; ``hypotheses`` (or None) go to beams.json. Returns the meta (written last).
    The caller holds the folder's lock (``OutputLock``)."""
    directory = Path(directory)
    _prepare_folder(directory)
    check_space(directory, estimate, collapsed)
    if hypotheses is not None:
        write_json_atomic(directory / BEAMS, {str(k): v for k, v in hypotheses.items()})
    writer = ShardWriter(directory)
    frames: dict[str, int] = {}
    lengths: dict[str, int] = {}
    utterances = [i for group in groups for i in group]
    done = 0
    for group in groups:
        for key, t, u, log_probs in lattices(group):
            frames[key.split("/")[0]] = t
            lengths[key] = u
            writer.add(key, log_probs)
        done += len(group)
        if progress:
            progress(done, len(utterances))
    writer.flush()
    for i in utterances:
        frames.setdefault(str(i), -1)
    meta = {"format": FORMAT, "fingerprint": fingerprint, "width": width, "frames": frames, "lengths": lengths,
            "shards": writer.shards, "bytes": writer.total, "utterances": len(utterances)}
    write_json_atomic(directory / META, meta)
    return meta


def read_beams(directory: Path) -> dict[int, list[tuple[list[int], float]]]:
    path = Path(directory) / BEAMS
    try:
        data = json.loads(path.read_text())
        return {int(k): [(list(map(int, t)), float(w)) for t, w in v] for k, v in data.items()}
    except (OSError, ValueError, TypeError) as exc:
        raise AsrshrinkError(f"{path}: cannot read the teacher's beams ({type(exc).__name__}); remove "
                             f"{directory} to rebuild the cache") from None

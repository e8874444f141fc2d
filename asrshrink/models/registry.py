"""Registry of model families: build by name, detect from a foreign checkpoint's state dict."""

from __future__ import annotations

from typing import Callable

import torch

from asrshrink.errors import CheckpointError
from asrshrink.models.base import Transducer

FAMILIES: dict[str, type[Transducer]] = {}


def register_family(name: str) -> Callable[[type[Transducer]], type[Transducer]]:
    """Class decorator: make a Transducer subclass available under ``name``."""

    def wrap(cls: type[Transducer]) -> type[Transducer]:
        cls.family = name
        FAMILIES[name] = cls
        return cls

    return wrap


def _load_builtin_families() -> None:
    from asrshrink.models import mlperf_rnnt, nemo_conformer  # noqa: F401  (register themselves)


def get_family(name: str) -> type[Transducer]:
    _load_builtin_families()
    if name not in FAMILIES:
        raise CheckpointError(f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def detect_family(state_dict: dict[str, torch.Tensor], source: str) -> type[Transducer]:
    """The family whose foreign checkpoint layout matches ``state_dict`` (keys of a training checkpoint)."""
    _load_builtin_families()
    for cls in FAMILIES.values():
        if cls.matches_foreign(state_dict):
            return cls
    sample = ", ".join(list(state_dict)[:4])
    raise CheckpointError(
        f"{source}: not a checkpoint of a known model family (keys start {sample}); "
        f"known families: {', '.join(sorted(FAMILIES))}")

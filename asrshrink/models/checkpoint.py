"""Loading models from any accepted file (foreign training checkpoints, asrshrink's own format, output
directories) without unpickling code, and writing asrshrink's own self-describing format.

asrshrink's format is a safetensors file whose metadata entry ``asrshrink`` holds JSON: format version,
family, full config, compression structure, asrshrink version and the source checkpoint's sha256.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import asrshrink
from asrshrink.errors import CheckpointError
from asrshrink.io import atomic_write, sha256_file
from asrshrink.models.base import Transducer
from asrshrink.models.layers import model_structure
from asrshrink.models.registry import detect_family, get_family

MODEL_FILENAME = "model.safetensors"
FORMAT_VERSION = 1
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_MODEL = ASSETS / "reference" / MODEL_FILENAME


@dataclass
class ModelInfo:
    """Where a model came from and what its file said about itself."""

    path: Path
    kind: str                      # "foreign" (a family's training checkpoint) or "asrshrink"
    sha256: str
    source_sha256: str             # the original checkpoint's hash, carried through every asrshrink output
    structure: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def bundled_speech(split: str, option: str) -> Path:
    """The bundled speech sample's ``split`` ("calib" or "test"), or an error naming the ``option`` to pass."""
    path = ASSETS / "speech" / split
    if not path.is_dir():
        raise CheckpointError(f"no {option} given and this installation has no bundled speech sample; pass "
                              f"{option} PATH (a LibriSpeech folder, a folder of audio + .txt, or a JSONL/MLPerf "
                              f"manifest)")
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    """The file behind a MODEL argument: a checkpoint file, or an output directory, or the bundled default."""
    if model is None:
        if DEFAULT_MODEL.is_file():
            return DEFAULT_MODEL
        raise CheckpointError("no MODEL given and this installation has no bundled default model; "
                              "pass a checkpoint (.pt), an asrshrink model (.safetensors) or an output directory")
    path = Path(model)
    if path.is_dir():
        inner = path / MODEL_FILENAME
        if not inner.is_file():
            raise CheckpointError(f"{path}: directory has no {MODEL_FILENAME}; pass a directory written by "
                                  f"asrshrink, or the checkpoint file itself")
        return inner
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the MODEL path")
    return path


def load_model(model: str | Path | None = None) -> tuple[Transducer, ModelInfo]:
    """Load a model in eval mode from a foreign checkpoint, an asrshrink file or directory, or the default."""
    path = resolve_model_path(model)
    digest = sha256_file(path)
    kind = _file_format(path)
    if kind == "safetensors":
        net, meta = _load_native(path)
        info = ModelInfo(path, "asrshrink", digest, meta.get("source_sha256", digest),
                         structure=meta.get("structure", {}), extra=meta)
    elif kind == "nemo":
        from asrshrink.models.nemo_archive import read_nemo

        config, state_dict, files = read_nemo(path)
        family = detect_family(state_dict, str(path))
        net = family.from_foreign(state_dict, str(path), config=config, files=files)
        info = ModelInfo(path, "foreign", digest, digest)
    else:
        checkpoint = read_torch_checkpoint(path)
        state_dict = _state_dict_of(checkpoint, path)
        family = detect_family(state_dict, str(path))
        net = family.from_foreign(state_dict, str(path))
        extra = {k: v for k, v in checkpoint.items() if k in ("epoch",)} if isinstance(checkpoint, dict) else {}
        info = ModelInfo(path, "foreign", digest, digest, extra=extra)
    return net.eval(), info


def read_torch_checkpoint(path: Path | BinaryIO, source: str | None = None) -> Any:
    """``torch.load`` restricted to tensors and plain containers; every failure becomes a CheckpointError.

    ``path`` is a file name or an open binary file; ``source`` names it in errors (default: ``path``)."""
    file, path = path, (source if source is not None else path)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text:
            raise CheckpointError(
                f"{path}: refused: the file contains pickled Python objects that would run code when loaded; "
                f"re-save only the tensors (torch.save({{'state_dict': model.state_dict()}})) and retry") from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(text)}); "
                              f"download or copy it again") from None
    except (EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError,
            AttributeError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint, or not a PyTorch file "
                              f"({type(exc).__name__}: {_first_line(str(exc))}); download or copy it again") from None


def _first_line(text: str) -> str:
    """The line of an error message that says what went wrong (torch's weights-only errors open with a banner
    and name the cause on a later "WeightsUnpickler error:" line)."""
    lines = text.strip().splitlines()
    cause = [line for line in lines if "WeightsUnpickler error:" in line]
    line = cause[0].split("WeightsUnpickler error:", 1)[1].strip() if cause else (lines[0] if lines else "")
    return line[:160]


def _state_dict_of(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        sd = checkpoint["state_dict"]
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        sd = checkpoint
    else:
        raise CheckpointError(f"{path}: no state dict found (expected a dict of tensors or a dict with a "
                              f"'state_dict' entry); pass the model checkpoint, not an optimizer or data file")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}  # saved from a DistributedDataParallel wrapper
    return sd


def _file_format(path: Path) -> str:
    """"safetensors" or "torch" from the file's first bytes; CheckpointError for anything else."""
    from asrshrink.models.nemo_archive import is_nemo_archive

    if path.suffix == ".safetensors":
        return "safetensors"
    with open(path, "rb") as f:
        head = f.read(512)
    # safetensors: 8-byte little-endian header length, then a JSON object.
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save writes a zip archive, or (before 1.6) a pickle
        return "torch"
    if is_nemo_archive(head):  # a NeMo .nemo archive: tar, or gzipped tar before NeMo 1.7
        return "nemo"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint or an asrshrink model (neither a zip archive nor "
                          f"a pickle); pass a .pt checkpoint, a .nemo archive, a .safetensors model or an output directory")


def _load_native(path: Path) -> tuple[Transducer, dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("asrshrink")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated model file ({_first_line(str(exc))}); "
                              f"write it again with asrshrink") from None
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file without asrshrink metadata; asrshrink reads its own "
                              f"outputs or a model family's training checkpoint (.pt)")
    try:
        meta = json.loads(raw)
        family = get_family(meta["family"])
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(f"{path}: written by a newer asrshrink (format {meta['format_version']}); "
                                  f"upgrade asrshrink")
        net = family.from_config_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid asrshrink metadata ({exc}); write the model again") from None
    if meta.get("structure"):
        net.apply_structure(meta["structure"])
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith("featurizer.")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match its config (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); write the model again")
    for key, ref in expected.items():
        if tensors[key].shape != ref.shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, its config "
                                  f"says {tuple(ref.shape)}; write the model again")
    net.load_state_dict(tensors, strict=False)
    return net, meta


def save_model(model: Transducer, path: str | Path, *, source_sha256: str = "",
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` in asrshrink's format, atomically. ``path`` is a file or a directory (gets model.safetensors).

    The compression structure (every replaced module and its shape) is read off the model itself."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / MODEL_FILENAME
    meta = {
        "format": "asrshrink",
        "format_version": FORMAT_VERSION,
        "family": model.family,
        "config": model.config_dict(),
        "structure": model_structure(model),
        "asrshrink_version": asrshrink.__version__,
        "source_sha256": source_sha256,
        **(extra or {}),
    }
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
               if not k.startswith("featurizer.")}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"asrshrink": json.dumps(meta)}))

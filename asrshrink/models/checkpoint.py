"""Loading models from any accepted file (foreign training checkpoints, asrshrink's own format, output
directories) without unpickling code, and writing asrshrink's own self-describing format.

asrshrink's format is a safetensors file whose metadata entry ``asrshrink`` holds JSON: format version,
family, full config, compression structure, asrshrink version and the source checkpoint's sha256.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import stat
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

import asrshrink
from asrshrink.audio.datasets import BUNDLED_SPEECH
from asrshrink.errors import AsrshrinkError, CheckpointError
from asrshrink.io import atomic_write, sha256_file
from asrshrink.models.base import Transducer
from asrshrink.models.layers import model_structure
from asrshrink.models.registry import detect_family, get_family
from asrshrink.models.sharing import SharingPlan, check_tied, model_aliases, plan_aliases, tie
from asrshrink.models.validate import (REWRITE, check_config, check_dtype, check_finite, check_shape,
                                       check_structure, check_tensors)

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
    path = BUNDLED_SPEECH / split
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
    """Load a model in eval mode from a foreign checkpoint, an asrshrink file or directory, or the default.

    The file's format is read from its first bytes (regular files only) before it is hashed, and every
    tensor, config and structure is validated (``asrshrink.models.validate``) before a network is built."""
    path = resolve_model_path(model)
    file_format = _file_format(path)
    digest = sha256_file(path)
    if file_format == "safetensors":
        net, meta = _load_native(path)
        info = ModelInfo(path, "asrshrink", digest, meta.get("source_sha256") or digest,
                         structure=meta.get("structure") or {}, extra=meta)
    elif file_format == "nemo":
        from asrshrink.models.nemo_archive import read_nemo

        config, state_dict, files = read_nemo(path)
        check_tensors(state_dict, str(path), fix=FOREIGN_FIX)
        family = detect_family(state_dict, str(path))
        net = family.from_foreign(state_dict, str(path), config=config, files=files)
        info = ModelInfo(path, "foreign", digest, digest)
    else:
        checkpoint = read_torch_checkpoint(path)
        state_dict = _state_dict_of(checkpoint, path)
        check_tensors(state_dict, str(path), fix=FOREIGN_FIX)
        family = detect_family(state_dict, str(path))
        net = family.from_foreign(state_dict, str(path))
        extra = {k: v for k, v in checkpoint.items() if k in ("epoch",)} if isinstance(checkpoint, dict) else {}
        info = ModelInfo(path, "foreign", digest, digest, extra=extra)
    return net.eval(), info


FOREIGN_FIX = "pass an intact checkpoint of a trained model"
#: Modules a weights-only PyTorch checkpoint's pickle may name (tensor rebuilding and plain containers).
_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset",
                         "builtins.bytearray", "_codecs.encode", "numpy.core.multiarray._reconstruct",
                         "numpy.dtype", "numpy.ndarray")


def _pickle_stream(path: Path | BinaryIO) -> bytes:
    """The pickle bytes of a checkpoint (a path, or an open binary file, left where it was): ``data.pkl`` of a
    zip archive, else the first 16 MB."""
    if not isinstance(path, (str, Path)):
        start = path.tell()
        try:
            if zipfile.is_zipfile(path):
                path.seek(start)
                with zipfile.ZipFile(path) as archive:
                    names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                    return archive.read(names[0])[: 16 << 20] if names else b""
            path.seek(start)
            return path.read(16 << 20)
        finally:
            path.seek(start)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            return archive.read(names[0])[: 16 << 20] if names else b""
    with open(path, "rb") as f:
        return f.read(16 << 20)


def pickle_globals(data: bytes) -> list[str]:
    """The "module.name" globals a pickle stream imports (GLOBAL, STACK_GLOBAL, INST), read with pickletools:
    nothing is executed. Several concatenated pickles (the legacy torch format) are all read."""
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str] = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pickletools warns on odd escapes in garbage
                ops = list(_genops(stream))
            for opcode, arg in ops:
                if opcode.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # a truncated or garbled stream: report what was read so far
            break
    return found


def _genops(stream: io.BytesIO):
    """(opcode, arg) pairs of one pickle; on a broken stream, those read before the break."""
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            yield opcode, arg
    except Exception:
        stream.seek(0, io.SEEK_END)


def _code_globals(path: Path | BinaryIO) -> list[str]:
    try:
        names = pickle_globals(_pickle_stream(path))
    except (OSError, zipfile.BadZipFile, ValueError, KeyError, RuntimeError):
        return []
    return [n for n in names if not n.startswith(_SAFE_GLOBAL_PREFIXES)]


def _refuse_code(path: Path, names: list[str]) -> CheckpointError:
    shown = ", ".join(dict.fromkeys(names[:3]))
    return CheckpointError(
        f"{path}: refused: the file holds pickled code that would run code when loaded (it imports and calls "
        f"{shown}); asrshrink never runs code from a checkpoint. Ask its author for a weights-only file, e.g. "
        f"torch.save({{'state_dict': model.state_dict()}}, 'model.pt')")


def read_torch_checkpoint(path: Path | BinaryIO, source: str | None = None) -> Any:
    """``torch.load`` restricted to tensors and plain containers; every failure becomes a CheckpointError.

    ``path`` is a file name or an open binary file; ``source`` names it in errors (default: ``path``). A file
    whose pickle would import anything beyond tensor rebuilding is refused by name before torch reads it;
    torch's own weights-only refusal is the second line of defence."""
    file, path = path, (source if source is not None else path)
    code = _code_globals(file)
    if code:
        raise _refuse_code(path, code)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise CheckpointError(
                f"{path}: refused: the file contains pickled Python objects ({_first_line(text)}) that asrshrink "
                f"does not load; ask its author for a weights-only file, e.g. "
                f"torch.save({{'state_dict': model.state_dict()}}, 'model.pt')") from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({_first_line(text)}); "
                              f"download or copy it again") from None
    except (EOFError, RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError,
            AttributeError, TypeError, UnicodeDecodeError, MemoryError, OverflowError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint, or not a PyTorch file "
                              f"({type(exc).__name__}: {_first_line(str(exc))}); download or copy it again") from None


def _first_line(text: str) -> str:
    """The line of an error message that says what went wrong (torch's weights-only errors open with a banner
    and name the cause on a later "WeightsUnpickler error:" line)."""
    lines = text.strip().splitlines()
    cause = [line for line in lines if "WeightsUnpickler error:" in line]
    line = cause[0].split("WeightsUnpickler error:", 1)[1].strip() if cause else (lines[0] if lines else "")
    globals_ = [g for g in lines if "GLOBAL" in g]
    if globals_:  # torch's banner advises weights_only=False, which would run the code: name the global only
        line = globals_[0].strip()
    elif "weights_only" in line:
        line = "not a weights-only checkpoint"
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
    """"safetensors", "torch" or "nemo" from a regular file's first bytes; CheckpointError for anything else
    (FIFOs, devices and sockets are refused before a byte is read, so they cannot hang the command)."""
    from asrshrink.models.nemo_archive import is_nemo_archive

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror}); check the MODEL path") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise CheckpointError(f"{path}: {kind}, not a model file; pass a .pt checkpoint, a .nemo archive, a "
                              f".safetensors model or an output directory")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror}); check the MODEL path and its "
                              f"permissions") from None
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a model; copy or download it again")
    if path.suffix == ".safetensors":
        return "safetensors"
    # safetensors: 8-byte little-endian header length, then a JSON object.
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save writes a zip archive, or (before 1.6) a pickle
        return "torch"
    if is_nemo_archive(head):  # a NeMo .nemo archive: tar, or gzipped tar before NeMo 1.7
        return "nemo"
    code = _code_globals(path)  # a protocol-0/1 pickle (text opcodes) that imports something
    if code:
        raise _refuse_code(path, code)
    raise CheckpointError(f"{path}: not a PyTorch checkpoint or an asrshrink model (neither a zip archive nor "
                          f"a pickle); pass a .pt checkpoint, a .nemo archive, a .safetensors model or an output "
                          f"directory")


def _load_native(path: Path) -> tuple[Transducer, dict[str, Any]]:
    """Read metadata and tensor shapes, validate them against the family's network built on the meta device
    (which allocates nothing), then read the tensors, check them and build the real network."""
    source = str(path)
    try:
        with safe_open(source, framework="pt") as f:
            raw = (f.metadata() or {}).get("asrshrink")
            slices = {k: f.get_slice(k) for k in f.keys()}
            shapes = {k: tuple(s.get_shape()) for k, s in slices.items()}
            dtypes = {k: s.get_dtype() for k, s in slices.items()}
    except (SafetensorError, OSError, ValueError, MemoryError, OverflowError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated model file ({_first_line(str(exc))}); "
                              f"{REWRITE}") from None
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file without asrshrink metadata; asrshrink reads its own "
                              f"outputs or a model family's training checkpoint (.pt)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid asrshrink metadata (not JSON: {exc}); {REWRITE}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("family"), str) or "config" not in meta:
        raise CheckpointError(f"{path}: invalid asrshrink metadata (no family or config); {REWRITE}")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{path}: invalid asrshrink metadata (format_version {version!r}); {REWRITE}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer asrshrink (format {version}); upgrade asrshrink")
    try:
        family = get_family(meta["family"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}; pass a model written by this asrshrink version, or upgrade "
                              f"asrshrink") from None
    for key in ("source_sha256",):
        if not isinstance(meta.get(key, ""), str):
            raise CheckpointError(f"{path}: invalid asrshrink metadata ({key} {meta[key]!r}); {REWRITE}")
    check_config(meta["config"], source, tensors=len(shapes))
    for key in shapes:
        check_dtype(key, dtypes[key], source)
        check_shape(key, shapes[key], source)
    structure = meta.get("structure") or {}
    plan = SharingPlan.from_json(meta["sharing"], source) if meta.get("sharing") is not None else None

    def build(device: str) -> Transducer:
        try:
            with torch.device(device):
                net = family.from_config_dict(meta["config"])
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}; {REWRITE}") from None
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as exc:
            raise CheckpointError(f"{path}: invalid asrshrink metadata ({type(exc).__name__}: "
                                  f"{_first_line(str(exc))}); {REWRITE}") from None
        check_structure(structure, net, source)
        try:
            net.apply_structure(structure)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return net

    skeleton = build("meta")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items() if not k.startswith("featurizer.")}
    aliases = _sharing_aliases(plan, skeleton, expected, source) if plan is not None else {}
    expected = {k: v for k, v in expected.items() if k not in aliases}
    del skeleton
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match its config (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}); {REWRITE}")
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise CheckpointError(f"{path}: tensor {key} has shape {shapes[key]}, its config says {shape}; "
                                  f"{REWRITE}")
    try:
        with safe_open(source, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, MemoryError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated model file ({_first_line(str(exc))}); "
                              f"{REWRITE}") from None
    for key, tensor in tensors.items():
        check_finite(key, tensor, source)
    net = build("cpu")
    net.load_state_dict(tensors, strict=False)
    if plan is not None:  # the tensors stored once are tied again: one storage per physical weight
        tie(net, aliases)
        net.sharing = plan
    for name, module in net.named_modules():
        if hasattr(module, "check_loaded"):  # layers whose buffers carry structure (an AmNet's branch masks)
            module.check_loaded(name, source)
    return net, meta


def _sharing_aliases(plan: SharingPlan, skeleton: Transducer, shapes: dict[str, tuple], source: str
                     ) -> dict[str, str]:
    """The alias map of a saved sharing plan, checked against the model its config and structure build: the
    plan's layers and kinds must be the model's, its indices in range, and every shared tensor of the shape of
    the physical one it stands for."""
    try:
        layout = skeleton.sharing_layout(plan.component)
        plan.check(layout, source, CheckpointError)
        aliases = plan_aliases(plan, layout, shapes)
    except (AsrshrinkError, CheckpointError) as exc:
        raise CheckpointError(f"{source}: invalid sharing plan: {_first_line(str(exc)).removeprefix(source + ': ')}"
                              f"; {REWRITE}") from None
    for alias, target in aliases.items():
        if shapes[alias] != shapes[target]:
            raise CheckpointError(f"{source}: invalid sharing plan: {alias} {shapes[alias]} would share {target} "
                                  f"{shapes[target]}; {REWRITE}")
    return aliases


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
    aliases = model_aliases(model)
    if model.sharing is not None:  # each shared tensor is stored once, under its physical layer's name
        check_tied(model, aliases)
        meta["sharing"] = model.sharing.to_json()
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
               if not k.startswith("featurizer.") and k not in aliases}
    for key, tensor in tensors.items():
        check_finite(key, tensor, str(path), fix="nothing was written; the method diverged on this model, try "
                                                 "other options or calibration data")
    # Serialised in memory and written with plain file I/O, so a full disk is an OSError naming errno
    # (safetensors' own writer raises a SafetensorError without one).
    data = safetensors_bytes(tensors, metadata={"asrshrink": json.dumps(meta)})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)

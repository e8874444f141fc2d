"""NeMo ``.nemo`` archives read without trusting them, and written back; NeMo configs turned into asrshrink's.

A ``.nemo`` file (NeMo >= 1.7; older ones are gzipped, also read here) is a tar archive holding
``model_config.yaml``, ``model_weights.ckpt`` (a ``torch.save`` zip of tensors) and the tokenizer files, named
``<32 hex>_tokenizer.model`` and so on and referred to from the config as ``nemo:<name>``. Reading happens in
memory: nothing is extracted to disk, every member name is checked (no absolute paths, no ``..``), links and
device files are refused, the YAML is read with the safe loader and the weights with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import math
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from asrshrink.audio.nemo_features import NemoFeatureConfig
from asrshrink.audio.text import SentencePieceVocabulary, Vocabulary
from asrshrink.errors import CheckpointError

CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
_MAX_MEMBERS = 1000
_MAX_SMALL = 64 << 20               # config and tokenizer files: a SentencePiece model is at most a few MB
SUPPORTED_TARGETS = ("nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel",
                     "nemo.collections.asr.models.rnnt_models.EncDecRNNTModel")


def is_nemo_archive(head: bytes) -> bool:
    """Whether a file's first 512 bytes start a tar archive (ustar magic) or a gzip stream."""
    return head[257:262] == b"ustar" or head[:2] == b"\x1f\x8b"


def read_nemo(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, bytes]]:
    """The config, the weights' state dict and the other small files (by member name) of a ``.nemo`` archive."""
    from asrshrink.models.checkpoint import read_torch_checkpoint

    try:
        with tarfile.open(path, mode="r:*") as tar:
            members = _checked_members(tar, path)
            if CONFIG not in members or WEIGHTS not in members:
                absent = [n for n in (CONFIG, WEIGHTS) if n not in members]
                raise CheckpointError(f"{path}: not a NeMo model archive (no {', '.join(absent)} inside); pass the "
                                      f".nemo file NeMo's save_to wrote")
            files = {}
            for name, member in members.items():
                if name == WEIGHTS:
                    continue
                if member.size > _MAX_SMALL:
                    raise CheckpointError(f"{path}: archive member {name} is {member.size} bytes, too large for a "
                                          f"config or tokenizer file; the archive is not a NeMo model")
                files[name] = _read_member(tar, member, path)
            weights = io.BytesIO(_read_member(tar, members[WEIGHTS], path))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated .nemo archive ({type(exc).__name__}: "
                              f"{str(exc)[:120]}); copy or download it again") from None
    try:
        config = yaml.safe_load(files[CONFIG].decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {CONFIG} inside the archive is not valid YAML "
                              f"({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {CONFIG} inside the archive is not a mapping of settings")
    checkpoint = read_torch_checkpoint(weights, source=f"{path} ({WEIGHTS})")
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: {WEIGHTS} inside the archive is not a dict of tensors")
    return config, dict(state_dict), files


def _checked_members(tar: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    for count, member in enumerate(tar, start=1):
        if count > _MAX_MEMBERS:
            raise CheckpointError(f"{path}: more than {_MAX_MEMBERS} archive members; not a NeMo model archive")
        raw = member.name
        name = PurePosixPath(raw)
        if raw.startswith(("/", "\\")) or ".." in name.parts or "\\" in raw or ":" in (name.parts[0] if name.parts else ""):
            raise CheckpointError(f"{path}: refused: archive member {raw!r} points outside the archive; the file "
                                  f"is not a genuine NeMo model")
        if member.isdir():
            continue
        if member.issym() or member.islnk():
            raise CheckpointError(f"{path}: refused: archive member {raw!r} is a link; NeMo archives hold only "
                                  f"regular files")
        if not member.isfile():
            raise CheckpointError(f"{path}: refused: archive member {raw!r} is not a regular file")
        key = str(name)  # "./model_config.yaml" -> "model_config.yaml"
        if key in members:
            raise CheckpointError(f"{path}: archive member {key!r} appears twice; the archive is not a NeMo model")
        members[key] = member
    return members


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> bytes:
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise CheckpointError(f"{path}: archive member {member.name} is truncated; copy or download the file again")
    return data


# --- NeMo config -> NemoConformerConfig ---------------------------------------------------------------------

def _section(cfg: dict, key: str, source: str) -> dict:
    value = cfg.get(key)
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: model_config.yaml has no '{key}' section")
    return value


def _get(section: dict, key: str, where: str, source: str, kind: type | tuple = int, default: Any = ...) -> Any:
    if key not in section or section[key] is None and default is not ...:
        if default is ...:
            raise CheckpointError(f"{source}: model_config.yaml has no {where}.{key}")
        return default
    value = section[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise CheckpointError(f"{source}: {where}.{key}={value!r} in model_config.yaml is not "
                              f"{' or '.join(k.__name__ for k in kinds)}")
    return value


def _require(section: dict, key: str, allowed: tuple, where: str, source: str) -> None:
    """Refuse a setting whose value asrshrink does not compute (absent keys take NeMo's default, allowed[0])."""
    if key in section and section[key] not in allowed:
        raise CheckpointError(f"{source}: {where}.{key}={section[key]!r} is not supported by the "
                              f"nemo-conformer-transducer family (supported: {', '.join(map(repr, allowed))})")


def config_from_nemo(cfg: dict, files: dict[str, bytes], state_dict: dict[str, torch.Tensor], source: str):
    """The NemoConformerConfig a NeMo model config describes; a one-line error for anything unsupported."""
    from asrshrink.models.nemo_conformer import NemoConformerConfig

    target = cfg.get("target")
    if target is not None and target not in SUPPORTED_TARGETS:
        raise CheckpointError(f"{source}: target={target!r} is not supported; asrshrink reads NeMo transducers "
                              f"({', '.join(t.rsplit('.', 1)[1] for t in SUPPORTED_TARGETS)})")
    pre = _section(cfg, "preprocessor", source)
    enc = _section(cfg, "encoder", source)
    dec = _section(cfg, "decoder", source)
    joint = _section(cfg, "joint", source)
    for section, where, suffix in ((pre, "preprocessor", "AudioToMelSpectrogramPreprocessor"),
                                   (enc, "encoder", "ConformerEncoder"), (dec, "decoder", "RNNTDecoder"),
                                   (joint, "joint", "RNNTJoint")):
        name = str(section.get("_target_", suffix))
        if not name.endswith(suffix):
            raise CheckpointError(f"{source}: {where}._target_={name!r} is not supported (expected {suffix})")

    for key, allowed in (("window", ("hann",)), ("frame_splicing", (1,)), ("lowfreq", (0, 0.0)),
                         ("highfreq", (None,)), ("log", (True,)), ("log_zero_guard_type", ("add",)),
                         ("log_zero_guard_value", (2 ** -24,)), ("exact_pad", (False,)), ("mel_norm", ("slaney",)),
                         ("normalize", ("per_feature", "NA", None)), ("stft_exact_pad", (False,)),
                         ("stft_conv", (False,)), ("nb_augmentation_prob", (0, 0.0))):
        _require(pre, key, allowed, "preprocessor", source)
    rate = _get(pre, "sample_rate", "preprocessor", source, default=16000)
    window_size = float(_get(pre, "window_size", "preprocessor", source, (int, float), 0.02))
    n_fft = _get(pre, "n_fft", "preprocessor", source, default=None)
    if n_fft is None:
        n_fft = 2 ** math.ceil(math.log2(round(window_size * rate)))
    try:
        feature = NemoFeatureConfig(
            sample_rate=rate, window_size=window_size,
            window_stride=float(_get(pre, "window_stride", "preprocessor", source, (int, float), 0.01)),
            n_fft=n_fft, features=_get(pre, "features", "preprocessor", source, default=64),
            preemph=float(_get(pre, "preemph", "preprocessor", source, (int, float), 0.97) or 0.0),
            mag_power=float(_get(pre, "mag_power", "preprocessor", source, (int, float), 2.0)),
            normalize="per_feature" if pre.get("normalize", "per_feature") == "per_feature" else "none",
            pad_to=_get(pre, "pad_to", "preprocessor", source, default=16))
    except ValueError as exc:
        raise CheckpointError(f"{source}: preprocessor settings not usable ({exc})") from None

    for key, allowed in (("self_attention_model", ("rel_pos",)), ("conv_norm_type", ("batch_norm",)),
                         ("causal_downsampling", (False,)), ("reduction", (None,)), ("feat_out", (-1,)),
                         ("conv_context_size", (None,)), ("use_bias", (True,)), ("att_context_style", ("regular",)),
                         ("global_tokens", (0,)), ("stochastic_depth_drop_prob", (0, 0.0))):
        _require(enc, key, allowed, "encoder", source)
    context = enc.get("att_context_size", [-1, -1])
    if context not in (None, [-1, -1], [[-1, -1]]):
        raise CheckpointError(f"{source}: encoder.att_context_size={context!r} is not supported (full context "
                              f"[-1, -1] only; limited-context and streaming models are not)")
    d_model = _get(enc, "d_model", "encoder", source)
    channels = _get(enc, "subsampling_conv_channels", "encoder", source, default=-1)

    _require(dec, "normalization_mode", (None,), "decoder", source)
    _require(dec, "blank_as_pad", (True,), "decoder", source)
    prednet = _section(dec, "prednet", source)
    jointnet = _section(joint, "jointnet", source)
    _require(jointnet, "activation", ("relu",), "joint.jointnet", source)
    _require(joint, "log_softmax", (None,), "joint", source)
    _require(joint, "num_extra_outputs", (0,), "joint", source)

    vocabulary = _vocabulary(cfg, files, source)
    for where, section, key in (("decoder", dec, "vocab_size"), ("joint", joint, "num_classes")):
        value = section.get(key)
        if value is not None and value != len(vocabulary.labels):
            raise CheckpointError(f"{source}: {where}.{key}={value!r} but the tokenizer has "
                                  f"{len(vocabulary.labels)} tokens")
    greedy = (cfg.get("decoding") or {}).get("greedy") or {}
    max_symbols = greedy.get("max_symbols", 10)
    if not isinstance(max_symbols, int) or isinstance(max_symbols, bool) or max_symbols < 1:
        raise CheckpointError(f"{source}: decoding.greedy.max_symbols={max_symbols!r} must be a positive integer")
    config = NemoConformerConfig(
        feat_in=_get(enc, "feat_in", "encoder", source), d_model=d_model,
        n_layers=_get(enc, "n_layers", "encoder", source), n_heads=_get(enc, "n_heads", "encoder", source, default=4),
        ff_expansion_factor=_get(enc, "ff_expansion_factor", "encoder", source, default=4),
        conv_kernel_size=_get(enc, "conv_kernel_size", "encoder", source, default=31),
        subsampling=_get(enc, "subsampling", "encoder", source, str, "striding"),
        subsampling_factor=_get(enc, "subsampling_factor", "encoder", source, default=4),
        subsampling_conv_channels=d_model if channels == -1 else channels,
        xscaling=_get(enc, "xscaling", "encoder", source, bool, True),
        untie_biases=_get(enc, "untie_biases", "encoder", source, bool, True),
        pred_hidden=_get(prednet, "pred_hidden", "decoder.prednet", source),
        pred_rnn_layers=_get(prednet, "pred_rnn_layers", "decoder.prednet", source, default=1),
        joint_hidden=_get(jointnet, "joint_hidden", "joint.jointnet", source),
        max_symbols=max_symbols,
        dropout=float(_get(enc, "dropout", "encoder", source, (int, float), 0.1)),
        dropout_pre_encoder=float(_get(enc, "dropout_pre_encoder", "encoder", source, (int, float), 0.1)),
        dropout_att=float(_get(enc, "dropout_att", "encoder", source, (int, float), 0.1)),
        pred_dropout=float(_get(prednet, "dropout", "decoder.prednet", source, (int, float), 0.0)),
        joint_dropout=float(_get(jointnet, "dropout", "joint.jointnet", source, (int, float), 0.0)),
        vocabulary=vocabulary.to_json(), feature=feature,
        nemo_config=yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    try:
        config.check()
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    for where, key, value in (("joint.jointnet", "encoder_hidden", jointnet.get("encoder_hidden")),
                              ("joint.jointnet", "pred_hidden", jointnet.get("pred_hidden"))):
        wanted = d_model if key == "encoder_hidden" else config.pred_hidden
        if value is not None and value != wanted:
            raise CheckpointError(f"{source}: {where}.{key}={value!r} does not match {wanted}")
    return config


def _vocabulary(cfg: dict, files: dict[str, bytes], source: str):
    tokenizer = cfg.get("tokenizer")
    if isinstance(tokenizer, dict):
        if tokenizer.get("type", "bpe") != "bpe":
            raise CheckpointError(f"{source}: tokenizer.type={tokenizer.get('type')!r} is not supported (bpe, "
                                  f"a SentencePiece model)")
        ref = str(tokenizer.get("model_path", ""))
        name = ref[len("nemo:"):] if ref.startswith("nemo:") else PurePosixPath(ref).name
        if name not in files:
            raise CheckpointError(f"{source}: tokenizer.model_path={ref!r} names no file inside the archive")
        try:
            return SentencePieceVocabulary(files[name])
        except ValueError as exc:
            raise CheckpointError(f"{source}: archive member {name}: {exc}") from None
    labels = cfg.get("labels") or (cfg.get("joint") or {}).get("vocabulary")
    if isinstance(labels, list) and labels and all(isinstance(x, str) and len(x) == 1 for x in labels):
        return Vocabulary(labels=tuple(labels), blank=len(labels))
    raise CheckpointError(f"{source}: model_config.yaml has neither a tokenizer section nor single-character "
                          f"labels; asrshrink reads BPE (SentencePiece) and character NeMo transducers")


# --- writing ------------------------------------------------------------------------------------------------

def write_nemo(model, path: str | Path) -> Path:
    """``model`` (nemo-conformer-transducer) as a ``.nemo`` archive NeMo's ``restore_from`` reads: its config
    (the original one, with the sizes and tokenizer file names of this model), its weights in NeMo's layout and
    the tokenizer. Written atomically."""
    import hashlib
    import time

    from asrshrink.io import atomic_write

    from asrshrink.models.layers import model_structure

    c = model.config
    if model_structure(model):
        raise CheckpointError("a compressed model (low-rank or shared layers) has no NeMo layout; write it with "
                              "asrshrink's own format")
    cfg = yaml.safe_load(c.nemo_config) if c.nemo_config else {}
    vocab = model.vocabulary
    files: dict[str, bytes] = {}
    if isinstance(vocab, SentencePieceVocabulary):
        prefix = hashlib.sha256(vocab.model_proto).hexdigest()[:32]
        model_name, vocab_name = f"{prefix}_tokenizer.model", f"{prefix}_vocab.txt"
        files[model_name] = vocab.model_proto
        files[vocab_name] = "".join(f"{p}\n" for p in vocab.labels).encode("utf-8")
        tokenizer = cfg.setdefault("tokenizer", {})
        tokenizer.update({"type": "bpe", "model_path": f"nemo:{model_name}", "vocab_path": f"nemo:{vocab_name}"})
        tokenizer.pop("spe_tokenizer_vocab", None)
    buffer = io.BytesIO()
    torch.save(model.to_foreign_state_dict(), buffer)
    files[WEIGHTS] = buffer.getvalue()
    files[CONFIG] = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True).encode("utf-8")

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:") as tar:
            now = time.time()
            for name, data in sorted(files.items()):
                info = tarfile.TarInfo(f"./{name}")
                info.size, info.mtime, info.mode = len(data), now, 0o644
                tar.addfile(info, io.BytesIO(data))

    path = Path(path)
    return atomic_write(path, write)

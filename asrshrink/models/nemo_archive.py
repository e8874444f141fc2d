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
import re
import reprlib
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from asrshrink.audio.nemo_features import NemoFeatureConfig
from asrshrink.audio.text import SentencePieceVocabulary, Vocabulary
from asrshrink.errors import CheckpointError
from asrshrink.models.validate import FEATURE_BOUNDS, MAX_SIZE

CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
_MAX_MEMBERS = 1000
_MAX_SMALL = 64 << 20               # config and tokenizer files: a SentencePiece model is at most a few MB
_MAX_RATIO = 20                     # gzipped archives (NeMo < 1.7): float weights compress by about 1.1x
SUPPORTED_TARGETS = ("nemo.collections.asr.models.rnnt_bpe_models.EncDecRNNTBPEModel",
                     "nemo.collections.asr.models.rnnt_models.EncDecRNNTModel")


def is_nemo_archive(head: bytes) -> bool:
    """Whether a file's first 512 bytes start a tar archive (ustar magic) or a gzip stream."""
    return head[257:262] == b"ustar" or head[:2] == b"\x1f\x8b"


def read_nemo(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, bytes]]:
    """The config, the weights' state dict and the files the config refers to (the tokenizer, by member name)
    of a ``.nemo`` archive. Only those members are read, against a budget of bytes: a plain tar cannot hold
    more than its own size, a gzipped one at most ``_MAX_RATIO`` times it (weights barely compress)."""
    from asrshrink.models.checkpoint import read_torch_checkpoint

    size = path.stat().st_size
    budget = [size if not _is_gzip(path) else _MAX_RATIO * size + _MAX_SMALL]
    try:
        with tarfile.open(path, mode="r:*") as tar:
            members = _checked_members(tar, path)
            if CONFIG not in members or WEIGHTS not in members:
                absent = [n for n in (CONFIG, WEIGHTS) if n not in members]
                raise CheckpointError(f"{path}: not a NeMo model archive (no {', '.join(absent)} inside); pass the "
                                      f".nemo file NeMo's save_to wrote")
            config = _parse_config(_read_member(tar, members[CONFIG], path, budget, _MAX_SMALL), path)
            files = {}
            for name in _referenced_files(config):
                if name in members:
                    files[name] = _read_member(tar, members[name], path, budget, _MAX_SMALL)
            weights = io.BytesIO(_read_member(tar, members[WEIGHTS], path, budget, None))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated .nemo archive ({type(exc).__name__}: "
                              f"{str(exc)[:120]}); copy or download it again") from None
    checkpoint = read_torch_checkpoint(weights, source=f"{path} ({WEIGHTS})")
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path}: {WEIGHTS} inside the archive is not a dict of tensors")
    return config, dict(state_dict), files


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors and aliases: NeMo configs have none, and an alias bomb expands to
    gigabytes when printed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.YAMLError("YAML aliases (*name) are not allowed in a model config")
        return super().compose_node(parent, index)


def _parse_config(data: bytes, path: Path) -> dict:
    try:
        config = yaml.load(data.decode("utf-8"), Loader=_NoAliasLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {CONFIG} inside the archive is not valid YAML "
                              f"({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {CONFIG} inside the archive is not a mapping of settings")
    return config


def _referenced_files(config: dict) -> list[str]:
    """Member names the config refers to as ``nemo:<name>`` (the tokenizer's files)."""
    tokenizer = config.get("tokenizer")
    if not isinstance(tokenizer, dict):
        return []
    refs = [str(v) for v in tokenizer.values() if isinstance(v, str)]
    return [PurePosixPath(r[len("nemo:"):] if r.startswith("nemo:") else r).name for r in refs
            if r.startswith("nemo:") or r.endswith(".model")]


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


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
        if not member.isfile() or member.issparse():
            raise CheckpointError(f"{path}: refused: archive member {raw!r} is not a regular file")
        key = str(name)  # "./model_config.yaml" -> "model_config.yaml"
        if key in members:
            raise CheckpointError(f"{path}: archive member {key!r} appears twice; the archive is not a NeMo model")
        members[key] = member
    return members


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: Path, budget: list[int],
                 cap: int | None) -> bytes:
    """A member's bytes, refusing one larger than ``cap`` or than what is left of ``budget`` (a one-item list,
    decremented)."""
    if cap is not None and member.size > cap:
        raise CheckpointError(f"{path}: archive member {member.name} is {member.size} bytes, too large for a "
                              f"config or tokenizer file; the archive is not a NeMo model")
    if member.size > budget[0]:
        raise CheckpointError(f"{path}: archive member {member.name} claims {member.size} bytes, more than the "
                              f"archive can hold; the file is corrupt or crafted")
    budget[0] -= member.size
    handle = tar.extractfile(member)
    data = handle.read(member.size + 1) if handle is not None else b""
    if len(data) != member.size:
        raise CheckpointError(f"{path}: archive member {member.name} is truncated; copy or download the file again")
    return data


# --- NeMo config -> NemoConformerConfig ---------------------------------------------------------------------

_REPR = reprlib.Repr()  # Python 3.10 takes no keyword arguments here
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 160, 160, 8, 8, 2


def _short(value: Any) -> str:
    """A config value for an error message, bounded in length whatever the file holds."""
    return _REPR.repr(value)


def _section(cfg: dict, key: str, source: str) -> dict:
    value = cfg.get(key)
    if not isinstance(value, dict):
        raise CheckpointError(f"{source}: model_config.yaml has no '{key}' section")
    return value


def _get(section: dict, key: str, where: str, source: str, kind: type | tuple = int, default: Any = ...,
         null: Any = ...) -> Any:
    """``section[key]`` checked to be of ``kind``; ``default`` when absent (required when ``...``), ``null``
    when given as null (NeMo's meaning of null; refused when ``...``)."""
    if key not in section:
        if default is ...:
            raise CheckpointError(f"{source}: model_config.yaml has no {where}.{key}")
        return default
    value = section[key]
    if value is None:
        if null is ...:
            raise CheckpointError(f"{source}: {where}.{key} is null in model_config.yaml; it needs a value")
        return null
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise CheckpointError(f"{source}: {where}.{key}={_short(value)} in model_config.yaml is not "
                              f"{' or '.join(k.__name__ for k in kinds)}")
    return value


def _require(section: dict, key: str, allowed: tuple, where: str, source: str) -> None:
    """Refuse a setting whose value asrshrink does not compute (absent keys take NeMo's default, allowed[0])."""
    if key in section and section[key] not in allowed:
        raise CheckpointError(f"{source}: {where}.{key}={_short(section[key])} is not supported by the "
                              f"nemo-conformer-transducer family (supported: {', '.join(map(repr, allowed))})")


def config_from_nemo(cfg: dict, files: dict[str, bytes], state_dict: dict[str, torch.Tensor], source: str):
    """The NemoConformerConfig a NeMo model config describes; a one-line error for anything unsupported."""
    from asrshrink.models.nemo_conformer import NemoConformerConfig

    target = cfg.get("target")
    if target is not None and target not in SUPPORTED_TARGETS:
        raise CheckpointError(f"{source}: target={_short(target)} is not supported; asrshrink reads NeMo transducers "
                              f"({', '.join(t.rsplit('.', 1)[1] for t in SUPPORTED_TARGETS)})")
    pre = _section(cfg, "preprocessor", source)
    enc = _section(cfg, "encoder", source)
    dec = _section(cfg, "decoder", source)
    joint = _section(cfg, "joint", source)
    for section, where, suffix in ((pre, "preprocessor", "AudioToMelSpectrogramPreprocessor"),
                                   (enc, "encoder", "ConformerEncoder"), (dec, "decoder", "RNNTDecoder"),
                                   (joint, "joint", "RNNTJoint")):
        name = section.get("_target_", suffix)
        if not isinstance(name, str) or not name.endswith(suffix):
            raise CheckpointError(f"{source}: {where}._target_={_short(name)} is not supported (expected "
                                  f"{suffix})")

    for key, allowed in (("window", ("hann",)), ("frame_splicing", (1,)), ("lowfreq", (0, 0.0)),
                         ("highfreq", (None,)), ("log", (True,)), ("log_zero_guard_type", ("add",)),
                         ("log_zero_guard_value", (2 ** -24,)), ("exact_pad", (False,)), ("mel_norm", ("slaney",)),
                         ("normalize", ("per_feature", "NA", None)), ("stft_exact_pad", (False,)),
                         ("stft_conv", (False,)), ("nb_augmentation_prob", (0, 0.0)),
                         ("n_window_size", (None,)), ("n_window_stride", (None,)), ("pad_value", (0, 0.0))):
        _require(pre, key, allowed, "preprocessor", source)
    rate = _get(pre, "sample_rate", "preprocessor", source, default=16000)
    window_size = float(_get(pre, "window_size", "preprocessor", source, (int, float), 0.02))
    for key, value, top in (("sample_rate", rate, FEATURE_BOUNDS["sample_rate"]), ("window_size", window_size, 1.0)):
        if not (math.isfinite(value) and 0 < value <= top):
            raise CheckpointError(f"{source}: preprocessor.{key}={value!r} is out of range (0, {top}]")
    n_fft = _get(pre, "n_fft", "preprocessor", source, default=None, null=None)
    if n_fft is None:  # NeMo: the next power of two above the window length
        n_fft = 2 ** math.ceil(math.log2(max(int(window_size * rate), 1)))
    if not 2 <= n_fft <= FEATURE_BOUNDS["n_fft"] or n_fft % 2:
        raise CheckpointError(f"{source}: preprocessor.n_fft={n_fft} is not supported (an even size up to "
                              f"{FEATURE_BOUNDS['n_fft']})")
    features = _get(pre, "features", "preprocessor", source, default=64)
    if not 1 <= features <= FEATURE_BOUNDS["n_mels"]:
        raise CheckpointError(f"{source}: preprocessor.features={features} is out of range 1..{FEATURE_BOUNDS['n_mels']}")
    try:
        feature = NemoFeatureConfig(
            sample_rate=rate, window_size=window_size,
            window_stride=float(_get(pre, "window_stride", "preprocessor", source, (int, float), 0.01)),
            n_fft=n_fft, features=features,
            preemph=float(_get(pre, "preemph", "preprocessor", source, (int, float), 0.97, null=0.0)),
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
    decoding = cfg.get("decoding") or {}
    greedy = decoding.get("greedy") if isinstance(decoding, dict) else None
    greedy = greedy if isinstance(greedy, dict) else {}
    max_symbols = greedy.get("max_symbols", greedy.get("max_symbols_per_step", 10))
    if not isinstance(max_symbols, int) or isinstance(max_symbols, bool) or max_symbols < 1:
        raise CheckpointError(f"{source}: decoding.greedy.max_symbols={_short(max_symbols)} must be a positive "
                              f"integer")
    config = NemoConformerConfig(
        feat_in=_get(enc, "feat_in", "encoder", source), d_model=d_model,
        n_layers=_get(enc, "n_layers", "encoder", source), n_heads=_get(enc, "n_heads", "encoder", source, default=4),
        ff_expansion_factor=_get(enc, "ff_expansion_factor", "encoder", source, default=4),
        conv_kernel_size=_get(enc, "conv_kernel_size", "encoder", source, default=31),
        subsampling=_get(enc, "subsampling", "encoder", source, str, "striding"),
        subsampling_factor=_get(enc, "subsampling_factor", "encoder", source, default=4),
        subsampling_conv_channels=d_model if channels == -1 else channels,
        xscaling=_get(enc, "xscaling", "encoder", source, bool, True, null=False),
        untie_biases=_get(enc, "untie_biases", "encoder", source, bool, True, null=False),
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
    _check_sizes(config, state_dict, source)
    for where, key, value in (("joint.jointnet", "encoder_hidden", jointnet.get("encoder_hidden")),
                              ("joint.jointnet", "pred_hidden", jointnet.get("pred_hidden"))):
        wanted = d_model if key == "encoder_hidden" else config.pred_hidden
        if value is not None and value != wanted:
            raise CheckpointError(f"{source}: {where}.{key}={value!r} does not match {wanted}")
    return config


def _check_sizes(c, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Bound the config's sizes by the tensors before anything is built from it: the layer count, the
    subsampling, every width, and the stored filterbank's and window's shapes."""
    layers = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if c.n_layers != len(layers):
        raise CheckpointError(f"{source}: encoder.n_layers={c.n_layers} but the weights hold {len(layers)} layers")
    if c.subsampling_factor > 64:
        raise CheckpointError(f"{source}: encoder.subsampling_factor={c.subsampling_factor} is out of range (at "
                              f"most 64)")
    for name in ("d_model", "n_heads", "ff_expansion_factor", "conv_kernel_size", "subsampling_conv_channels",
                 "pred_hidden", "pred_rnn_layers", "joint_hidden"):
        if getattr(c, name) > MAX_SIZE:
            raise CheckpointError(f"{source}: {name}={getattr(c, name)} is out of range (at most {MAX_SIZE})")
    f = c.feature
    for key, shape in (("preprocessor.featurizer.fb", (1, f.features, f.n_fft // 2 + 1)),
                       ("preprocessor.featurizer.window", (f.win_length,))):
        got = state_dict.get(key)
        if got is None or tuple(got.shape) != shape:
            found = "missing" if got is None else f"shape {tuple(got.shape)}"
            raise CheckpointError(f"{source}: tensor {key} is {found}, expected {shape} for the preprocessor "
                                  f"settings in model_config.yaml")


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

def nemo_config_for(c, *, sample_rate: int | None = None) -> str:
    """A NeMo 3.0 ``EncDecRNNTBPEModel`` model_config.yaml for a NemoConformerConfig with a SentencePiece
    vocabulary (a model trained without NeMo): the sections and keys NeMo's own configs have (as in
    ``tests/fixtures/nemo_conformer``), every size and option from ``c``, so that ``config_from_nemo`` reads
    back the same config. ``train_ds``/``validation_ds`` name no manifests and ``optim`` holds AdamW with
    Noam annealing, for a NeMo user to fill in before training on. The tokenizer's file names are set by
    ``write_nemo``."""
    vocab_json = c.vocabulary
    if vocab_json.get("kind") != SentencePieceVocabulary.kind:
        raise CheckpointError("a NeMo BPE model config needs a SentencePiece vocabulary; this model has character "
                              "labels")
    vocab = SentencePieceVocabulary.from_json(vocab_json)
    f = c.feature
    rate = sample_rate or f.sample_rate
    labels = list(vocab.labels)
    dataset = {"manifest_filepath": None, "sample_rate": rate, "batch_size": 16, "shuffle": True,
               "num_workers": 4, "pin_memory": True, "max_duration": 16.7, "min_duration": 0.1,
               "use_start_end_token": False}
    cfg = {
        "sample_rate": rate,
        "model_defaults": {"enc_hidden": c.d_model, "pred_hidden": c.pred_hidden, "joint_hidden": c.joint_hidden},
        "tokenizer": {"dir": "tokenizer", "type": "bpe"},
        "train_ds": dict(dataset),
        "validation_ds": {**dataset, "shuffle": False, "max_duration": None, "min_duration": None},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": rate, "normalize": "per_feature" if f.normalize == "per_feature" else "NA",
            "window_size": f.window_size, "window_stride": f.window_stride, "window": "hann",
            "features": f.features, "n_fft": f.n_fft, "frame_splicing": 1, "dither": 1.0e-05, "pad_to": f.pad_to,
            "preemph": f.preemph, "mag_power": f.mag_power},
        "spec_augment": {"_target_": "nemo.collections.asr.modules.SpectrogramAugmentation", "freq_masks": 2,
                         "time_masks": 2, "freq_width": 27, "time_width": 0.05},
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": c.feat_in, "feat_out": -1, "n_layers": c.n_layers, "d_model": c.d_model,
            "causal_downsampling": False, "reduction": None, "reduction_position": None, "reduction_factor": 1,
            "ff_expansion_factor": c.ff_expansion_factor, "self_attention_model": "rel_pos", "n_heads": c.n_heads,
            "att_context_size": [-1, -1], "att_context_style": "regular", "xscaling": c.xscaling,
            "untie_biases": c.untie_biases, "pos_emb_max_len": 5000, "conv_norm_type": "batch_norm",
            "conv_context_size": None, "dropout": c.dropout, "dropout_pre_encoder": c.dropout_pre_encoder,
            "dropout_emb": 0.0, "dropout_att": c.dropout_att, "subsampling": c.subsampling,
            "subsampling_factor": c.subsampling_factor, "subsampling_conv_channels": c.subsampling_conv_channels,
            "conv_kernel_size": c.conv_kernel_size},
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
            "random_state_sampling": False, "blank_as_pad": True,
            "prednet": {"pred_hidden": c.pred_hidden, "pred_rnn_layers": c.pred_rnn_layers, "t_max": None,
                        "dropout": c.pred_dropout},
            "vocab_size": len(labels)},
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None, "preserve_memory": False,
            "fuse_loss_wer": False,
            "jointnet": {"joint_hidden": c.joint_hidden, "activation": "relu", "dropout": c.joint_dropout,
                         "encoder_hidden": c.d_model, "pred_hidden": c.pred_hidden},
            "num_classes": len(labels), "vocabulary": list(labels)},
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": c.max_symbols}},
        "loss": {"loss_name": "default"},
        "optim": {"name": "adamw", "lr": 2.0, "betas": [0.9, 0.98], "weight_decay": 1.0e-3,
                  "sched": {"name": "NoamAnnealing", "d_model": c.d_model, "warmup_steps": 10000,
                            "warmup_ratio": None, "min_lr": 1.0e-6}},
        "labels": list(labels),  # a copy: one list used twice would be written as a YAML alias
        "target": SUPPORTED_TARGETS[0],
        "nemo_version": "3.0.0",
    }
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


def _tokenizer_side_files(vocab: SentencePieceVocabulary) -> tuple[bytes, bytes]:
    """The two text files NeMo keeps beside a SentencePiece model: ``vocab.txt`` (the pieces in WordPiece
    style, as NeMo's ``create_spt_model`` writes it: control and unknown pieces left out, a leading U+2581
    dropped, other pieces prefixed with ``##``) and ``tokenizer.vocab`` (SentencePiece's own "piece<TAB>score"
    listing)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.LoadFromSerializedProto(vocab.model_proto)
    wordpiece, listing = [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        listing.append(f"{piece}\t{sp.get_score(i):g}\n")
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        token = piece[1:] if piece.startswith("\u2581") else f"##{piece}"
        wordpiece.append(f"{token or piece}\n")
    return "".join(wordpiece).encode("utf-8"), "".join(listing).encode("utf-8")


def write_nemo(model, path: str | Path) -> Path:
    """``model`` (nemo-conformer-transducer) as a ``.nemo`` archive NeMo's ``restore_from`` reads: its config
    (the original one, with the tokenizer file names of this model; for a model with a SentencePiece vocabulary
    that was not loaded from a .nemo, the one ``nemo_config_for`` synthesizes), its weights in NeMo's layout and
    the tokenizer with NeMo's two side files. Written atomically."""
    import hashlib
    import time

    from asrshrink.io import atomic_write

    from asrshrink.models.layers import model_structure

    c = model.config
    if model_structure(model):
        raise CheckpointError("a compressed model (low-rank or shared layers) has no NeMo layout; write it with "
                              "asrshrink's own format")
    vocab = model.vocabulary
    if not c.nemo_config and not isinstance(vocab, SentencePieceVocabulary):
        raise CheckpointError("this model has no NeMo model config (it was not loaded from a .nemo archive) and a "
                              "character vocabulary, so no .nemo can be written for it; save it in asrshrink's "
                              "format")
    cfg = yaml.safe_load(c.nemo_config or nemo_config_for(c))
    files: dict[str, bytes] = {}
    if isinstance(vocab, SentencePieceVocabulary):
        prefix = hashlib.sha256(vocab.model_proto).hexdigest()[:32]
        model_name, vocab_name, spe_name = (f"{prefix}_tokenizer.model", f"{prefix}_vocab.txt",
                                            f"{prefix}_tokenizer.vocab")
        files[model_name] = vocab.model_proto
        files[vocab_name], files[spe_name] = _tokenizer_side_files(vocab)
        tokenizer = cfg.setdefault("tokenizer", {})
        if not isinstance(tokenizer.get("dir"), str):  # NeMo joins paths onto it even when all three are given
            tokenizer["dir"] = "tokenizer"
        tokenizer.update({"type": "bpe", "model_path": f"nemo:{model_name}", "vocab_path": f"nemo:{vocab_name}",
                          "spe_tokenizer_vocab": f"nemo:{spe_name}"})
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

"""Hostile and malformed ``.nemo`` archives: each is refused with one line naming the file, exit 2, nothing written,
and no code in them runs. Also the archive variants that must load (gzipped pre-1.7 archives)."""

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from asrshrink import api
from asrshrink.cli.main import app
from tests.helpers import assert_one_line_error

runner = CliRunner()


def members(nemo_fixture_dir: Path, layout: str = "fastconformer") -> dict[str, bytes]:
    with tarfile.open(nemo_fixture_dir / layout / "model.nemo") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def write_archive(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = (), mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def with_config(files: dict[str, bytes], edit) -> dict[str, bytes]:
    config = yaml.safe_load(files["./model_config.yaml"])
    edit(config)
    return {**files, "./model_config.yaml": yaml.safe_dump(config).encode()}


def refused(path: Path, tmp_path: Path, *fragments: str) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(path), "--sparsity", "0.5", "-o", str(out)])
    assert_one_line_error(result, str(path), *fragments)
    assert not out.exists()


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_path_traversal_member_is_refused(nemo_fixture_dir, tmp_path):
    files = {**members(nemo_fixture_dir), "../../evil.txt": b"x"}
    refused(write_archive(tmp_path / "m.nemo", files), tmp_path, "points outside the archive")


def test_absolute_member_name_is_refused(nemo_fixture_dir, tmp_path):
    files = {**members(nemo_fixture_dir), "/etc/evil": b"x"}
    refused(write_archive(tmp_path / "m.nemo", files), tmp_path, "points outside the archive")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_link_member_is_refused(nemo_fixture_dir, tmp_path, kind):
    link = tarfile.TarInfo("./model_config.yaml")
    link.type, link.linkname = kind, "/etc/passwd"
    files = {k: v for k, v in members(nemo_fixture_dir).items() if k != "./model_config.yaml"}
    refused(write_archive(tmp_path / "m.nemo", files, [link]), tmp_path, "is a link")


def test_device_member_is_refused(nemo_fixture_dir, tmp_path):
    dev = tarfile.TarInfo("./zero")
    dev.type = tarfile.CHRTYPE
    refused(write_archive(tmp_path / "m.nemo", members(nemo_fixture_dir), [dev]), tmp_path, "not a regular file")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_code_in_the_weights_is_refused_and_not_run(nemo_fixture_dir, tmp_path):
    marker = tmp_path / "was_run"
    buffer = io.BytesIO()
    torch.save({"payload": RunsCode(marker)}, buffer)
    files = {**members(nemo_fixture_dir), "./model_weights.ckpt": buffer.getvalue()}
    refused(write_archive(tmp_path / "m.nemo", files), tmp_path, "would run code")
    assert not marker.exists()


def test_truncated_archive_is_refused(nemo_fixture_dir, tmp_path):
    data = (nemo_fixture_dir / "fastconformer" / "model.nemo").read_bytes()
    # Halfway, and inside the last member (the weights): the tar's end padding is at most 10 KiB.
    for cut in (len(data) // 2, len(data) - 12_000):
        path = tmp_path / f"cut{cut}.nemo"
        path.write_bytes(data[:cut])
        refused(path, tmp_path, "truncated")


@pytest.mark.parametrize(("section", "key", "value", "fragment"), [
    ("encoder", "self_attention_model", "abs_pos", "encoder.self_attention_model='abs_pos'"),
    ("encoder", "subsampling", "vggnet", "encoder.subsampling='vggnet'"),
    ("encoder", "att_context_size", [70, 1], "encoder.att_context_size"),
    ("encoder", "conv_norm_type", "layer_norm", "encoder.conv_norm_type='layer_norm'"),
    ("preprocessor", "window", "hamming", "preprocessor.window='hamming'"),
    ("decoder", "blank_as_pad", False, "decoder.blank_as_pad=False"),
    ("encoder", "d_model", "wide", "encoder.d_model='wide'"),
])
def test_unsupported_config_value_names_the_field(nemo_fixture_dir, tmp_path, section, key, value, fragment):
    def edit(config):
        config[section][key] = value

    files = with_config(members(nemo_fixture_dir), edit)
    refused(write_archive(tmp_path / "m.nemo", files), tmp_path, fragment)


def test_unsupported_model_class_is_named(nemo_fixture_dir, tmp_path):
    def edit(config):
        config["target"] = "nemo.collections.asr.models.ctc_bpe_models.EncDecCTCModelBPE"

    files = with_config(members(nemo_fixture_dir), edit)
    refused(write_archive(tmp_path / "m.nemo", files), tmp_path, "EncDecCTCModelBPE", "not supported")


def test_config_sizes_that_disagree_with_the_weights_build_nothing(nemo_fixture_dir, tmp_path):
    # A config claiming a huge model: the shapes are checked on a meta-device skeleton, so nothing is allocated.
    def edit(config):
        config["encoder"]["d_model"] = config["joint"]["jointnet"]["encoder_hidden"] = 2 ** 20

    files = with_config(members(nemo_fixture_dir), edit)
    refused(write_archive(tmp_path / "m.nemo", files), tmp_path, "d_model=1048576", "out of range")
    for key, value, fragment in (("n_layers", 5000, "the weights hold 3 layers"), ("d_model", 96, "has shape")):
        def edit(config, key=key, value=value):
            config["encoder"][key] = value
            config["joint"]["jointnet"]["encoder_hidden"] = config["encoder"]["d_model"]

        files = with_config(members(nemo_fixture_dir), edit)
        refused(write_archive(tmp_path / f"{key}.nemo", files), tmp_path, fragment)
    def edit(config):
        config["preprocessor"]["n_fft"] = 2 ** 18

    refused(write_archive(tmp_path / "fft.nemo", with_config(members(nemo_fixture_dir), edit)), tmp_path,
            "preprocessor.n_fft=262144")


def test_missing_weight_and_missing_tokenizer(nemo_fixture_dir, tmp_path):
    files = members(nemo_fixture_dir)
    state = torch.load(io.BytesIO(files["./model_weights.ckpt"]), weights_only=True)
    del state["joint.enc.bias"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    refused(write_archive(tmp_path / "a.nemo", {**files, "./model_weights.ckpt": buffer.getvalue()}), tmp_path,
            "missing keys", "joint.enc.bias")
    no_tokenizer = {k: v for k, v in files.items() if not k.endswith("_tokenizer.model")}
    refused(write_archive(tmp_path / "b.nemo", no_tokenizer), tmp_path, "tokenizer.model_path")


def test_not_yaml_and_no_weights(nemo_fixture_dir, tmp_path):
    files = members(nemo_fixture_dir)
    refused(write_archive(tmp_path / "a.nemo", {**files, "./model_config.yaml": b"a: [unclosed"}), tmp_path,
            "not valid YAML")
    refused(write_archive(tmp_path / "b.nemo", {k: v for k, v in files.items() if "weights" not in k}), tmp_path,
            "no model_weights.ckpt")


def test_gzipped_archive_from_old_nemo_loads(nemo_fixture_dir, tmp_path):
    plain = nemo_fixture_dir / "fastconformer" / "model.nemo"
    path = tmp_path / "old.nemo"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    model, _ = api.load_model(path)
    reference, _ = api.load_model(plain)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_a_nemo_state_dict_without_its_archive_says_what_to_pass(nemo_fixture_dir, tmp_path):
    state = torch.load(io.BytesIO(members(nemo_fixture_dir)["./model_weights.ckpt"]), weights_only=True)
    path = tmp_path / "weights.ckpt"
    torch.save(state, path)
    refused(path, tmp_path, "pass the .nemo archive")


def test_yaml_alias_bomb_is_refused(nemo_fixture_dir, tmp_path):
    files = members(nemo_fixture_dir)
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 7)]
    bomb = "\n".join(lines).encode() + b"\n" + files["./model_config.yaml"].replace(b"window: hann", b"window: *l6")
    refused(write_archive(tmp_path / "m.nemo", {**files, "./model_config.yaml": bomb}), tmp_path, "aliases")


class Zeros(io.RawIOBase):
    def __init__(self, size: int):
        self.left = size

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_gzip_bomb_and_sparse_member_are_refused_before_reading(nemo_fixture_dir, tmp_path):
    files = members(nemo_fixture_dir)
    path = tmp_path / "bomb.nemo"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            if "weights" in name:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("./model_weights.ckpt")
        info.size = 200 << 20  # 200 MB of zeros in a file of a few hundred KB
        tar.addfile(info, Zeros(info.size))
    assert path.stat().st_size < 1 << 20
    refused(path, tmp_path, "more than the archive can hold")
    sparse = tarfile.TarInfo("./extra")
    sparse.type = tarfile.GNUTYPE_SPARSE
    refused(write_archive(tmp_path / "sparse.nemo", files, [sparse], ), tmp_path, "not a regular file")


@pytest.mark.parametrize(("key", "value"), [("preemph", None), ("xscaling", None)])
def test_null_settings_take_nemos_meaning(nemo_fixture_dir, tmp_path, key, value):
    section = "preprocessor" if key == "preemph" else "encoder"

    def edit(config):
        config[section][key] = value

    model, _ = api.load_model(write_archive(tmp_path / "m.nemo", with_config(members(nemo_fixture_dir), edit)))
    if key == "preemph":
        assert model.feature_config.preemph == 0.0
    else:
        assert model.config.xscaling is False and model.encoder.xscale is None


def test_writing_a_nemo_needs_a_nemo_config(tmp_path):
    from asrshrink.errors import CheckpointError
    from asrshrink.models.nemo_archive import write_nemo
    from asrshrink.models.nemo_conformer import NemoConformerConfig, NemoConformerTransducer

    model = NemoConformerTransducer(NemoConformerConfig(d_model=32, n_layers=1, n_heads=2, subsampling_conv_channels=8,
                                                        pred_hidden=16, joint_hidden=16,
                                                        vocabulary={"labels": ["a", " "], "blank": 2}))
    with pytest.raises(CheckpointError, match="no NeMo model config"):
        write_nemo(model, tmp_path / "m.nemo")
    assert not (tmp_path / "m.nemo").exists()


def _trained_from_scratch(nemo_fixture_dir, **sizes):
    """A Conformer built from sizes and the fixture's tokenizer, with no NeMo config (as a model trained by
    examples/train_reference.py is)."""
    from asrshrink.models.nemo_conformer import NemoConformerConfig, NemoConformerTransducer

    vocab = api.load_model(nemo_fixture_dir / "fastconformer" / "model.nemo")[0].vocabulary
    config = NemoConformerConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 2, "conv_kernel_size": 7,
                                    "subsampling": "dw_striding", "subsampling_factor": 8,
                                    "subsampling_conv_channels": 16, "pred_hidden": 24, "joint_hidden": 20,
                                    "pred_dropout": 0.1, "joint_dropout": 0.1, "max_symbols": 7, **sizes},
                                 vocabulary=vocab.to_json())
    torch.manual_seed(0)
    return NemoConformerTransducer(config)


@pytest.mark.parametrize("sizes", [{}, {"subsampling": "striding", "subsampling_factor": 4, "xscaling": False,
                                        "untie_biases": False, "pred_rnn_layers": 2, "joint_dropout": 0.0}])
def test_synthesized_nemo_config_round_trips(nemo_fixture_dir, tmp_path, sizes):
    import dataclasses

    from asrshrink.models.nemo_archive import nemo_config_for, read_nemo, write_nemo

    model = _trained_from_scratch(nemo_fixture_dir, **sizes)
    path = write_nemo(model, tmp_path / "m.nemo")
    again, _ = api.load_model(path)
    assert dataclasses.replace(again.config, nemo_config="") == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    cfg, state_dict, files = read_nemo(path)
    assert set(state_dict) == set(model.to_foreign_state_dict())
    # every section and key of the configs NeMo itself wrote (the fixtures) is there
    nemo_made = yaml.safe_load((nemo_fixture_dir / "fastconformer" / "model_config.yaml").read_text())
    for section, value in nemo_made.items():
        assert section in cfg, section
        if isinstance(value, dict) and isinstance(cfg[section], dict):
            assert set(value) <= set(cfg[section]) | {"model_path", "vocab_path", "spe_tokenizer_vocab"}, section
    assert cfg["joint"]["vocabulary"] == cfg["labels"] == list(model.vocabulary.labels)
    assert cfg["decoder"]["vocab_size"] == cfg["joint"]["num_classes"] == len(model.vocabulary.labels)
    assert cfg["tokenizer"]["model_path"].startswith("nemo:") and len(files) == 3  # model, vocab.txt, .vocab
    # the synthesized config is what the saved model carries once set, and writing from it gives the same YAML
    carried = _with_nemo_config(model, nemo_config_for(model.config))
    again2 = write_nemo(carried, tmp_path / "m2.nemo")
    assert read_nemo(again2)[0] == cfg


def _with_nemo_config(model, nemo_config):
    import dataclasses

    out = type(model)(dataclasses.replace(model.config, nemo_config=nemo_config))
    out.load_state_dict(model.state_dict())
    return out


def test_synthesized_nemo_config_needs_a_sentencepiece_vocabulary():
    from asrshrink.errors import CheckpointError
    from asrshrink.models.nemo_archive import nemo_config_for
    from asrshrink.models.nemo_conformer import NemoConformerConfig

    with pytest.raises(CheckpointError, match="SentencePiece"):
        nemo_config_for(NemoConformerConfig(vocabulary={"labels": ["a", " "], "blank": 2}))


def test_written_tokenizer_side_files_are_nemos(nemo_fixture_dir, tmp_path):
    from asrshrink.models.nemo_archive import write_nemo

    model, _ = api.load_model(nemo_fixture_dir / "fastconformer" / "model.nemo")
    original = members(nemo_fixture_dir)
    written = {}
    with tarfile.open(write_nemo(model, tmp_path / "m.nemo")) as tar:
        for m in tar.getmembers():
            written[m.name.removeprefix("./")] = tar.extractfile(m).read()
    for suffix in ("_vocab.txt", "_tokenizer.vocab", "_tokenizer.model"):
        ours = next(v for k, v in written.items() if k.endswith(suffix))
        assert ours == next(v for k, v in original.items() if k.endswith(suffix)), suffix
    cfg = yaml.safe_load(written["model_config.yaml"])
    assert all(cfg["tokenizer"][k][len("nemo:"):] in written for k in ("model_path", "vocab_path",
                                                                      "spe_tokenizer_vocab"))

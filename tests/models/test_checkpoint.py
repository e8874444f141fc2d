"""Loading refuses bad checkpoints with one clear error that names the file."""

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from asrshrink.errors import CheckpointError
from asrshrink.models.checkpoint import load_model


def fixture_state(mlperf_fixture_dir: Path) -> dict:
    return torch.load(mlperf_fixture_dir / "rnnt_random_small.pt", map_location="cpu", weights_only=True)


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"\x80\x02not really a checkpoint" * 10)
    expect_error(path, "corrupt or truncated")


def test_truncated_legacy_checkpoint(tmp_path, mlperf_fixture_dir):
    data = (mlperf_fixture_dir / "rnnt_random_small.pt").read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "corrupt or truncated")


def test_truncated_zip_checkpoint(tmp_path, mlperf_fixture_dir):
    full = tmp_path / "full.pt"
    torch.save(fixture_state(mlperf_fixture_dir), full)
    path = tmp_path / "cut.pt"
    path.write_bytes(full.read_bytes()[:100_000])
    expect_error(path, "corrupt or truncated")


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch's note on the hand-made pickle
def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "was_run"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, path)
    expect_error(path, "would run code")
    assert not marker.exists()
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(RunsCode(marker)))
    expect_error(plain)
    assert not marker.exists()


def test_unknown_family(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 2)}}, path)
    expect_error(path, "not a checkpoint of a known model family", "mlperf-rnnt")


def test_missing_keys(tmp_path, mlperf_fixture_dir):
    state = fixture_state(mlperf_fixture_dir)
    del state["state_dict"]["encoder.post_rnn.lstm.bias_hh_l2"]
    path = tmp_path / "missing.pt"
    torch.save(state, path)
    expect_error(path, "missing keys", "encoder.post_rnn.lstm.bias_hh_l2")


def test_unexpected_keys(tmp_path, mlperf_fixture_dir):
    state = fixture_state(mlperf_fixture_dir)
    state["state_dict"]["encoder.extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    expect_error(path, "unexpected keys", "encoder.extra.weight")


def test_shape_mismatch(tmp_path, mlperf_fixture_dir):
    state = fixture_state(mlperf_fixture_dir)
    state["state_dict"]["encoder.post_rnn.lstm.weight_hh_l1"] = torch.zeros(1024, 200)
    path = tmp_path / "shape.pt"
    torch.save(state, path)
    expect_error(path, "encoder.post_rnn.lstm.weight_hh_l1", "(1024, 200)", "(1024, 256)")


def test_module_prefix_and_bare_state_dict_load(tmp_path, mlperf_fixture_dir):
    state = fixture_state(mlperf_fixture_dir)["state_dict"]
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    model, _ = load_model(path)
    assert torch.equal(model.to_foreign_state_dict()["joint_net.3.weight"], state["joint_net.3.weight"])


def test_safetensors_without_asrshrink_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    expect_error(path, "without asrshrink metadata")


def test_directory_without_model(tmp_path):
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_model(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.pt")


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    expect_error(path, "not a PyTorch checkpoint", ".safetensors")

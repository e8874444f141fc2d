"""Inputs for the reliability suite, built once per session: a tiny model in both formats, a little speech, an
svd output with its report, and a psvd run interrupted after its first layer."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asrshrink import compress
from asrshrink.config import CalibConfig, SvdConfig
from asrshrink.methods.psvd import PsvdConfig
from asrshrink.models.checkpoint import save_model
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig

TINY = MlperfRnntConfig(encoder_hidden=24, encoder_pre_layers=1, encoder_post_layers=2, pred_hidden=12,
                        pred_layers=2, joint_hidden=16, dropout=0.0)


@dataclass(frozen=True)
class Assets:
    root: Path
    native: Path          # asrshrink model (.safetensors)
    foreign: Path         # MLPerf-layout training checkpoint (.pt)
    data: Path            # 3 clips with transcripts (audio + .txt layout)
    svd_out: Path         # an svd output folder with --eval (report.json with eval)
    interrupted: Path     # a psvd output folder holding .progress after one finished layer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return torch.load(self.foreign, weights_only=True)["state_dict"]

    def native_parts(self) -> tuple[dict[str, torch.Tensor], dict]:
        from safetensors import safe_open

        with safe_open(str(self.native), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["asrshrink"])


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("reliability-assets")
    torch.manual_seed(0)
    net = MlperfRnnt(TINY).eval()
    native = save_model(net, root / "model")
    foreign = root / "model.pt"
    torch.save({"state_dict": net.to_foreign_state_dict()}, foreign)
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, text in enumerate(["hello world", "a b c", "shrink me"]):
        sf.write(data / f"u{i}.wav", (0.1 * rng.standard_normal(4000 + 1000 * i)).astype(np.float32), 16000)
        (data / f"u{i}.txt").write_text(text)
    svd_out = root / "svd-out"
    compress.run("svd", model=str(native), out=svd_out, svd=SvdConfig(rank=4),
                 evaluation=compress.EvalConfig(path=str(data)))
    interrupted = root / "psvd-out"
    real_save = compress.save_model

    def stop_after_first_layer(model, path, **kwargs):
        result = real_save(model, path, **kwargs)
        raise KeyboardInterrupt

    compress.save_model = stop_after_first_layer
    try:
        compress.run("psvd", model=str(native), out=interrupted, svd=SvdConfig(threshold=0.25),
                     calib=CalibConfig(path=str(data), num_utterances=3), post=PsvdConfig(iterations=2))
    except KeyboardInterrupt:
        pass
    finally:
        compress.save_model = real_save
    assert (interrupted / ".progress" / "model.safetensors").is_file()
    return Assets(root, native, foreign, data, svd_out, interrupted)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (folders as empty entries), to prove nothing was written."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            out[str(path.relative_to(root))] = b"<special>"
        else:
            out[str(path.relative_to(root))] = path.read_bytes() if path.is_file() else b"<dir>"
    return out


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target

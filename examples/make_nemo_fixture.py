"""Make a NeMo conformance case with NeMo itself: a random-weight Conformer transducer with the options the
shipped fixtures do not cover, saved as ``model.nemo`` with NeMo's own outputs in ``outputs.npz``.

Run in a separate environment with NeMo (never a dependency of asrshrink):

    nemo-venv/bin/python examples/make_nemo_fixture.py tests/fixtures/nemo_conformer/conformer/model.nemo \
        tests/fixtures/nemo_conformer/options

The options: tied position biases (``untie_biases: false``), no ``xscaling``, ``dw_striding`` subsampling by 4,
two prediction LSTM layers, no joint dropout (so the joint's output layer is ``joint_net.1``), 8 symbols per
frame. Weights are perturbed as in the shipped fixtures (biases, batch norm and position biases random, the
blank bias shifted so blank wins on about half the frames). The tokenizer comes from the given archive.
"""

import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from nemo.collections.asr.models import EncDecRNNTBPEModel


SHIFT = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0  # blank wins on about half the frames


def main(source: str, out: str) -> None:
    torch.manual_seed(7)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(source) as tar:
        tar.extractall(tmp, filter="data")
        tmp = Path(tmp)
        cfg = OmegaConf.load(tmp / "model_config.yaml")
        for suffix, name in (("_tokenizer.model", "tokenizer.model"), ("_vocab.txt", "vocab.txt"),
                             ("_tokenizer.vocab", "tokenizer.vocab")):
            next(tmp.glob(f"*{suffix}")).rename(tmp / name)
        cfg.tokenizer = {"dir": str(tmp), "type": "bpe"}
        enc = cfg.encoder
        enc.d_model, enc.n_layers, enc.n_heads = 64, 2, 2
        enc.untie_biases, enc.xscaling = False, False
        enc.subsampling, enc.subsampling_factor, enc.subsampling_conv_channels = "dw_striding", 4, 32
        enc.conv_kernel_size = 15
        cfg.model_defaults.enc_hidden = 64
        cfg.joint.jointnet.encoder_hidden = 64
        cfg.joint.jointnet.dropout = 0.0
        cfg.decoder.prednet.pred_rnn_layers = 2
        cfg.decoding.greedy.max_symbols = 8
        model = EncDecRNNTBPEModel(cfg=cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "pos_bias" in name or "batch_norm" in name:
                    p.copy_(0.3 * torch.randn_like(p))
            for name, b in model.named_buffers():
                if name.endswith("running_mean"):
                    b.copy_(0.2 * torch.randn_like(b))
                elif name.endswith("running_var"):
                    b.copy_(0.5 + torch.rand_like(b))
            model.decoder.prediction.embed.weight[-1].zero_()
            last = model.joint.joint_net[-1]
            model.joint.enc.weight.mul_(4.0)  # so that the audio, not the biases, decides each frame's label
            last.weight.mul_(4.0)
            last.bias[-1] += SHIFT
        model.save_to(str(out_dir / "model.nemo"))
    model = EncDecRNNTBPEModel.restore_from(str(out_dir / "model.nemo"), map_location="cpu").eval()
    rng = np.random.default_rng(3)
    t = np.arange(21920) / 16000
    waves = np.stack([0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * rng.standard_normal(t.size),
                      0.1 * rng.standard_normal(t.size)]).astype(np.float32)
    waves[1, 14560:] = 0
    lengths = np.array([21920, 14560])
    arrays = {"waveform": waves, "waveform_len": lengths}
    with torch.no_grad():
        def run(w, n, prefix):
            feats, flen = model.preprocessor(input_signal=torch.from_numpy(w), length=torch.from_numpy(n))
            enc_out, elen = model.encoder(audio_signal=feats, length=flen)
            hyps = model.decoding.rnnt_decoder_predictions_tensor(encoder_output=enc_out, encoded_lengths=elen)
            arrays.update({f"{prefix}features": feats.numpy(), f"{prefix}features_len": flen.numpy(),
                           f"{prefix}encoder_out": enc_out.numpy(), f"{prefix}encoder_out_len": elen.numpy()})
            return [np.array([int(x) for x in h.y_sequence]) for h in hyps]

        tokens = run(waves, lengths, "")
        for i in range(2):
            arrays[f"tokens_{i}"] = tokens[i]
            arrays[f"single{i}_tokens"] = run(waves[i:i + 1, :lengths[i]], lengths[i:i + 1], f"single{i}_")[0]
        labels = torch.tensor([arrays["single0_tokens"].tolist()])
        pred, _, _ = model.decoder(targets=labels, target_length=torch.tensor([labels.shape[1]]))
        arrays["single0_pred_out"] = pred.transpose(1, 2).numpy()
        joint = model.joint.joint(torch.from_numpy(arrays["single0_encoder_out"]).transpose(1, 2),
                                  pred.transpose(1, 2))
        arrays["single0_joint_logprobs"] = joint.log_softmax(-1).numpy()
    np.savez(out_dir / "outputs.npz", **arrays)
    print({k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main(*sys.argv[1:3])

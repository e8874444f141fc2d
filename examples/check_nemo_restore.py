"""Check, with NeMo itself, that a ``.nemo`` archive asrshrink wrote restores in NeMo and decodes as asrshrink does.

Run it in a separate environment that has NeMo (never a dependency of asrshrink):

    python -m venv nemo-venv && nemo-venv/bin/pip install torch==2.13.0 "nemo-toolkit[asr]==3.0.0"
    python -c "from asrshrink import api; from asrshrink.models.nemo_archive import write_nemo; \\
        write_nemo(api.load_model('MODEL')[0], 'copy.nemo')"
    nemo-venv/bin/python examples/check_nemo_restore.py copy.nemo tests/fixtures/nemo_conformer/conformer/outputs.npz

It restores the archive with ``ASRModel.restore_from``, greedy-decodes the fixture's waveforms in a batch and
one by one, and prints whether the token ids equal the fixture's (NeMo's own tokens for the original model).

With audio files after the .npz, the .npz is an ``asrshrink dump`` of the same model on those files, and the
check compares NeMo's greedy tokens and transcripts of each file (decoded alone, 16 kHz mono) with asrshrink's,
and the encoder outputs (passing at 1e-4):

    asrshrink dump model.safetensors a.flac b.flac -o ref.npz
    nemo-venv/bin/python examples/check_nemo_restore.py model.nemo ref.npz a.flac b.flac
"""

import sys

import numpy as np
import torch
from nemo.collections.asr.models import ASRModel


def check_files(model, ref, files: list[str]) -> int:
    """NeMo's tokens and text for each audio file against asrshrink's (``{stem}.tokens`` of an asrshrink dump)."""
    from pathlib import Path

    import soundfile

    same_count, worst = 0, 0.0
    for name in files:
        wave, rate = soundfile.read(name, dtype="float32", always_2d=True)
        if rate != 16000:
            raise SystemExit(f"{name}: {rate} Hz; pass 16 kHz audio")
        wave = torch.from_numpy(wave.mean(axis=1)).unsqueeze(0)
        with torch.no_grad():
            feats, feat_len = model.preprocessor(input_signal=wave, length=torch.tensor([wave.shape[1]]))
            enc, enc_len = model.encoder(audio_signal=feats, length=feat_len)
            hyp = model.decoding.rnnt_decoder_predictions_tensor(encoder_output=enc, encoded_lengths=enc_len)[0]
        tokens = [int(t) for t in hyp.y_sequence]
        stem = Path(name).stem
        ours = ref[f"{stem}.tokens"].tolist()
        same = tokens == ours
        same_count += same
        ours_enc = ref[f"{stem}.encoder"]                        # (T', D)
        nemo_enc = enc[0, :, :int(enc_len[0])].T.numpy()
        diff = float(np.abs(nemo_enc - ours_enc).max()) if nemo_enc.shape == ours_enc.shape else float("nan")
        worst = max(worst, diff) if diff == diff else float("nan")
        text = model.tokenizer.ids_to_text(tokens)
        print(f"{stem}: NeMo {text!r}; tokens equal to asrshrink's: {same}; encoder output max |diff| {diff:.2e}"
              + ("" if same else f" (asrshrink {model.tokenizer.ids_to_text(ours)!r})"))
    print(f"{same_count}/{len(files)} files decoded to asrshrink's tokens; encoder outputs differ by at most "
          f"{worst:.2e}")
    return 0 if same_count == len(files) and worst <= 1e-4 else 1


def main(archive: str, outputs: str, *files: str) -> int:
    ref = np.load(outputs)
    model = ASRModel.restore_from(archive, map_location="cpu").eval()
    if files:
        return check_files(model, ref, list(files))
    waves = torch.from_numpy(ref["waveform"])
    lengths = torch.from_numpy(ref["waveform_len"])
    with torch.no_grad():
        feats, feat_len = model.preprocessor(input_signal=waves, length=lengths)
        enc, enc_len = model.encoder(audio_signal=feats, length=feat_len)
        hyps = model.decoding.rnnt_decoder_predictions_tensor(encoder_output=enc, encoded_lengths=enc_len)
    ok = True
    for i, hyp in enumerate(hyps):
        tokens = [int(t) for t in hyp.y_sequence]
        same = tokens == ref[f"tokens_{i}"].tolist()
        ok &= same
        print(f"utterance {i}: {len(tokens)} tokens, equal to the reference: {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

"""Check, with NeMo itself, that a ``.nemo`` archive asrshrink wrote restores in NeMo and decodes as asrshrink does.

Run it in a separate environment that has NeMo (never a dependency of asrshrink):

    python -m venv nemo-venv && nemo-venv/bin/pip install torch==2.13.0 "nemo-toolkit[asr]==3.0.0"
    python -c "from asrshrink import api; from asrshrink.models.nemo_archive import write_nemo; \\
        write_nemo(api.load_model('MODEL')[0], 'copy.nemo')"
    nemo-venv/bin/python examples/check_nemo_restore.py copy.nemo tests/fixtures/nemo_conformer/conformer/outputs.npz

It restores the archive with ``ASRModel.restore_from``, greedy-decodes the fixture's waveforms in a batch and
one by one, and prints whether the token ids equal the fixture's (NeMo's own tokens for the original model).
"""

import sys

import numpy as np
import torch
from nemo.collections.asr.models import ASRModel


def main(archive: str, outputs: str) -> int:
    ref = np.load(outputs)
    model = ASRModel.restore_from(archive, map_location="cpu").eval()
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
    sys.exit(main(*sys.argv[1:3]))

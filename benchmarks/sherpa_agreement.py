"""sherpa-onnx decoding asrshrink's exports of the NeMo fixture models: token agreement with asrshrink's (and
NeMo's) greedy tokens on the same audio, and the graphs' parity with PyTorch on asrshrink's features.

    pip install sherpa-onnx && python benchmarks/sherpa_agreement.py

sherpa-onnx computes its own fbank features, which only approximate NeMo's; the random-weight fixture models
amplify any feature difference, so agreement here is a lower bound of what a trained model shows. Agreement is
1 - token error rate (edit distance over the reference tokens; it can be negative).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jiwer  # noqa: E402
import numpy as np  # noqa: E402
import sherpa_onnx  # noqa: E402

from asrshrink import api  # noqa: E402
from asrshrink.export.onnx import export_model  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nemo_conformer"


def main() -> None:
    print(f"{'case':<15}{'utterance':>10}{'tokens':>8}{'sherpa tokens':>15}{'agreement':>11}{'graph max diff':>16}")
    for case in ("conformer", "fastconformer", "options"):
        d = np.load(FIXTURES / case / "outputs.npz")
        model, info = api.load_model(FIXTURES / case / "model.nemo")
        waves = [d["waveform"][i, :d["waveform_len"][i]] for i in range(2)]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "onnx"
            report = export_model(model, out, info=info, speech=waves)
            worst = max(v for part in report["parity"]["max_abs_diff"].values() for v in part.values())
            recognizer = sherpa_onnx.OfflineRecognizer.from_transducer(
                encoder=str(out / "encoder.onnx"), decoder=str(out / "decoder.onnx"),
                joiner=str(out / "joiner.onnx"), tokens=str(out / "tokens.txt"), num_threads=1,
                sample_rate=16000, feature_dim=80, decoding_method="greedy_search", model_type="nemo_transducer")
            ids = {label.replace("\u2581", " "): i for i, label in enumerate(model.vocabulary.labels)}
            for i, wave in enumerate(waves):
                stream = recognizer.create_stream()
                stream.accept_waveform(16000, wave)
                recognizer.decode_stream(stream)
                got = [ids[t] for t in stream.result.tokens]
                ref = d[f"tokens_{i}"].tolist()
                agreement = 1 - jiwer.wer(" ".join(map(str, ref)), " ".join(map(str, got)) or "-")
                print(f"{case:<15}{i:>10}{len(ref):>8}{len(got):>15}{agreement:>11.2f}{worst:>16.1e}")


if __name__ == "__main__":
    main()

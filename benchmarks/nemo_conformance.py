"""Largest differences between asrshrink and NeMo 3.0's own outputs on the NeMo conformance fixtures
(tests/fixtures/nemo_conformer: conformer, fastconformer, options), and whether greedy tokens are identical.

    python benchmarks/nemo_conformance.py

Features from the padded batch's waveforms; encoder outputs from NeMo's features, for the padded batch and for
each utterance alone; the prediction network on utterance 0's tokens; the joint's log-probabilities over
utterance 0's whole lattice; greedy tokens from the waveforms, batched and alone.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from asrshrink import api  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nemo_conformer"


def main() -> None:
    print(f"{'case':<15}{'features':>10}{'enc batch':>11}{'enc single':>12}{'prediction':>12}{'joint':>10}"
          f"{'tokens':>8}{'  tokens per utterance'}")
    for case in ("conformer", "fastconformer", "options"):
        d = np.load(FIXTURES / case / "outputs.npz")
        m, _ = api.load_model(FIXTURES / case / "model.nemo")

        def diff(a, b) -> float:
            return float((a - torch.from_numpy(b)).abs().max())

        f, _ = m.featurizer(torch.from_numpy(d["waveform"]), torch.from_numpy(d["waveform_len"]))
        with torch.no_grad():
            e, _ = m.encode(torch.from_numpy(d["features"]).transpose(1, 2), torch.from_numpy(d["features_len"]))
            single = max(diff(m.encode(torch.from_numpy(d[f"single{i}_features"]).transpose(1, 2),
                                       torch.from_numpy(d[f"single{i}_features_len"]))[0].transpose(1, 2),
                              d[f"single{i}_encoder_out"]) for i in range(2))
            labels = torch.tensor([[m.vocabulary.blank, *d["single0_tokens"].tolist()]])
            pred, _ = m.predict(labels, m.initial_state(1))
            enc0 = torch.from_numpy(d["single0_encoder_out"]).transpose(1, 2)
            logprobs = m.joint(enc0.unsqueeze(2), pred.unsqueeze(1)).log_softmax(-1)
        waves = [d["waveform"][i, :d["waveform_len"][i]] for i in range(2)]
        batched = [h.tokens for h in api.transcribe(m, waves)]
        alone = [api.transcribe(m, [w])[0].tokens for w in waves]
        same = batched == alone == [d[f"tokens_{i}"].tolist() for i in range(2)]
        print(f"{case:<15}{diff(f.transpose(1, 2), d['features']):>10.1e}{diff(e.transpose(1, 2), d['encoder_out']):>11.1e}"
              f"{single:>12.1e}{diff(pred, d['single0_pred_out']):>12.1e}"
              f"{diff(logprobs, d['single0_joint_logprobs']):>10.1e}{str(same):>8}  {[len(t) for t in batched]}")


if __name__ == "__main__":
    main()

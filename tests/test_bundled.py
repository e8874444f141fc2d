"""The bundled reference model and speech sample: present, small, and decoding the same batched or not."""

import json

import pytest
import torch
from typer.testing import CliRunner

from asrshrink import api
from asrshrink.cli.main import app
from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.audio.text import Vocabulary
from asrshrink.audio.datasets import bundled_sample_names
from asrshrink.errors import DataError
from asrshrink.models.checkpoint import ASSETS, DEFAULT_MODEL
from asrshrink.models.mlperf_rnnt import MLPERF_LABELS


def test_assets_are_present_and_small():
    assert DEFAULT_MODEL.is_file(), "the bundled reference model is missing"
    assert DEFAULT_MODEL.stat().st_size <= 15_000_000
    v2 = sum(p.stat().st_size for p in (ASSETS / "speech" / "v2").rglob("*") if p.is_file())
    speech = sum(p.stat().st_size for p in (ASSETS / "speech").rglob("*") if p.is_file()) - v2
    assert 0 < speech <= 10_000_000 and 0 < v2 <= 15_000_000
    for split in ("calib", "test"):
        assert len(api.open_dataset(ASSETS / "speech" / split, vocabulary=Vocabulary(MLPERF_LABELS))) >= 150


def test_bundled_names_open_every_part_of_both_samples():
    assert bundled_sample_names() == ["calib", "test", "v2/calib", "v2/test", "v2/test-synth"]
    vocabulary = Vocabulary(MLPERF_LABELS)
    assert api.open_dataset("bundled:test", vocabulary=vocabulary).source == ASSETS / "speech" / "test"
    synth = api.open_dataset("bundled:v2/test-synth", vocabulary=vocabulary)
    rows = [json.loads(line) for line in (ASSETS / "speech" / "v2" / "test-synth" / "manifest.jsonl").open()]
    assert len(synth) == len(rows) == 100 and {r["synth"] for r in rows} == {"festival"}
    assert len(api.open_dataset("bundled:v2/test", vocabulary=vocabulary)) == 200
    assert not {r["source"] for r in map(json.loads, (ASSETS / "speech" / "v2" / "calib" / "manifest.jsonl").open())
                } & {"gcide", "gcide-quotes"}  # GPL sentences stay out of the package


def test_unknown_bundled_name_is_one_line_listing_the_names(tmp_path):
    with pytest.raises(DataError, match=r"bundled:v3/test: no such part .* bundled:v2/test-synth"):
        api.open_dataset("bundled:v3/test", vocabulary=Vocabulary(MLPERF_LABELS))
    result = CliRunner().invoke(app, ["eval", "--data", "bundled:../reference", "--limit", "2"])
    assert result.exit_code == 2 and "no such part of the bundled speech sample" in result.output
    assert "Traceback" not in result.output


def test_eval_and_calib_take_bundled_names(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--data", "bundled:v2/test-synth", "--limit", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_utterances"] == 3 and data["data"] == str(ASSETS / "speech" / "v2" / "test-synth")
    assert data["wer"] > 0  # the bundled model was trained on one synthesizer; Festival is not it
    out = tmp_path / "svd"
    result = CliRunner().invoke(app, ["svd", "--rank-threshold", "0.5", "--data-aware", "--calib", "bundled:v2/calib",
                                      "--num-utterances", "4", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert str(ASSETS / "speech" / "v2" / "calib") in json.dumps(report)


@pytest.fixture(scope="module")
def model():
    net, _ = api.load_model(None)
    return net


def test_batched_decoding_equals_batch_one_on_real_speech(model):
    data = api.open_dataset(ASSETS / "speech" / "test", vocabulary=model.vocabulary, limit=12, seed=1)
    waves = [u.audio for u in data]
    features, lengths = api.featurize(model, waves)
    enc, enc_lengths = api.encode(model, features, lengths)
    batched = greedy_decode(model, enc, enc_lengths)
    singles = []
    for wave in waves:
        f, n = api.featurize(model, [wave])
        e, en = api.encode(model, f, n)
        singles.append(greedy_decode(model, e, en)[0])
    assert batched == singles
    assert sum(map(len, batched)) > 0.5 * sum(len(u.text) for u in data)  # a trained model, not silence


def test_beam_one_is_greedy_on_real_speech(model):
    data = api.open_dataset(ASSETS / "speech" / "test", vocabulary=model.vocabulary, limit=4, seed=2)
    waves = [u.audio for u in data]
    greedy = api.transcribe(model, waves)
    nbest = api.transcribe(model, waves, beam=1)
    assert [n[0].tokens for n in nbest] == [g.tokens for g in greedy]
    assert all(len(g.tokens) > 10 for g in greedy)  # a trained model: non-empty transcripts
    wide = api.transcribe(model, waves, beam=3)
    for hyps, one in zip(wide, nbest):
        assert len(hyps) == 3 and hyps[0].score >= hyps[1].score >= hyps[2].score
        assert hyps[0].text == model.vocabulary.decode(hyps[0].tokens) and hyps[0].score >= one[0].score - 1e-6


def test_default_eval_runs_with_no_arguments():
    result = CliRunner().invoke(app, ["eval", "--limit", "20", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    # The bundled model makes 68 word errors in these 20 utterances' 165 words (41.21 % WER; 38.9 % on all 200).
    # Greedy decoding of a fixed model on fixed audio is deterministic: the only noise is float rounding in
    # another BLAS/FFT build flipping a near-tie between two labels, which moves a word or two, not more. So
    # 68 +- 2 errors (+-1.2 % WER): anything else means the model, the featurizer, the decoder or the scorer
    # changed.
    errors = sum(data["word_errors"].values())
    assert data["num_utterances"] == 20 and data["num_words"] == 165
    assert abs(errors - 68) <= 2 and data["wer"] == 100 * errors / 165


def test_encoder_is_deterministic(model):
    data = api.open_dataset(ASSETS / "speech" / "test", vocabulary=model.vocabulary, limit=2, seed=0)
    features, lengths = api.featurize(model, [u.audio for u in data])
    a, _ = api.encode(model, features, lengths)
    b, _ = api.encode(model, features, lengths)
    assert torch.equal(a, b)


def test_conformer_reference_is_small_and_loads_in_the_nemo_layout():
    path = ASSETS / "reference_conformer" / "model.safetensors"
    assert path.is_file() and path.stat().st_size <= 25_000_000
    net, _ = api.load_model(path)
    assert net.family == "nemo-conformer-transducer" and net.vocabulary.size == 33
    assert "EncDecRNNTBPEModel" in net.config.nemo_config  # a .nemo can be written from it


def test_conformer_reference_transcribes_the_bundled_test_sample():
    # the model card's figure is 39.11 % WER / 16.71 % CER on all 200 (40.00 / 16.24 on these 20); a model that
    # emits blank scores 100 % CER, the previous bundled Conformer 64.06 / 34.32 on all 200
    net, _ = api.load_model(ASSETS / "reference_conformer" / "model.safetensors")
    result = api.evaluate(net, api.open_dataset(str(ASSETS / "speech" / "test"), vocabulary=net.vocabulary, limit=20))
    assert result.cer < 25.0 and result.wer < 55.0

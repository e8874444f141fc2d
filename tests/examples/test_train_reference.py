"""The Conformer recipe of examples/train_reference.py: its tokenizer and the model built from it."""

from __future__ import annotations

import json

import pytest
import torch

import train_reference as recipe
from asrshrink.audio.text import SentencePieceVocabulary, normalize_text
from asrshrink.models.mlperf_rnnt import MLPERF_LABELS

TEXTS = ["The 3 quick brown foxes jumped over Dr. Smith's lazy dog!", "Is it 1984 & raining, or not?",
         "naïve café owners serve twenty two coffees", "when he got back he didn't know where he had been"] * 30


def write_manifest(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.jsonl").write_text("".join(
        json.dumps({"audio_filepath": f"audio/{i}.flac", "text": t, "duration": 1.0}) + "\n"
        for i, t in enumerate(texts)) + json.dumps({"audio_filepath": "x.flac", "text": "?!", "duration": 1}) + "\n")


def test_transcripts_are_normalised_as_for_character_models(tmp_path):
    write_manifest(tmp_path / "train", TEXTS[:4])
    texts = recipe.read_transcripts(tmp_path / "train")
    assert texts == [normalize_text(t, MLPERF_LABELS) for t in TEXTS[:4]]  # the punctuation-only line is dropped
    assert texts[0] == "the three quick brown foxes jumped over doctor smith's lazy dog"
    assert texts[2] == "naive cafe owners serve twenty two coffees"


def test_tokenizer_is_a_nemo_style_bpe_model_over_the_normalised_text(tmp_path):
    write_manifest(tmp_path / "train", TEXTS)
    texts = recipe.read_transcripts(tmp_path / "train")
    data = recipe.train_tokenizer(texts, 48)
    assert data == recipe.train_tokenizer(texts, 48)  # deterministic
    vocab = SentencePieceVocabulary(data)
    assert len(vocab.labels) == 48 and vocab.blank == 48 and vocab.labels[0] == "<unk>"
    assert not {"<s>", "</s>"} & set(vocab.labels)  # no BOS/EOS, as NeMo's tokenizer script makes them
    for text in texts:
        ids = vocab.encode(text)
        assert 0 not in ids and vocab.decode(ids) == text
    # what open_dataset does to a raw transcript with this vocabulary equals what the tokenizer was trained on
    assert vocab.normalize(TEXTS[0]) == texts[0]


def test_tokenizer_is_kept_with_the_bank_and_the_run(tmp_path):
    write_manifest(tmp_path / "corpus" / "train", TEXTS)

    class Args:
        corpus, vocab_size = str(tmp_path / "corpus"), 40

    first = recipe.tokenizer_for(Args, tmp_path / "run1", tmp_path / "bank")
    assert (tmp_path / "bank" / recipe.TOKENIZER).read_bytes() == first
    assert recipe.tokenizer_for(Args, tmp_path / "run2", tmp_path / "bank") == first  # a second run reuses it
    (tmp_path / "run3").mkdir()
    (tmp_path / "run3" / recipe.TOKENIZER).write_bytes(recipe.train_tokenizer(recipe.read_transcripts(
        tmp_path / "corpus" / "train"), 44))
    with pytest.raises(SystemExit, match="differs"):  # the bank's labels are another tokenizer's ids
        recipe.tokenizer_for(Args, tmp_path / "run3", tmp_path / "bank")


def test_conformer_model_and_ctc_head_follow_the_tokenizer(tmp_path):
    write_manifest(tmp_path / "train", TEXTS)
    data = recipe.train_tokenizer(recipe.read_transcripts(tmp_path / "train"), 40)
    model, head = recipe.build("nemo-conformer-transducer", True, data)
    assert model.vocabulary == SentencePieceVocabulary(data) and model.vocabulary.size == 41
    assert model.config.subsampling == "dw_striding" and model.config.subsampling_factor == 8
    assert (head.in_features, head.out_features) == (model.config.d_model, 41)
    features = torch.randn(1, 160, 80)
    enc, lengths = model.eval().encode(features, torch.tensor([160]))
    assert enc.shape == (1, 20, model.config.d_model) and lengths.tolist() == [20]


def test_init_models_tokenizer_is_used_when_the_run_has_none(tmp_path):
    write_manifest(tmp_path / "corpus" / "train", TEXTS)
    data = recipe.train_tokenizer(recipe.read_transcripts(tmp_path / "corpus" / "train"), 44)

    class Args:
        corpus, vocab_size = str(tmp_path / "corpus"), 40

    assert recipe.tokenizer_for(Args, tmp_path / "run", tmp_path / "bank", data) == data
    assert (tmp_path / "run" / recipe.TOKENIZER).read_bytes() == data


def test_layers_and_intermediate_ctc_options(tmp_path):
    write_manifest(tmp_path / "train", TEXTS)
    data = recipe.train_tokenizer(recipe.read_transcripts(tmp_path / "train"), 40)
    model, _ = recipe.build("nemo-conformer-transducer", True, data, layers=4)
    assert len(model.encoder.layers) == 4

    class Args:
        family, inter_ctc = "nemo-conformer-transducer", "1,3"

    assert recipe._inter_ctc_layers(Args) == ["encoder.layers.1", "encoder.layers.3"]
    Args.family = "mlperf-rnnt"
    with pytest.raises(SystemExit, match="--inter-ctc is for the Conformer"):
        recipe._inter_ctc_layers(Args)


def test_width_option_sizes_both_families(tmp_path):
    lstm, _ = recipe.build("mlperf-rnnt", True, width=128)
    assert lstm.config.encoder_hidden == lstm.config.pred_hidden == lstm.config.joint_hidden == 128
    assert recipe.build("mlperf-rnnt", False)[0].config == recipe.REFERENCE  # the default: the bundled sizes
    write_manifest(tmp_path / "train", TEXTS)
    data = recipe.train_tokenizer(recipe.read_transcripts(tmp_path / "train"), 40)
    conformer, _ = recipe.build("nemo-conformer-transducer", True, data, layers=2, width=96)
    assert conformer.config.d_model == 96 and len(conformer.encoder.layers) == 2


def test_widening_keeps_the_function_and_leaves_new_units_trainable():
    torch.manual_seed(0)
    start, _ = recipe.build("mlperf-rnnt", False, width=16)
    wide, _ = recipe.build("mlperf-rnnt", False, width=24)
    recipe.widen_lstm(start, wide)
    start.eval()
    wide.eval()
    features, lengths = torch.randn(2, 30, 240), torch.tensor([30, 21])
    labels = torch.randint(0, 28, (2, 5))
    with torch.no_grad():
        a, la = start(features, lengths, labels)
        b, lb = wide(features, lengths, labels)
    assert torch.equal(la, lb) and torch.allclose(a, b, atol=1e-5)
    # The new units are alive: they have inputs, and one backward step reaches what reads them.
    assert wide.state_dict()["encoder.pre_rnn.layers.0.lstm.weight_ih_l0"][16:24].abs().sum() > 0
    wide.train()
    wide(features, lengths, labels)[0].logsumexp(-1).mean().backward()
    grad = wide.encoder.post_rnn.layers[0].lstm.weight_ih_l0.grad
    assert grad[:, 16:24].abs().sum() > 0 and grad[:, 40:48].abs().sum() > 0  # both stacked frames' new units
    with pytest.raises(SystemExit, match="smaller --width"):
        recipe.widen_lstm(wide, start)

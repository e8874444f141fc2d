"""Conformance of the nemo-conformer-transducer family with outputs NeMo 3.0 computed (tests/fixtures/nemo_conformer):
features, encoder (padded batch and each utterance alone), prediction network, joint lattice, greedy tokens."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asrshrink import api
from asrshrink.audio.text import SentencePieceVocabulary
from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.models.nemo_conformer import NemoConformerTransducer

LAYOUTS = ("conformer", "fastconformer")
#: "options": made with NeMo by examples/make_nemo_fixture.py: tied position biases, no xscaling, dw_striding x4,
#: two prediction layers, no joint dropout (joint_net.1), 8 symbols per frame.
CASES = LAYOUTS + ("options",)
ATOL = 1e-4


@pytest.fixture(scope="module", params=CASES)
def nemo(request, nemo_fixture_dir: Path):
    folder = nemo_fixture_dir / request.param
    model, info = api.load_model(folder / "model.nemo")
    return request.param, model, info, dict(np.load(folder / "outputs.npz"))


def test_fixture_files_are_the_ones_the_outputs_were_computed_for(nemo_fixture_dir):
    for folder in (nemo_fixture_dir, nemo_fixture_dir / "options"):
        files = json.loads((folder / "fixture_info.json").read_text())["files"]
        for name, digest in files.items():
            if name == "README.md":
                continue
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name


def test_the_options_case_has_the_options_it_stands_for(nemo_fixture_dir):
    model, _ = api.load_model(nemo_fixture_dir / "options" / "model.nemo")
    c = model.config
    assert (c.untie_biases, c.xscaling, c.subsampling, c.pred_rnn_layers, c.joint_dropout, c.max_symbols) == (
        False, False, "dw_striding", 2, 0.0, 8)
    assert "joint.joint_net.1.weight" in model.to_foreign_state_dict()
    assert model.encoder.layers[0].self_attn.pos_bias_u is model.encoder.layers[1].self_attn.pos_bias_u


@pytest.mark.parametrize("layout", LAYOUTS)  # the options case has no state_dict.txt: see the test above
def test_loads_as_its_family_with_every_tensor(layout, nemo_fixture_dir):
    model, info = api.load_model(nemo_fixture_dir / layout / "model.nemo")
    assert isinstance(model, NemoConformerTransducer) and info.kind == "foreign"
    expected = json.loads((nemo_fixture_dir / "fixture_info.json").read_text())["variants"][layout]
    assert sum(p.numel() for p in model.parameters()) == expected["trainable_parameters"]
    assert isinstance(model.vocabulary, SentencePieceVocabulary)
    assert len(model.vocabulary.labels) == expected["tokenizer_vocab_size"] == model.vocabulary.blank
    assert model.max_symbols_per_step == 10
    listed = [line.split("\t") for line in (nemo_fixture_dir / layout / "state_dict.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    foreign = model.to_foreign_state_dict()
    assert sorted(foreign) == sorted(key for key, *_ in listed)
    for key, shape, _ in listed:
        assert str(tuple(foreign[key].shape)).replace(" ", "") == shape.replace(" ", ""), key


def test_round_trip_to_nemo_layout_is_exact(nemo, nemo_fixture_dir):
    from asrshrink.models.nemo_archive import read_nemo

    layout, model, _, _ = nemo
    _, original, _ = read_nemo(nemo_fixture_dir / layout / "model.nemo")
    ours = model.to_foreign_state_dict()
    assert set(ours) == set(original)
    for key, tensor in original.items():
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(ours[key], tensor), key


def test_features_match_nemo_batched_and_single(nemo):
    _, model, _, ref = nemo
    feats, lengths = model.featurizer(torch.from_numpy(ref["waveform"]), torch.from_numpy(ref["waveform_len"]))
    assert lengths.tolist() == ref["features_len"].tolist()
    assert float((feats.transpose(1, 2) - torch.from_numpy(ref["features"])).abs().max()) <= ATOL
    for i in range(2):
        wave = ref["waveform"][i, :ref["waveform_len"][i]]
        single, _ = api.featurize(model, [wave])
        assert single.shape[1] == ref[f"single{i}_features"].shape[2]
        assert float((single.transpose(1, 2) - torch.from_numpy(ref[f"single{i}_features"])).abs().max()) <= ATOL


def test_encoder_matches_nemo_batched_and_single(nemo):
    _, model, _, ref = nemo
    with torch.no_grad():
        enc, lengths = model.encode(torch.from_numpy(ref["features"]).transpose(1, 2),
                                    torch.from_numpy(ref["features_len"]))
    assert lengths.tolist() == ref["encoder_out_len"].tolist()
    assert float((enc.transpose(1, 2) - torch.from_numpy(ref["encoder_out"])).abs().max()) <= ATOL
    for i in range(2):
        with torch.no_grad():
            single, n = model.encode(torch.from_numpy(ref[f"single{i}_features"]).transpose(1, 2),
                                     torch.from_numpy(ref[f"single{i}_features_len"]))
        assert n.tolist() == ref[f"single{i}_encoder_out_len"].tolist()
        assert float((single.transpose(1, 2) - torch.from_numpy(ref[f"single{i}_encoder_out"])).abs().max()) <= ATOL


def test_prediction_and_joint_lattice_match_nemo(nemo):
    _, model, _, ref = nemo
    labels = torch.tensor([[model.vocabulary.blank, *ref["single0_tokens"].tolist()]])
    with torch.no_grad():
        pred, _ = model.predict(labels, model.initial_state(1))
        enc = torch.from_numpy(ref["single0_encoder_out"]).transpose(1, 2)
        logprobs = model.joint(enc.unsqueeze(2), pred.unsqueeze(1)).log_softmax(-1)
    assert float((pred - torch.from_numpy(ref["single0_pred_out"])).abs().max()) <= ATOL
    assert float((logprobs - torch.from_numpy(ref["single0_joint_logprobs"])).abs().max()) <= ATOL


def test_greedy_tokens_equal_nemo_batched_and_single(nemo):
    _, model, _, ref = nemo
    # The random models emit up to the symbol cap on many frames, so this checks the decoding rule itself.
    frames = greedy_frames(model, ref)
    assert max(frames) == model.max_symbols_per_step and min(frames) == 0
    hyps = api.transcribe(model, [ref["waveform"][i, :ref["waveform_len"][i]] for i in range(2)])
    for i in range(2):
        assert hyps[i].tokens == ref[f"tokens_{i}"].tolist() == ref[f"single{i}_tokens"].tolist()
        assert api.transcribe(model, [ref["waveform"][i, :ref["waveform_len"][i]]])[0].tokens == hyps[i].tokens
        assert hyps[i].text == model.vocabulary.decode(ref[f"tokens_{i}"].tolist()) != ""
    with torch.no_grad():  # NeMo's own encoder output decodes to the same tokens
        enc = torch.from_numpy(ref["encoder_out"]).transpose(1, 2)
        assert greedy_decode(model, enc, torch.from_numpy(ref["encoder_out_len"]))[1] == ref["tokens_1"].tolist()


def greedy_frames(model, ref) -> list[int]:
    """Labels emitted per encoder frame by greedy decoding of utterance 0 (one frame at a time)."""
    with torch.no_grad():
        enc = torch.from_numpy(ref["single0_encoder_out"]).transpose(1, 2)
    counts, done = [], 0
    for t in range(1, enc.shape[1] + 1):
        n = len(greedy_decode(model, enc[:, :t], torch.tensor([t]))[0])
        counts.append(n - done)
        done = n
    return counts


def test_native_format_round_trip_decodes_the_same(nemo, tmp_path):
    _, model, _, ref = nemo
    api.save_model(model, tmp_path / "out")
    again, info = api.load_model(tmp_path / "out")
    assert info.kind == "asrshrink" and isinstance(again, NemoConformerTransducer)
    wave = ref["waveform"][0, :ref["waveform_len"][0]]
    assert api.transcribe(again, [wave])[0].tokens == ref["tokens_0"].tolist()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_nemo_archive_written_by_asrshrink_reloads_exactly(nemo, tmp_path):
    from asrshrink.models.nemo_archive import write_nemo

    _, model, _, ref = nemo
    path = write_nemo(model, tmp_path / "copy.nemo")
    again, _ = api.load_model(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert again.vocabulary == model.vocabulary


def test_tied_position_biases_are_one_parameter(nemo_fixture_dir):
    model, _ = api.load_model(nemo_fixture_dir / "conformer" / "model.nemo")
    config = model.config.__class__.from_json({**model.config.to_json(), "untie_biases": False})
    tied = NemoConformerTransducer(config)
    layers = tied.encoder.layers
    assert layers[0].self_attn.pos_bias_u is layers[-1].self_attn.pos_bias_u
    saved = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in tied.parameters())
    assert saved == 2 * (len(layers) - 1) * layers[0].self_attn.pos_bias_u.numel()


def test_without_xscaling_the_encoder_changes():
    # xscaling multiplies the subsampled input by sqrt(d_model); off, the output differs (the option is read).
    from asrshrink.models.nemo_conformer import NemoConformerConfig

    vocab = {"labels": ["a", "b", " "], "blank": 3}
    torch.manual_seed(0)
    on = NemoConformerTransducer(NemoConformerConfig(d_model=32, n_layers=1, n_heads=2, subsampling_conv_channels=8,
                                                     pred_hidden=16, joint_hidden=16, vocabulary=vocab)).eval()
    off = NemoConformerTransducer(NemoConformerConfig(**{**on.config.__dict__, "xscaling": False})).eval()
    off.load_state_dict(on.state_dict())
    feats = torch.randn(1, 40, 80)
    with torch.no_grad():
        a, _ = on.encode(feats, torch.tensor([40]))
        b, _ = off.encode(feats, torch.tensor([40]))
    assert float((a - b).abs().max()) > 1e-3

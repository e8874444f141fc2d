"""Beam search on both families: width 1 is greedy, N-best sorted and merged, scores are the alignments'
log-probabilities (checked against a literal enumeration), the symbols-per-frame rule holds, batching is exact."""

import math

import numpy as np
import pytest
import torch

from asrshrink.evaluate.beam import beam_search
from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig
from asrshrink.models.nemo_conformer import NemoConformerConfig, NemoConformerTransducer
from tests.evaluate.test_decoding import TINY


def mlperf(blank_bias: float, seed: int = 0, labels: tuple[str, ...] | None = None) -> MlperfRnnt:
    torch.manual_seed(seed)
    config = TINY if labels is None else MlperfRnntConfig(**{**TINY.__dict__, "labels": labels})
    model = MlperfRnnt(config).eval()
    with torch.no_grad():
        model.joint_net.output.weight.mul_(4.0)
        model.joint_net.prediction_proj.weight.mul_(10.0)  # labels change the joint's output
        model.joint_net.output.bias[model.vocabulary.blank] += blank_bias
    return model


def conformer(blank_bias: float, seed: int = 0) -> NemoConformerTransducer:
    torch.manual_seed(seed)
    model = NemoConformerTransducer(NemoConformerConfig(
        d_model=32, n_layers=1, n_heads=2, subsampling_conv_channels=8, conv_kernel_size=5, pred_hidden=16,
        joint_hidden=16, vocabulary={"labels": ["a", "b", "c", " "], "blank": 4}, dropout=0.0,
        dropout_pre_encoder=0.0, dropout_att=0.0)).eval()
    with torch.no_grad():
        model.joint_net.output.weight.mul_(6.0)
        model.joint_net.pred.weight.mul_(10.0)
        model.joint_net.output.bias[model.vocabulary.blank] += blank_bias
    return model


def enc_dim(model) -> int:
    joint = model.joint_net
    return joint.encoder_proj.in_features if isinstance(model, MlperfRnnt) else joint.enc.in_features


def inputs(model, seed: int, lengths=(9, 3, 14, 1, 7, 14, 0)):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    return torch.randn(len(lengths), int(lengths.max()), enc_dim(model), generator=g), lengths


def last_output(model, tokens):
    """The prediction network run from scratch on the start symbol and ``tokens`` -> its last output (P,)."""
    labels = torch.tensor([[model.vocabulary.blank, *tokens]])
    g, _ = model.predict(labels, model.initial_state(1))
    return g[0, -1]


def alignment_logprob(model, enc, frames):
    """log P of one alignment written literally: ``frames`` lists the labels emitted at each frame, and each
    frame is closed by blank."""
    blank, tokens, total = model.vocabulary.blank, [], 0.0
    for t, emitted in enumerate(frames):
        for k in [*emitted, blank]:
            logp = torch.log_softmax(model.joint(enc[t], last_output(model, tokens)).double(), -1)
            total += float(logp[k])
            if k != blank:
                tokens.append(k)
    return total


def greedy_frames(model, enc, length, cap):
    """Greedy decoding that records the labels emitted at each frame (the reference algorithm of
    test_decoding, keeping the alignment)."""
    blank, tokens, frames = model.vocabulary.blank, [], []
    for t in range(length):
        frames.append([])
        for _ in range(cap):
            k = int(model.joint(enc[t], last_output(model, tokens)).argmax())
            if k == blank:
                break
            tokens.append(k)
            frames[-1].append(k)
    return frames


FAMILIES = [pytest.param(mlperf, id="mlperf-rnnt"), pytest.param(conformer, id="nemo-conformer")]


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_one_is_greedy_and_scores_its_alignment(family):
    kinds = {"blank": 0, "some": 0, "capped": 0}  # frames by the labels greedy emits there
    for seed in range(3):
        model = family(2.0, seed)
        enc, lengths = inputs(model, seed + 10)
        with torch.no_grad():
            greedy = greedy_decode(model, enc, lengths)
            beam = beam_search(model, enc, lengths, 1)
            assert [b[0].tokens for b in beam] == greedy
            for b, n in enumerate(lengths.tolist()):
                frames = greedy_frames(model, enc[b], n, model.max_symbols_per_step)
                assert sum(frames, []) == greedy[b]
                for f in frames:
                    kinds["blank" if not f else "capped" if len(f) == model.max_symbols_per_step else "some"] += 1
                assert beam[b][0].score == pytest.approx(alignment_logprob(model, enc[b], frames), abs=1e-4)
                assert beam[b][0].normalised == 1.0
    assert min(kinds.values()) > 0, kinds  # every way a frame can end was exercised


@pytest.mark.parametrize("family", FAMILIES)
def test_nbest_sorted_distinct_and_not_worse_than_greedy(family):
    """The best beam's score against the greedy alignment's log-probability: a wider beam usually finds a more
    probable hypothesis, but may prune the greedy path, so this is checked on fixed inputs, not proven."""
    better = 0
    for seed in range(3):
        model = family(2.0, seed)
        enc, lengths = inputs(model, seed + 20)
        with torch.no_grad():
            nbest = beam_search(model, enc, lengths, 4)
            greedy = greedy_decode(model, enc, lengths)
            for b, n in enumerate(lengths.tolist()):
                scores = [h.score for h in nbest[b]]
                assert scores == sorted(scores, reverse=True)
                assert len({tuple(h.tokens) for h in nbest[b]}) == len(nbest[b])
                assert len(nbest[b]) == (4 if n >= 3 else len(nbest[b]))
                assert sum(h.normalised for h in nbest[b]) == pytest.approx(1.0)
                assert [h.normalised for h in nbest[b]] == pytest.approx(
                    [math.exp(s - math.log(sum(math.exp(x) for x in scores))) for s in scores])
                greedy_score = alignment_logprob(model, enc[b], greedy_frames(model, enc[b], n,
                                                                              model.max_symbols_per_step))
                assert scores[0] >= greedy_score - 1e-6
                better += scores[0] > greedy_score + 1e-3
    assert better > 0  # the search does find more probable hypotheses than greedy on some inputs


@pytest.mark.parametrize("cap", [1, 2])
def test_unpruned_scores_sum_every_alignment(cap):
    """With a beam wider than the number of hypotheses nothing is pruned, so each sequence's score must be the
    log-sum-exp over all its alignments with at most ``cap`` labels per frame, enumerated literally here."""
    model = mlperf(0.0, seed=3, labels=("a", "b"))
    enc, lengths = inputs(model, 5, lengths=(3,))
    blank = model.vocabulary.blank
    exact: dict[tuple[int, ...], float] = {}
    alignments = []

    def walk(t, tokens, frames):
        if t == 3:
            alignments.append(frames)
            logp = alignment_logprob(model, enc[0], frames)
            old = exact.get(tuple(tokens))
            exact[tuple(tokens)] = logp if old is None else float(np.logaddexp(old, logp))
            return
        for n in range(cap + 1):
            for labels in _sequences(n, [k for k in range(blank)]):
                walk(t + 1, tokens + labels, frames + [labels])

    with torch.no_grad():
        walk(0, [], [])
        nbest = beam_search(model, enc, lengths, 10_000, max_symbols_per_step=cap)[0]
    assert {tuple(h.tokens): pytest.approx(h.score, abs=1e-5) for h in nbest} == exact
    assert len(exact) < len(alignments)  # merging happened: most sequences have several alignments


def _sequences(n, alphabet):
    if n == 0:
        return [[]]
    return [[k, *rest] for k in alphabet for rest in _sequences(n - 1, alphabet)]


@pytest.mark.parametrize("family", FAMILIES)
def test_symbols_per_frame_cap(family):
    model = family(-100.0)  # blank never wins
    enc, lengths = inputs(model, 1, lengths=(5, 2))
    with torch.no_grad():
        nbest = beam_search(model, enc, lengths, 3, max_symbols_per_step=4)
        default = beam_search(model, enc[1:], lengths[1:], 2)
    assert [{len(h.tokens) for h in hyps} for hyps in nbest] == [{20}, {8}]
    assert {len(h.tokens) for h in default[0]} == {2 * model.max_symbols_per_step}
    assert all(math.isfinite(h.score) for hyps in nbest for h in hyps)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_utterance_at_a_time(family):
    model = family(2.0, 1)
    enc, lengths = inputs(model, 30)
    with torch.no_grad():
        batched = beam_search(model, enc, lengths, 3)
        for b, n in enumerate(lengths.tolist()):
            single = beam_search(model, enc[b:b + 1, :n], lengths[b:b + 1], 3)[0]
            assert [h.tokens for h in batched[b]] == [h.tokens for h in single]
            assert [h.score for h in batched[b]] == pytest.approx([h.score for h in single], abs=1e-5)


def test_width_must_be_positive():
    model = mlperf(0.0)
    with pytest.raises(ValueError, match="at least 1"):
        beam_search(model, torch.zeros(1, 2, 16), torch.tensor([2]), 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_ties_go_to_the_lowest_id_as_greedy(family):
    model = family(0.0)
    with torch.no_grad():
        model.joint_net.output.weight.zero_()
        model.joint_net.output.bias.zero_()  # every output equally likely: each step is an exact tie
        enc, lengths = inputs(model, 2, lengths=(3, 1))
        greedy = greedy_decode(model, enc, lengths, max_symbols_per_step=2)
        beam = beam_search(model, enc, lengths, 1, max_symbols_per_step=2)
    assert greedy == [[0] * 6, [0] * 2] and [b[0].tokens for b in beam] == greedy

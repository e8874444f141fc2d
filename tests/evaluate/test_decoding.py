"""Greedy decoding: batched equals batch-1, and both equal the reference algorithm written out literally."""

import torch

from asrshrink.evaluate.decoding import greedy_decode
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig

TINY = MlperfRnntConfig(encoder_hidden=16, encoder_pre_layers=1, encoder_post_layers=1, pred_hidden=12,
                        pred_layers=2, joint_hidden=20, dropout=0.0)


def tiny_model(blank_bias: float, seed: int = 0) -> MlperfRnnt:
    torch.manual_seed(seed)
    model = MlperfRnnt(TINY).eval()
    with torch.no_grad():
        model.joint_net.output.weight.mul_(8.0)  # sharp, decisive logits
        model.joint_net.output.bias[model.vocabulary.blank] += blank_bias
    return model


def literal_greedy(model, enc, length, max_symbols=30):
    """The MLPerf decoder as specified: recompute the prediction step from `hidden` at every joint call."""
    blank = model.vocabulary.blank
    hidden, labels = model.initial_state(1), []
    for t in range(length):
        f = enc[t]
        for _ in range(max_symbols):
            last = blank if not labels else labels[-1]
            g, new_hidden = model.predict(torch.tensor([[last]]), hidden)
            k = int(model.joint(f, g[0, 0]).argmax())
            if k == blank:
                break
            labels.append(k)
            hidden = new_hidden
    return labels


def test_batched_equals_batch_one_and_the_literal_algorithm():
    model = tiny_model(blank_bias=2.0)
    torch.manual_seed(1)
    lengths = torch.tensor([9, 3, 14, 1, 7, 14])
    enc = torch.randn(len(lengths), 14, 16) * 3
    with torch.no_grad():
        batched = greedy_decode(model, enc, lengths)
        for b, n in enumerate(lengths.tolist()):
            single = greedy_decode(model, enc[b:b + 1, :n], lengths[b:b + 1])[0]
            assert batched[b] == single == literal_greedy(model, enc[b], n)
    emitted = sum(len(x) for x in batched)
    blanks_possible = int(lengths.sum())
    # The case exercises both branches: labels are emitted, and frames end on blank.
    assert 0 < emitted and any(len(x) < 30 * n for x, n in zip(batched, lengths.tolist()))
    assert emitted < 30 * blanks_possible


def test_symbol_limit_per_frame():
    model = tiny_model(blank_bias=-100.0)  # blank never wins
    enc = torch.randn(2, 5, 16)
    with torch.no_grad():
        out = greedy_decode(model, enc, torch.tensor([5, 2]), max_symbols_per_step=4)
    assert [len(x) for x in out] == [20, 8]


def test_all_blank_model_emits_nothing():
    model = tiny_model(blank_bias=100.0)
    with torch.no_grad():
        assert greedy_decode(model, torch.randn(3, 6, 16), torch.tensor([6, 1, 4])) == [[], [], []]

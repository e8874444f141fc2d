"""The training loop: an interrupted-and-resumed run equals an uninterrupted one."""

import numpy as np
import pytest
import torch
from torch import nn

from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig
from asrshrink.training.data import BucketSampler, FeatureBank
from asrshrink.training.loop import TrainConfig, train
from asrshrink.training.objectives import transducer_ctc_loss

TINY = MlperfRnntConfig(encoder_hidden=16, encoder_pre_layers=1, encoder_post_layers=1, pred_hidden=8,
                        pred_layers=1, joint_hidden=12, dropout=0.1)


def tiny_bank(n: int = 12, seed: int = 0) -> FeatureBank:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 20, size=n)
    feats = rng.standard_normal((int(lengths.sum()), 240)).astype(np.float16)
    labels = [rng.integers(0, 28, size=int(rng.integers(1, 5))).tolist() for _ in range(n)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return FeatureBank(feats, offsets, labels, [f"u{i}" for i in range(n)])


def run(tmp_path, steps_first: int | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = MlperfRnnt(TINY)
    head = nn.Linear(model.aux_dim, model.vocabulary.size)
    config = TrainConfig(steps=7, lr=1e-2, warmup_steps=2, max_frames=40, max_batch=4, checkpoint_every=3,
                         log_every=2, seed=3)
    bank = tiny_bank()

    def loss_fn(batch):
        return transducer_ctc_loss(model, batch, ctc_head=head, ctc_weight=0.5)

    result = train(model, loss_fn, bank, config, tmp_path, extra_modules={"ctc_head": head},
                   stop_after=steps_first)
    if steps_first is not None:
        assert result["interrupted"] and result["step"] == steps_first
        torch.manual_seed(999)  # a fresh process would not share the RNG state
        model2 = MlperfRnnt(TINY)
        head2 = nn.Linear(model2.aux_dim, model2.vocabulary.size)

        def loss_fn2(batch):
            return transducer_ctc_loss(model2, batch, ctc_head=head2, ctc_weight=0.5)

        result = train(model2, loss_fn2, bank, config, tmp_path, extra_modules={"ctc_head": head2}, resume=True)
        model = model2
    assert result["step"] == 7 and not result["interrupted"]
    return model.state_dict()


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tmp_path):
    straight = run(tmp_path / "a", None)
    resumed = run(tmp_path / "b", 4)  # stops across an epoch boundary and between checkpoints
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    fresh = MlperfRnnt(TINY).state_dict()
    assert any(not torch.equal(straight[k], fresh[k]) for k in straight if not k.startswith("featurizer"))


def test_training_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    model = MlperfRnnt(TINY)
    bank = tiny_bank(4)
    batch = bank.batch([0, 1, 2, 3])
    model.eval()
    with torch.no_grad():
        before, _ = transducer_ctc_loss(model, batch)
    config = TrainConfig(steps=40, lr=1e-2, warmup_steps=1, max_frames=200, max_batch=4, spec_augment=False,
                         checkpoint_every=100, log_every=10)
    train(model, lambda b: transducer_ctc_loss(model, b), bank, config, tmp_path)
    with torch.no_grad():
        after, _ = transducer_ctc_loss(model, batch)
    assert float(after) < 0.7 * float(before)
    assert (tmp_path / "train_log.jsonl").read_text().count("\n") == 4


def test_bucket_sampler_is_deterministic_and_covers_every_utterance():
    lengths = np.random.default_rng(0).integers(5, 50, size=100)
    sampler = BucketSampler(lengths, max_frames=200, max_batch=8, seed=1)
    a, b = sampler.epoch(2), sampler.epoch(2)
    assert a == b and a != sampler.epoch(3)
    assert sorted(i for batch in a for i in batch) == list(range(100))
    for batch in a:
        assert len(batch) <= 8 and (len(batch) == 1 or max(lengths[batch]) * len(batch) <= 200)


def test_noam_schedule_peaks_after_warmup_and_does_not_depend_on_steps():
    short, long = (TrainConfig(steps=s, lr=2e-3, warmup_steps=100, schedule="noam", min_lr_ratio=0.01)
                   for s in (500, 50000))
    assert short.lr_at(0) == pytest.approx(2e-5)
    assert short.lr_at(99) == pytest.approx(2e-3)
    assert short.lr_at(399) == pytest.approx(1e-3)              # sqrt(100 / 400)
    assert [short.lr_at(s) for s in range(0, 500, 7)] == [long.lr_at(s) for s in range(0, 500, 7)]
    assert long.lr_at(10**8) == pytest.approx(2e-5)             # the floor lr * min_lr_ratio
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear").lr_at(0)


def test_conformer_trains_with_auxiliary_ctc_on_its_encoder_output():
    from asrshrink.models.nemo_conformer import NemoConformerConfig, NemoConformerTransducer

    torch.manual_seed(0)
    labels = [" ", *"abcdefgh"]
    model = NemoConformerTransducer(NemoConformerConfig(
        d_model=16, n_layers=2, n_heads=2, conv_kernel_size=3, subsampling="dw_striding", subsampling_factor=4,
        subsampling_conv_channels=8, pred_hidden=8, joint_hidden=8, vocabulary={"labels": labels, "blank": 9}))
    head = nn.Linear(model.aux_dim, model.vocabulary.size)
    batch = {"features": torch.randn(2, 48, 80), "feature_lengths": torch.tensor([48, 36]),
             "labels": torch.tensor([[1, 2, 3], [4, 5, 0]]), "label_lengths": torch.tensor([3, 2])}
    model.eval()
    enc, enc_len, aux, aux_len = model.encode_with_aux(batch["features"], batch["feature_lengths"])
    ref, ref_len = model.encode(batch["features"], batch["feature_lengths"])
    assert torch.equal(enc, ref) and torch.equal(aux, ref) and torch.equal(aux_len, ref_len)
    assert aux.shape[-1] == model.aux_dim == 16 and enc_len.tolist() == [12, 9]
    model.train()
    loss, metrics = transducer_ctc_loss(model, batch, ctc_head=head, ctc_weight=0.3)
    loss.backward()
    assert metrics["ctc"] > 0 and metrics["loss"] == pytest.approx(metrics["rnnt"] + 0.3 * metrics["ctc"], rel=1e-5)
    assert model.encoder.layers[0].self_attn.linear_q.weight.grad.abs().sum() > 0
    assert head.weight.grad.abs().sum() > 0


def test_intermediate_ctc_adds_a_term_per_named_layer_and_feeds_the_lower_layers():
    from asrshrink.models.nemo_conformer import NemoConformerConfig, NemoConformerTransducer

    torch.manual_seed(0)
    model = NemoConformerTransducer(NemoConformerConfig(
        d_model=16, n_layers=3, n_heads=2, ff_expansion_factor=2, conv_kernel_size=3, subsampling_conv_channels=8,
        pred_hidden=8, joint_hidden=8, vocabulary={"labels": list("abcdefghi"), "blank": 9})).train()
    batch = {"features": torch.randn(2, 48, 80), "feature_lengths": torch.tensor([48, 36]),
             "labels": torch.tensor([[1, 2, 3], [4, 5, 0]]), "label_lengths": torch.tensor([3, 2])}
    heads = {"encoder.layers.0": nn.Linear(16, model.vocabulary.size)}
    loss, metrics = transducer_ctc_loss(model, batch, inter_ctc=heads, inter_weight=0.5)
    loss.backward()
    assert metrics["ctc@encoder.layers.0"] > 0
    assert metrics["loss"] == pytest.approx(metrics["rnnt"] + 0.5 * metrics["ctc@encoder.layers.0"], rel=1e-5)
    assert heads["encoder.layers.0"].weight.grad.abs().sum() > 0
    assert not model.encoder.layers[0]._forward_hooks  # the capture hooks are removed
    with pytest.raises(ValueError, match="not \\(B, T', D\\) at the encoder's frame rate"):
        transducer_ctc_loss(model, batch, inter_ctc={"encoder.pre_encode.conv.0": nn.Linear(8, 10)})

"""Distillation: the lattice objective, the collapsed form, gradual pruning, exact resume, and the command."""

import json

import pytest
import torch
from typer.testing import CliRunner

from asrshrink import compress
from asrshrink.cli.main import app
from asrshrink.config import DistillConfig
from asrshrink.models.checkpoint import load_model, save_model
from asrshrink.models.layers import matrices
from asrshrink.training.distill import PruneSchedule, collapse, lattice_kl
from tests.helpers import assert_interrupted_run_resumes
from tests.methods.test_psvd import tiny

runner = CliRunner()


def logits(seed, b=2, t=5, u=4, v=6):
    return torch.randn(b, t, u, v, generator=torch.Generator().manual_seed(seed))


def test_lattice_kl_is_zero_for_the_teacher_itself_and_positive_otherwise():
    x = logits(0)
    args = dict(enc_lengths=torch.tensor([5, 3]), labels=torch.tensor([[1, 2, 3], [2, 0, 0]]),
                label_lengths=torch.tensor([3, 1]), blank=5)
    assert float(lattice_kl(x, x, **args)) == pytest.approx(0.0, abs=1e-6)
    assert float(lattice_kl(logits(1), x, **args)) > 0.01


def test_lattice_kl_ignores_nodes_outside_each_lattice():
    x, y = logits(0), logits(1)
    args = dict(enc_lengths=torch.tensor([5, 3]), labels=torch.tensor([[1, 2, 3], [2, 0, 0]]),
                label_lengths=torch.tensor([3, 1]), blank=5)
    changed = y.clone()
    changed[1, 3:] += 5.0        # frames past the second utterance's length
    changed[1, :, 2:] -= 3.0     # label steps past its one label
    assert torch.allclose(lattice_kl(x, y, **args), lattice_kl(x, changed, **args))


def test_collapse_reads_each_utterances_next_label_and_ends_at_its_own_length():
    log_probs = torch.log_softmax(logits(4, b=2, t=3, u=4, v=6), -1)
    labels, lengths = torch.tensor([[1, 2, 3], [4, 0, 0]]), torch.tensor([3, 1])
    folded = collapse(log_probs, labels, lengths, blank=5)
    assert torch.allclose(folded.exp().sum(-1), torch.ones(2, 3, 4), atol=1e-5)
    for b, n in enumerate(lengths.tolist()):
        for u in range(4):
            if u < n:
                assert torch.allclose(folded[b, :, u, 0], log_probs[b, :, u, labels[b, u]])
            else:  # no next label at or after the utterance's own last node
                assert torch.isinf(folded[b, :, u, 0]).all()
                assert torch.allclose(folded[b, :, u, 2].exp(), 1 - log_probs[b, :, u, 5].exp(), atol=1e-5)
    assert torch.allclose(folded[..., 1], log_probs[..., 5])


def test_collapsed_kl_is_positive_and_never_above_the_full_kl():
    # merging outcomes can only lose information: KL of the collapsed distributions <= KL of the full ones
    kw = dict(enc_lengths=torch.tensor([5, 4]), labels=torch.tensor([[0, 1, 3], [1, 0, 0]]),
              label_lengths=torch.tensor([3, 1]), blank=5)
    for seed in range(3):
        x, y = logits(10 + seed), logits(20 + seed)
        full, folded = lattice_kl(x, y, **kw), lattice_kl(x, y, collapsed=True, **kw)
        assert 0 < float(folded) <= float(full) + 1e-6


def test_cubic_schedule():
    s = PruneSchedule(0.8, start=10, until=50, every=10)
    assert [round(s.sparsity(t), 4) for t in (0, 10, 15, 20, 30, 49, 50, 90)] == [
        0.0, 0.0, 0.0, round(0.8 * (1 - 0.75 ** 3), 4), round(0.8 * (1 - 0.5 ** 3), 4),
        round(0.8 * (1 - 0.25 ** 3), 4), 0.8, 0.8]


def config(speech, **changes):
    base = dict(data=str(speech), student_config=json.dumps({"encoder_hidden": 16}), steps=8, lr=3e-3, warmup=2,
                max_frames=2000, checkpoint_every=2)
    return DistillConfig(**{**base, **changes})


def test_a_fresh_student_of_the_asked_size_is_published_without_progress(speech, tmp_path):
    teacher = save_model(tiny(), tmp_path / "teacher")
    compress.run_method("distill", config(speech, rnnt_weight=0.0, steps=30), model=str(teacher),
                        out=tmp_path / "d")
    log = [json.loads(line) for line in (tmp_path / "d" / ".progress" / "train_log.jsonl").read_text().splitlines()] \
        if (tmp_path / "d" / ".progress").exists() else None
    assert log is None  # the progress folder is dropped when the output is published
    student, _ = load_model(tmp_path / "d")
    assert student.config.encoder_hidden == 16


def test_kd_loss_falls_during_distillation(speech, tmp_path):
    teacher = save_model(tiny(), tmp_path / "teacher")
    lines = []
    compress.run_method("distill", config(speech, rnnt_weight=0.0, steps=40, checkpoint_every=40), model=str(teacher),
                        out=tmp_path / "d", log=lines.append)
    kd = [float(line.split(" kd ")[1].split()[0]) for line in lines if " kd " in line]
    assert len(kd) == 4 and kd[-1] < 0.7 * kd[0]


def test_gradual_pruning_reaches_its_sparsity_and_keeps_zeros(speech, tmp_path):
    teacher = save_model(tiny(), tmp_path / "teacher")
    report = compress.run_method("distill", config(speech, prune_to=0.6, prune_from=2, prune_until=6, prune_every=2),
                                 model=str(teacher), out=tmp_path / "d")
    student, _ = load_model(tmp_path / "d")
    pruned = [r for r in report["layers"] if r["status"] == "pruned during distillation"]
    assert pruned and all(abs(r["sparsity"] - 0.6) < 0.01 for r in pruned)
    for r in pruned:
        m = matrices(student.get_submodule(r["layer"]))[r["side"]]
        assert m.kind == "sparse" and abs(1 - m.mask.float().mean() - 0.6) < 0.01


def test_interrupted_distillation_resumes_to_identical_parameters(speech, tmp_path, monkeypatch):
    teacher = save_model(tiny(), tmp_path / "teacher")
    cfg = config(speech, prune_to=0.5, prune_from=2, prune_until=6, prune_every=2)
    import asrshrink.training.distill as distill_module

    assert_interrupted_run_resumes("distill", distill_module, cfg, teacher, tmp_path, monkeypatch)


def test_distill_command_needs_a_teacher_for_a_given_student(speech, tmp_path):
    student = save_model(tiny(), tmp_path / "student")
    result = runner.invoke(app, ["distill", str(student), "--data", str(speech), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--teacher is required" in result.output


@pytest.mark.parametrize("objective", ["top-beam", "beam"])
def test_beam_objectives_are_zero_for_a_copy_of_the_teacher_and_train(objective, speech, tmp_path):
    teacher = save_model(tiny(), tmp_path / "teacher")
    lines = []
    # the student starts as the teacher: KL over the teacher's own beams is 0 and its gradient too
    compress.run_method("distill", DistillConfig(data=str(speech), teacher=str(teacher), steps=10, warmup=2,
                                                 rnnt_weight=0.0, objective=objective, beam=3, pseudo_weight=0.5,
                                                 max_frames=2000, checkpoint_every=10),
                        model=str(teacher), out=tmp_path / "same", log=lines.append)
    kd = [float(line.split(" kd ")[1].split()[0]) for line in lines if " kd " in line]
    pseudo = [float(line.split(" pseudo ")[1].split()[0]) for line in lines if " pseudo " in line]
    assert kd and max(kd) < 1e-3 and pseudo and pseudo[0] > 0
    assert any("teacher beam search (width 3)" in line for line in lines)
    # a fresh student is far from the teacher on the same lattices
    lines.clear()
    compress.run_method("distill", DistillConfig(data=str(speech), student_config=json.dumps({"encoder_hidden": 16}),
                                                 steps=10, warmup=2, objective=objective, beam=3, max_frames=2000,
                                                 checkpoint_every=10),
                        model=str(teacher), out=tmp_path / "fresh", log=lines.append)
    assert float([line for line in lines if " kd " in line][0].split(" kd ")[1].split()[0]) > 0.01


# --- the teacher cache and the device ---------------------------------------------------------------------------

@pytest.mark.parametrize("objective,collapsed", [("truth", False), ("truth", True), ("beam", True)])
def test_a_cached_teacher_gives_the_live_teachers_loss(objective, collapsed, speech, tmp_path):
    from asrshrink.training import teacher_cache
    from asrshrink.training.data import FeatureBank
    from asrshrink.training.distill import (CachedTeacher, DistillObjective, LiveTeacher, build_teacher_cache,
                                            distill_loss, teacher_hypotheses)

    teacher, student = tiny(), tiny(seed=1)
    bank = FeatureBank.build(__import__("asrshrink").audio.datasets.open_dataset(
        str(speech), vocabulary=teacher.vocabulary), teacher.featurizer, teacher.vocabulary, tmp_path / "bank")
    obj = DistillObjective(rnnt_weight=0.0, lattice_weight=1.0, temperature=2.0, collapsed=collapsed,
                           lattice=objective, pseudo_weight=0.3 if objective == "beam" else 0.0)
    meta = build_teacher_cache(tmp_path / "cache", teacher, bank, obj, 3, {"x": 1})
    hyps = teacher_hypotheses(teacher, bank, objective, 3) if objective == "beam" else None
    cached = CachedTeacher(teacher_cache.CacheReader(tmp_path / "cache", meta),
                           teacher_cache.read_beams(tmp_path / "cache") if hyps else None)
    assert meta["width"] == (3 if collapsed else teacher.vocabulary.size) and meta["bytes"] > 0
    batch = bank.batch([0, 3, 5])
    live, _ = distill_loss(student, LiveTeacher(teacher, obj, hyps), batch, obj)
    from_cache, metrics = distill_loss(student, cached, batch, obj)
    assert metrics["kd"] > 1e-3  # a student that differs from the teacher
    assert float(from_cache.detach()) == pytest.approx(float(live.detach()), rel=2e-3)


def test_distill_with_a_teacher_cache_reuses_it_without_the_teacher_and_refuses_another(speech, tmp_path,
                                                                                         monkeypatch):
    teacher = save_model(tiny(), tmp_path / "teacher")
    cache = tmp_path / "cache"
    cfg = config(speech, teacher=str(teacher), teacher_cache=str(cache), collapsed=True, steps=6, checkpoint_every=3)
    compress.run_method("distill", cfg, model=str(teacher), out=tmp_path / "first")
    assert (cache / "meta.json").is_file() and list(cache.glob("posteriors-*.safetensors"))
    import asrshrink.training.distill as distill_module

    def no_teacher(path):  # a second run with the finished cache never loads the teacher
        raise AssertionError(f"loaded {path}")

    monkeypatch.setattr(distill_module, "load_model", no_teacher)
    lines = []
    compress.run_method("distill", cfg, model=str(teacher), out=tmp_path / "second", log=lines.append)
    assert any("the teacher model is not loaded" in line for line in lines)
    a, _ = load_model(tmp_path / "first")
    b, _ = load_model(tmp_path / "second")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    monkeypatch.undo()
    from asrshrink.errors import AsrshrinkError

    with pytest.raises(AsrshrinkError, match="differs in temperature"):
        compress.run_method("distill", config(speech, teacher=str(teacher), teacher_cache=str(cache), collapsed=True,
                                              temperature=2.0),
                            model=str(teacher), out=tmp_path / "third")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AsrshrinkError, match="needs an empty folder or a teacher cache"):
        compress.run_method("distill", config(speech, teacher_cache=str(tmp_path / "other")), model=str(teacher),
                            out=tmp_path / "fourth")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_cache_groups_stay_within_their_budget_and_keep_every_utterance_once():
    from asrshrink.training.teacher_cache import groups_within

    sizes = {0: (1, 10, 4), 1: (1, 12, 8), 2: (2, 20, 4), 3: (1, 30, 30), 4: (1, 31, 2)}
    groups = groups_within(list(sizes), sizes.__getitem__, elements=500, most=3)
    assert [i for g in groups for i in g] == list(sizes)
    for g in groups:
        rows = sum(sizes[i][0] for i in g)
        cost = rows * max(sizes[i][1] for i in g) * max(sizes[i][2] for i in g)
        assert cost <= 500 or len(g) == 1  # utterance 3 alone is over the budget
        assert len(g) <= 3
    assert [3] in groups
    assert groups_within(list(sizes), sizes.__getitem__, elements=10 ** 9, most=2) == [[0, 1], [2, 3], [4]]


def test_a_cache_in_many_small_shards_reads_the_same_with_few_files_open(speech, tmp_path, monkeypatch):
    from asrshrink.training import teacher_cache
    from asrshrink.training.data import FeatureBank
    from asrshrink.training.distill import DistillObjective, build_teacher_cache

    teacher = tiny()
    bank = FeatureBank.build(__import__("asrshrink").audio.datasets.open_dataset(
        str(speech), vocabulary=teacher.vocabulary), teacher.featurizer, teacher.vocabulary, tmp_path / "bank")
    obj = DistillObjective(rnnt_weight=0.0, lattice_weight=1.0, temperature=1.0, collapsed=True, lattice="truth")
    whole = build_teacher_cache(tmp_path / "whole", teacher, bank, obj, 2, {"x": 1})
    monkeypatch.setattr(teacher_cache, "SHARD_BYTES", 1)       # one lattice per shard
    monkeypatch.setattr(teacher_cache, "GROUP_ELEMENTS", 1)    # one utterance per teacher batch
    monkeypatch.setattr(teacher_cache, "OPEN_SHARDS", 2)
    split = build_teacher_cache(tmp_path / "split", teacher, bank, obj, 2, {"x": 1})
    assert len(split["shards"]) == len(bank) > 2 and len(whole["shards"]) == 1
    a, b = teacher_cache.CacheReader(tmp_path / "whole", whole), teacher_cache.CacheReader(tmp_path / "split", split)
    for key in sorted(a.shard_of):
        assert torch.allclose(a.get(key), b.get(key), atol=2e-3), key  # batch padding aside, the same numbers
        assert len(b.handles) <= 2


def test_a_teacher_cache_being_built_by_another_run_is_refused(speech, tmp_path):
    from asrshrink.errors import AsrshrinkError
    from asrshrink.output import OutputLock

    teacher = save_model(tiny(), tmp_path / "teacher")
    with OutputLock(tmp_path / "cache", option="--teacher-cache"):  # another run building this cache
        with pytest.raises(AsrshrinkError, match="in use by another asrshrink run"):
            compress.run_method("distill", config(speech, teacher_cache=str(tmp_path / "cache"), steps=2),
                                model=str(teacher), out=tmp_path / "d")
    assert not (tmp_path / "cache" / "meta.json").exists()


def test_an_unfinished_teacher_cache_is_rebuilt(speech, tmp_path):
    teacher = save_model(tiny(), tmp_path / "teacher")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "posteriors-00000.safetensors").write_bytes(b"half written")  # no meta.json: an interrupted build
    compress.run_method("distill", config(speech, teacher_cache=str(cache), steps=2, checkpoint_every=2),
                        model=str(teacher), out=tmp_path / "d")
    assert json.loads((cache / "meta.json").read_text())["utterances"] > 0
    from safetensors import safe_open

    with safe_open(str(cache / "posteriors-00000.safetensors"), framework="pt") as f:
        assert list(f.keys())


def test_the_teacher_reads_unaugmented_features(speech, tmp_path):
    from asrshrink.training.distill import DistillObjective, LiveTeacher

    teacher = tiny()
    seen = []
    real = teacher.encode
    teacher.encode = lambda features, lengths: seen.append(features) or real(features, lengths)
    dim = teacher.feature_config.feature_dim
    batch = {"features": torch.zeros(1, 40, dim), "clean_features": torch.ones(1, 40, dim),
             "feature_lengths": torch.tensor([40])}
    LiveTeacher(teacher, DistillObjective()).start(batch)
    assert torch.equal(seen[0], batch["clean_features"])


def test_device_is_checked_with_a_one_line_error(speech, tmp_path):
    teacher = save_model(tiny(), tmp_path / "teacher")
    result = runner.invoke(app, ["distill", str(teacher), "--student-config", '{"encoder_hidden": 16}', "--data",
                                 str(speech), "-o", str(tmp_path / "o"), "--device", "tpu"])
    assert result.exit_code == 2 and "--device must be cpu, cuda or cuda:N" in result.output
    if not torch.cuda.is_available():
        result = runner.invoke(app, ["distill", str(teacher), "--student-config", '{"encoder_hidden": 16}',
                                     "--data", str(speech), "-o", str(tmp_path / "o"), "--device", "cuda"])
        assert result.exit_code == 2 and "PyTorch sees no CUDA device" in result.output
    assert not (tmp_path / "o").exists()


def test_a_teacher_cache_of_pseudo_labels_alone(speech, tmp_path):
    teacher = save_model(tiny(), tmp_path / "teacher")
    lines = []
    compress.run_method("distill", config(speech, teacher=str(teacher), teacher_cache=str(tmp_path / "cache"),
                                          kd_weight=0.0, pseudo_weight=0.5, beam=2, steps=4, checkpoint_every=4),
                        model=str(teacher), out=tmp_path / "d", log=lines.append)
    assert (tmp_path / "cache" / "beams.json").is_file() and not list((tmp_path / "cache").glob("posteriors-*"))
    assert any(" pseudo " in line for line in lines)

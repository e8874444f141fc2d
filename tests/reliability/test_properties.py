"""Property-based tests (Hypothesis): malformed configs, tensor shapes, structure metadata and reports, each
generated to be invalid, must give exit code 2, one ``error:`` line, no traceback and no file written.

Each property runs ``EXAMPLES`` examples (derandomized, so CI runs the same ones every time); the total
is printed by ``pytest --hypothesis-show-statistics``.
"""

from __future__ import annotations

import json
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from asrshrink.cli.main import app
from tests.helpers import assert_one_line_error
from tests.reliability.conftest import snapshot

runner = CliRunner()
EXAMPLES = 60
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SIZE_FIELDS = ("input_dim", "encoder_hidden", "encoder_pre_layers", "stack_time_factor", "encoder_post_layers",
               "pred_hidden", "pred_layers", "joint_hidden")
JSON_JUNK = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                      st.text(max_size=8), st.lists(st.integers(), max_size=3),
                      st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _refused(argv, root, *fragments):
    before = snapshot(root)
    result = runner.invoke(app, argv)
    assert_one_line_error(result, *fragments)
    assert snapshot(root) == before


def _write_native(path, tensors, meta):
    save_file(tensors, str(path), metadata={"asrshrink": json.dumps(meta)})


@SETTINGS
@given(field=st.sampled_from(SIZE_FIELDS),
       value=st.one_of(st.integers(min_value=-(2 ** 62), max_value=2 ** 62), JSON_JUNK))
def test_a_config_with_any_wrong_size_is_refused(assets, tmp_path_factory, field, value):
    tensors, meta = assets.native_parts()
    original = meta["config"][field]
    if value == original and type(value) is type(original):
        value = original + 1
    meta["config"][field] = value
    root = tmp_path_factory.mktemp("config")
    path = root / "m.safetensors"
    _write_native(path, tensors, meta)
    _refused(["info", str(path)], root, str(path))


@SETTINGS
@given(data=st.data())
def test_a_tensor_of_any_wrong_shape_is_refused(assets, tmp_path_factory, data):
    state = assets.state_dict()
    key = data.draw(st.sampled_from(sorted(k for k in state if not k.startswith("audio_preprocessor"))))
    shape = data.draw(st.lists(st.integers(min_value=0, max_value=40), min_size=0, max_size=5).map(tuple)
                      .filter(lambda s: s != tuple(state[key].shape)))
    state[key] = torch.zeros(shape)
    root = tmp_path_factory.mktemp("shape")
    path = root / "m.pt"
    torch.save({"state_dict": state}, path)
    _refused(["svd", str(path), "--rank", "2", "-o", str(root / "out")], root, str(path))


@SETTINGS
@given(data=st.data())
def test_non_finite_weights_anywhere_are_refused_by_name(assets, tmp_path_factory, data):
    tensors, meta = assets.native_parts()
    key = data.draw(st.sampled_from(sorted(tensors)))
    flat = tensors[key].view(-1)
    index = data.draw(st.integers(min_value=0, max_value=flat.numel() - 1))
    flat[index] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    root = tmp_path_factory.mktemp("finite")
    path = root / "m.safetensors"
    _write_native(path, tensors, meta)
    _refused(["eval", str(path), "--data", str(assets.data)], root, str(path), key)


LAYERS = ["encoder.pre_rnn.layers.0", "encoder.post_rnn.layers.1", "prediction.rnn.layers.0", "joint_net.output",
          "joint_net.encoder_proj", "encoder", "nothing.here", ""]
SIDE = st.fixed_dictionaries({"type": st.sampled_from(["lowrank", "dense", "sparse", "other"]),
                              "in": st.integers(-2, 300), "out": st.integers(-2, 300),
                              "rank": st.integers(-1, 300), "groups": st.integers(-1, 5),
                              "bias": st.one_of(st.booleans(), st.integers(0, 2))})
SPEC = st.one_of(SIDE, JSON_JUNK, st.fixed_dictionaries({
    "type": st.sampled_from(["factorized_lstm", "sparse_lstm"]), "hidden_size": st.integers(-1, 100),
    "ih": st.one_of(SIDE, JSON_JUNK), "hh": st.one_of(SIDE, JSON_JUNK)}), st.fixed_dictionaries({
    "type": st.just("projected_lstm"), "input_size": st.integers(-1, 300), "hidden_size": st.integers(-1, 100),
    "proj_size": st.one_of(st.integers(1, 120), JSON_JUNK)}))


@SETTINGS
@given(structure=st.dictionaries(st.sampled_from(LAYERS), SPEC, min_size=1, max_size=3))
def test_any_structure_the_tensors_do_not_have_is_refused(assets, tmp_path_factory, structure):
    tensors, meta = assets.native_parts()
    meta["structure"] = structure
    root = tmp_path_factory.mktemp("structure")
    path = root / "m.safetensors"
    _write_native(path, tensors, meta)
    _refused(["export", str(path), "-o", str(root / "out")], root, str(path))


REPORT_KEYS = {"command": "str", "before.params": "count", "after.params": "count", "after.bytes": "number",
               "after.sparse_bytes": "number", "after.flops.encoder_per_frame": "number",
               "compression_ratio.model": "number", "eval.after.wer": "number", "eval.before.wer": "number",
               "eval": "eval", "schema": "schema"}


def _invalid(kind: str):
    bad_number = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                           st.floats(max_value=-1e-9), st.sampled_from([math.nan, math.inf]))
    return {"str": st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.text(), max_size=2)),
            "count": st.one_of(bad_number, st.integers(max_value=-1), st.floats(0.5, 1e9).filter(lambda v: v % 1)),
            "number": bad_number,
            "eval": st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2)),
            "schema": st.one_of(st.none(), st.integers(), st.text(max_size=20))}[kind]


@SETTINGS
@given(data=st.data())
def test_a_report_with_any_missing_or_mistyped_key_is_refused(assets, tmp_path_factory, data):
    report = json.loads((assets.svd_out / "report.json").read_text())
    key = data.draw(st.sampled_from(sorted(REPORT_KEYS)))
    *parents, last = key.split(".")
    holder = report
    for part in parents:
        holder = holder[part]
    if data.draw(st.booleans(), label="delete") and key not in ("after.sparse_bytes",):
        del holder[last]
    else:
        holder[last] = data.draw(_invalid(REPORT_KEYS[key]), label="value")
    root = tmp_path_factory.mktemp("report")
    (root / "report.json").write_text(json.dumps(report))
    command = data.draw(st.sampled_from([["report", str(root)], ["gate", str(root), "--max-params", "1000000"]]))
    _refused(command, root, str(root / "report.json"))

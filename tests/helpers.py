"""Helpers shared by the tests."""


def assert_one_line_error(result, *fragments):
    """A user error: exit code 2, exactly one ``error:`` line, last, no traceback, naming every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.output
    text = " ".join(errors[0].split())  # rich may wrap a long line
    for fragment in fragments:
        assert fragment in text, errors[0]


def assert_interrupted_run_resumes(command: str, module, config, source, tmp_path, monkeypatch):
    """Run the training-time ``command`` with ``config`` on ``source`` to the end (tmp_path/straight), then again
    (tmp_path/resumed) interrupted after 5 steps by making ``module.train`` (its training loop) stop there;
    check that a --resume contradicting the run's --steps is refused and that a plain --resume through the CLI
    ends with the uninterrupted run's parameters, bit for bit."""
    import pytest
    import torch
    from typer.testing import CliRunner

    from asrshrink import compress
    from asrshrink.cli.main import app
    from asrshrink.models.checkpoint import load_model

    compress.run_method(command, config, model=str(source), out=tmp_path / "straight")
    real_train = module.train

    def stop_after_five(*args, **kwargs):
        return real_train(*args, **{**kwargs, "stop_after": 5})

    monkeypatch.setattr(module, "train", stop_after_five)
    with pytest.raises(KeyboardInterrupt):
        compress.run_method(command, config, model=str(source), out=tmp_path / "resumed")
    monkeypatch.setattr(module, "train", real_train)
    runner = CliRunner()
    refused = runner.invoke(app, [command, "--resume", str(tmp_path / "resumed"), "--steps", "9"])
    assert refused.exit_code == 2 and "--steps 9 contradicts the interrupted run" in refused.output
    result = runner.invoke(app, [command, "--resume", str(tmp_path / "resumed")])
    assert result.exit_code == 0, result.output
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "resumed")
    assert a.state_dict().keys() == b.state_dict().keys()
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name

"""Helpers shared by the CLI tests."""


def assert_one_line_error(result, *fragments):
    """A user error: exit code 2, exactly one ``error:`` line, last, no traceback, naming every fragment."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in result.output
    text = " ".join(errors[0].split())  # rich may wrap a long line
    for fragment in fragments:
        assert fragment in text, errors[0]

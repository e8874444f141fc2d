"""Layering: ``asrshrink/api.py`` is a facade for notebooks and scripts; no module inside the package imports it."""

import ast
from fnmatch import fnmatch
from pathlib import Path

import pytest

import asrshrink

PACKAGE = Path(asrshrink.__file__).parent

#: Modules (paths relative to ``asrshrink/``, fnmatch patterns) allowed to import the facade besides api.py:
#: none; nothing may be added.
TEMPORARILY_ALLOWED: set[str] = set()


def api_imports(source: str, package: str) -> list[int]:
    """Line numbers of the imports of ``asrshrink.api`` in ``source``, the code of a module in ``package`` (a
    dotted name, against which relative imports resolve); function-local imports included."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            if any(a.name == "asrshrink.api" or a.name.startswith("asrshrink.api.") for a in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[:len(parts) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base == "asrshrink.api" or base.startswith("asrshrink.api."):
                lines.append(node.lineno)
            elif base == "asrshrink" and any(a.name == "api" for a in node.names):
                lines.append(node.lineno)
    return sorted(lines)


@pytest.mark.parametrize("code", [
    "import asrshrink.api",
    "import asrshrink.api as a",
    "from asrshrink import api",
    "from asrshrink import errors, api as facade",
    "from asrshrink.api import featurize",
    "def f():\n    from asrshrink.api import describe",
    "from .. import api",
    "from ..api import evaluate",
])
def test_the_check_finds_every_form_of_import(code):
    assert api_imports(code, "asrshrink.export")


@pytest.mark.parametrize("code", [
    "import asrshrink",
    "from asrshrink import errors",
    "from asrshrink.evaluate.corpus import evaluate",
    "from . import api",  # asrshrink.export.api, not the facade
])
def test_the_check_ignores_other_imports(code):
    assert not api_imports(code, "asrshrink.export")


def test_nothing_inside_the_package_imports_the_facade():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "api.py" or any(fnmatch(relative, pattern) for pattern in TEMPORARILY_ALLOWED):
            continue
        package = ".".join(path.parent.relative_to(PACKAGE.parent).parts)
        for line in api_imports(path.read_text(encoding="utf-8"), package):
            offenders.append(f"asrshrink/{relative}:{line}")
    assert not offenders, ("these modules import asrshrink.api; import from the module that defines the name "
                           "instead: " + ", ".join(offenders))

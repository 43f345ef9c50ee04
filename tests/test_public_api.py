"""The public API: what `import raysparse` offers, and the notebooks and the CLI use nothing else."""

import ast
import subprocess
import sys
from pathlib import Path

import raysparse

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CLI = Path(raysparse.__file__).with_name("cli.py")


def test_every_public_name_resolves():
    for name in raysparse._LAZY:
        assert getattr(raysparse, name) is not None, name
        assert name in dir(raysparse)
    assert callable(raysparse.run_search) and raysparse.SearchSpec.__name__ == "SearchSpec"
    try:
        raysparse.no_such_thing
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_notebooks_use_only_the_public_api():
    for notebook in sorted(NOTEBOOKS.glob("*.py")):
        for node in ast.walk(ast.parse(notebook.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("raysparse."):
                raise AssertionError(f"{notebook.name}:{node.lineno} imports {node.module} (use `from raysparse import ...`)")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("raysparse."), f"{notebook.name}:{node.lineno} imports {alias.name}"
        _check_public_names(notebook)


def test_the_cli_uses_only_public_names():
    """`.importlinter` keeps the CLI's imports to `raysparse`; the names it takes from it must exist, which
    only running each command would otherwise find (they resolve lazily)."""
    _check_public_names(CLI)


def _check_public_names(path: Path) -> None:
    """Every ``from raysparse import X`` and ``raysparse.X`` in ``path`` names something public."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "raysparse":
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "raysparse":
            names = [node.attr]
        else:
            continue
        for name in names:
            assert hasattr(raysparse, name), f"{path.name}:{node.lineno} uses raysparse.{name}"


def test_importing_the_api_and_the_cli_stays_cheap():
    code = "import sys, raysparse.cli; print(sorted({'torch', 'ray', 'datasets', 'mlflow'} & set(sys.modules)))"
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert heavy.strip() == "[]"

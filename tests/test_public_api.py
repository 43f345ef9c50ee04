"""The public API: what `import raysparse` offers, and the notebooks use nothing else."""

import ast
from pathlib import Path

import raysparse

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


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
            if isinstance(node, ast.ImportFrom) and node.module == "raysparse":
                for alias in node.names:
                    assert hasattr(raysparse, alias.name), f"{notebook.name} imports raysparse.{alias.name}"

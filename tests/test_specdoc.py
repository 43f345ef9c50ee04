"""docs/SPEC.md is generated from the spec models and names every field of a run spec."""

import types
import typing
from pathlib import Path

from pydantic import BaseModel

from raysparse.config import RunSpec
from raysparse.specdoc import COMMAND, spec_reference

SPEC_MD = Path(__file__).resolve().parents[1] / "docs" / "SPEC.md"


def field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every field, into nested models and into each model of a union."""
    paths = []
    for name, field in model.model_fields.items():
        path = prefix + name
        paths.append(path)
        annotation = field.annotation
        while typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        members = typing.get_args(annotation) if union else (annotation,)
        for member in members:
            while typing.get_origin(member) is typing.Annotated:
                member = typing.get_args(member)[0]
            if isinstance(member, type) and issubclass(member, BaseModel):
                paths += field_paths(member, path + ".")
    return paths


def test_committed_spec_reference_is_current():
    assert SPEC_MD.is_file(), f"docs/SPEC.md is missing: run {COMMAND}"
    assert SPEC_MD.read_text() == spec_reference(), f"docs/SPEC.md is stale: run {COMMAND}"


def test_every_run_spec_field_is_documented():
    text = spec_reference()
    paths = field_paths(RunSpec)
    assert {"pruning.sparsity", "recovery.distillation.alpha", "tracking.uri"} <= set(paths)
    missing = [path for path in paths if f"| `{path}` |" not in text]
    assert not missing, f"fields missing from the spec reference: {missing}"

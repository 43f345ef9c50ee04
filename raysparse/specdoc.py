"""The spec reference (docs/SPEC.md), generated from the pydantic models of the run and search specs.

``python -m raysparse.specdoc > docs/SPEC.md`` rewrites it; tests/test_specdoc.py fails when the
committed file differs from :func:`spec_reference`. Every section of a spec and every field is
listed with its type, default, constraints (``ge``/``gt``/``le``/``lt``, length bounds, Literal
choices, field validators) and description: ``Field(description=...)`` where a field has one,
else the comments written above it and after it in the model's source. Nested models, lists and
dicts of models, unions and discriminated unions of models are walked recursively.
"""

from __future__ import annotations

import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

COMMAND = "python -m raysparse.specdoc > docs/SPEC.md"


@dataclass
class _Section:
    path: str                       # dotted path of the section ("" for the spec itself)
    model: type[BaseModel]
    variant: str = ""               # e.g. "kind: iterative" for a member of a discriminated union


# --- types -----------------------------------------------------------------------------------------

def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """``Annotated[X, ...]`` -> (X, its metadata)."""
    metadata: list[Any] = []
    while typing.get_origin(annotation) is typing.Annotated:
        annotation, *extra = typing.get_args(annotation)
        metadata += extra
    return annotation, metadata


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (one element otherwise), Annotated wrappers removed."""
    annotation, _ = _unwrap(annotation)
    if _is_union(annotation):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _type_name(annotation: Any) -> str:
    annotation, metadata = _unwrap(annotation)
    inner = _constraints(metadata)
    if _is_union(annotation):
        name = " | ".join(dict.fromkeys(_type_name(arg) for arg in typing.get_args(annotation)))
    elif annotation is type(None) or annotation is None:
        name = "null"
    elif annotation is Any:
        name = "any"
    elif typing.get_origin(annotation) is Literal:
        name = " | ".join(dict.fromkeys(_type_name(type(value)) for value in typing.get_args(annotation)))
    elif typing.get_origin(annotation) is not None:
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        base = getattr(origin, "__name__", str(origin))
        if args and args[-1] is Ellipsis:
            args = args[:-1]
            return f"{base}[{_type_name(args[0])}, ...]"
        name = f"{base}[{', '.join(_type_name(arg) for arg in args)}]" if args else base
    elif isinstance(annotation, type):
        name = {"NoneType": "null"}.get(annotation.__name__, annotation.__name__)
    else:
        name = str(annotation).replace("typing.", "")
    return f"{name} ({', '.join(inner)})" if inner else name


def _choices(annotation: Any) -> list[Any]:
    """The values a Literal (possibly inside a union) allows."""
    values: list[Any] = []
    for member in _members(annotation):
        if typing.get_origin(member) is Literal:
            values += typing.get_args(member)
    return values


def _constraints(metadata: list[Any]) -> list[str]:
    found = []
    for item in metadata:
        if isinstance(item, FieldInfo):        # Annotated[X, Field(...)] inside a list, dict or union
            found += _constraints(item.metadata)
            continue
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"),
                                  ("min_length", "min length"), ("max_length", "max length"),
                                  ("multiple_of", "multiple of"), ("pattern", "matches")):
            value = getattr(item, attribute, None)
            if value is not None and (isinstance(item, annotated_types.BaseMetadata) or
                                      type(item).__name__ == "_PydanticGeneralMetadata"):
                found.append(f"{symbol} {_value(value)}")
    return found


# --- values ----------------------------------------------------------------------------------------

def _value(value: Any) -> str:
    """A value as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.model_dump().items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def _default(field: FieldInfo, discriminator: str | None) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        try:
            value = field.default_factory()   # type: ignore[call-arg]
        except TypeError:                     # a factory that takes the validated data
            return "computed"
    else:
        return "**required**"
    if isinstance(value, BaseModel):
        if discriminator and discriminator in type(value).model_fields:
            return f"`{discriminator}: {_value(getattr(value, discriminator))}`"
        return "section"
    return f"`{_value(value)}`"


# --- descriptions ----------------------------------------------------------------------------------

_IGNORED_COMMENTS = ("noqa", "type:", "pragma", "fmt:", "isort:")


def _source_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment lines right above its definition and the comment after it
    (in the model's class or the nearest base class that has one)."""
    comments: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if issubclass(cls, BaseModel) and cls is not BaseModel:
            comments.update({name: text for name, text in _class_comments(cls).items() if text})
    return comments


def _class_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    depth, above, statement, after = 0, [], [], []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.INDENT:
            depth += 1
        elif token.type == tokenize.DEDENT:
            depth -= 1
        elif token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if text and not text.startswith(_IGNORED_COMMENTS):
                (after if statement else above).append(text)
        elif token.type == tokenize.NL:
            if not statement and not token.line.strip():
                above = []                     # a blank line ends a comment block
        elif token.type == tokenize.NEWLINE:
            if depth == 1 and len(statement) > 1 and statement[0].type == tokenize.NAME \
                    and statement[1].string == ":":
                comments[statement[0].string] = "; ".join(" ".join(block) for block in (above, after) if block)
            above, statement, after = [], [], []
        elif token.type != tokenize.ENDMARKER:
            statement.append(token)
    return comments


def _docstring(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc) if doc else ""


def _validators(model: type[BaseModel]) -> dict[str, list[str]]:
    """Field name -> what its field validators check (their docstring's first line, else their name)."""
    checks: dict[str, list[str]] = {}
    for name, decorator in model.__pydantic_decorators__.field_validators.items():
        doc = inspect.getdoc(decorator.func)
        text = doc.splitlines()[0].rstrip(".") if doc else name.strip("_").replace("_", " ")
        for field in decorator.info.fields:
            checks.setdefault(field, []).append(f"check: {text}")
    return checks


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


# --- sections --------------------------------------------------------------------------------------

def _discriminator(field: FieldInfo, annotation: Any) -> str | None:
    found = field.discriminator
    if found is None:
        for item in _unwrap(annotation)[1]:
            found = getattr(item, "discriminator", None) or found
    found = getattr(found, "discriminator", found)     # a pydantic Discriminator wraps a str or a callable
    return found if isinstance(found, str) else None


def _nested(path: str, annotation: Any, discriminator: str | None) -> list[_Section]:
    """The model sections a field's type holds: ``path`` itself, ``path[]`` for list items,
    ``path.<key>`` for dict values; one section per member of a union of models."""
    sections = []
    for member in _members(annotation):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if _is_model(member):
            variant = ""
            if discriminator and discriminator in member.model_fields:
                tags = _choices(member.model_fields[discriminator].annotation)
                variant = f"{discriminator}: {' | '.join(_value(t) for t in tags)}" if tags else ""
            sections.append(_Section(path, member, variant))
        elif origin in (list, tuple, set, frozenset) and args:
            sections += [s for arg in args if arg is not Ellipsis for s in _nested(f"{path}[]", arg, None)]
        elif origin is dict and len(args) == 2:
            sections += _nested(f"{path}.<key>", args[1], None)
    return sections


def _table(section: _Section) -> tuple[list[str], list[_Section]]:
    model, prefix = section.model, f"{section.path}." if section.path else ""
    comments, checks = _source_comments(model), _validators(model)
    rows = ["| field | type | default | constraints | description |", "| --- | --- | --- | --- | --- |"]
    children: list[_Section] = []
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        annotation = field.rebuild_annotation() if hasattr(field, "rebuild_annotation") else field.annotation
        discriminator = _discriminator(field, annotation)
        nested = _nested(path, annotation, discriminator)
        children += nested
        type_name = _type_name(field.annotation)
        if discriminator and nested:
            type_name = f"one of {', '.join(s.model.__name__ for s in nested)} (by `{discriminator}`)"
        constraints = _constraints(field.metadata)
        choices = _choices(field.annotation)
        if len(choices) == 1:
            constraints.append(f"only `{_value(choices[0])}`")
        elif choices and not (discriminator and nested):
            constraints.append("one of " + ", ".join(f"`{_value(c)}`" for c in choices))
        constraints += checks.get(name, [])
        description = field.description or comments.get(name, "")
        rows.append(f"| `{path}` | {_cell(type_name)} | {_default(field, discriminator)} | "
                    f"{_cell('; '.join(constraints))} | {_cell(description)} |")
    return rows, children


def _render(root: type[BaseModel], title: str) -> list[str]:
    lines: list[str] = []
    queue = [_Section("", root)]
    while queue:
        section = queue.pop(0)
        if section.path:
            variant = f" ({section.variant})" if section.variant else ""
            lines += [f"### `{section.path}`{variant}: {section.model.__name__}", ""]
        else:
            lines += [f"## {title}: {section.model.__name__}", ""]
        doc = _docstring(section.model)
        if doc:
            lines += [doc, ""]
        rows, children = _table(section)
        lines += rows + [""]
        queue = children + queue        # depth first, in field order
    return lines


def _algorithm_options() -> list[str]:
    """One table per registered algorithm: what ``pruning.options`` takes with it."""
    from raysparse.pruning import ALGORITHMS

    lines = ["## Algorithm options", "",
             "`pruning.options` is checked against the options class of `pruning.algorithm` before any work. "
             "Fields named `seed` and `target_sparsity` that a spec leaves unset take the run's `seed` and "
             "`pruning.sparsity`.", ""]
    for name in sorted(ALGORITHMS):
        options = ALGORITHMS[name].Options
        lines += [f"### `{name}`", ""]
        if not options.model_fields:
            lines += ["No options.", ""]
            continue
        rows, _ = _table(_Section("pruning.options", options))
        lines += rows + [""]
    return lines


def spec_reference() -> str:
    """docs/SPEC.md: every section and field of the run spec and of the search spec, as Markdown."""
    from raysparse.config import RunSpec
    from raysparse.search.spec import SearchSpec

    lines = [
        "# Spec reference",
        "",
        f"Generated from the pydantic models by `{COMMAND}`: do not edit by hand "
        "(`tests/test_specdoc.py` fails when this file is stale).",
        "",
        "A spec is YAML whose keys are the fields below; every field has a default unless marked required, "
        "and an unknown key is an error. A path is what `--set PATH=VALUE` takes. Besides its fields, a spec "
        "file may hold `budgets:` (named sets of overrides, applied with `--budget NAME` before validation), "
        "and a search spec `grid:` (study axes, expanded into `trials` and `space`).",
        "",
        "- [Run spec](#run-spec-runspec) (`raysparse run`, `raysparse.config.RunSpec`)",
        "- [Search spec](#search-spec-searchspec) (`raysparse search`, `raysparse.search.spec.SearchSpec`)",
        "- [Algorithm options](#algorithm-options) (`pruning.options`, per `pruning.algorithm`)",
        "",
    ]
    lines += _render(RunSpec, "Run spec")
    lines += _render(SearchSpec, "Search spec")
    lines += _algorithm_options()
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["COMMAND", "spec_reference"]


if __name__ == "__main__":
    import sys

    sys.stdout.write(spec_reference())

"""The config reference: a markdown table of every key, rendered from the schema.

Reads the field docstrings, types, constraints and defaults of
:mod:`dsgd_mpi.schema`; docs/config.md is this table, and a test keeps the two
in step.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import TypeAdapter

from dsgd_mpi.schema import Config

# ---------------------------------------------------------- reading the schema

#: Validates and dumps whole configs (JSON mode: tuples as lists, as YAML writes them).
ADAPTER: TypeAdapter[Config] = TypeAdapter(Config)


def default_values() -> dict[str, Any]:
    """Every key's default, as a nested dict."""
    return ADAPTER.dump_python(Config(), mode="json")  # type: ignore[no-any-return]


def fields_of(cls: type) -> dict[str, Any]:
    """Field name -> FieldInfo of a pydantic dataclass."""
    return cls.__pydantic_fields__  # type: ignore[attr-defined,no-any-return]


def section_of(annotation: Any) -> Any:
    """The dataclass inside ``X`` or ``tuple[X, ...]``, else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
            return ("tuple", args[0])
    return None


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        base = _type_name(args[0])
        cons = []
        for meta in args[1:]:
            for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                for m in getattr(meta, "metadata", [meta]):
                    if getattr(m, attr, None) is not None:
                        cons.append(f"{op} {getattr(m, attr)}")
        return f"{base} {', '.join(cons)}" if cons else base
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    if dataclasses.is_dataclass(annotation):
        return annotation.__name__
    return getattr(annotation, "__name__", str(annotation))


def _field_type(info: Any) -> str:
    """Type of a field with its constraints (pydantic moves Field(gt=...) into metadata)."""
    ann = info.annotation
    if info.metadata:
        ann = Annotated[(ann, *info.metadata)]
    return _type_name(ann)


def _default_text(value: Any) -> str:
    return json.dumps(value)


def reference() -> str:
    """Markdown table of every config key: dotted path, type, default, description."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    defaults = default_values()

    def walk(cls: type, prefix: str, dflt: dict[str, Any] | None) -> None:
        for name, info in fields_of(cls).items():
            key = f"{prefix}{name}"
            inner = section_of(info.annotation)
            value = None if dflt is None else dflt.get(name)
            if dataclasses.is_dataclass(inner):
                walk(inner, key + ".", value)  # type: ignore[arg-type]
                continue
            shown = _default_text(value)
            desc = (info.description or "").replace("|", "\\|")
            rows.append(f"| `{key}` | {_field_type(info)} | `{shown}` | {desc} |")
            if isinstance(inner, tuple):
                item = inner[1]
                walk(item, f"{key}.N.", TypeAdapter(item).dump_python(item(), mode="json"))

    walk(Config, "", defaults)
    return "\n".join(rows) + "\n"

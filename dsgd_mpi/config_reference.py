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

from dsgd_mpi.schema import Config, _defaults, _fields, _inner


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
    defaults = _defaults()

    def walk(cls: type, prefix: str, dflt: dict[str, Any] | None) -> None:
        for name, info in _fields(cls).items():
            key = f"{prefix}{name}"
            inner = _inner(info.annotation)
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

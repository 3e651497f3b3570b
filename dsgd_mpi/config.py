"""Run configuration: strict YAML into frozen, typed, documented dataclasses.

One frozen dataclass per section, a one-line docstring under every field (it
becomes the field's description and the row of :func:`reference`), ``Literal``
for every choice. Loading is strict, as in nanoGPT's configurator: an unknown
key, a wrong type or an impossible value anywhere -- in the file or in a
``key.path=value`` override -- raises :class:`ConfigError`, which names the
dotted key and the offending value::

    cfg = load_config("configs/quickstart.yaml", ["optim.lr=0.2", "topology.name=torus"])
    check_world(cfg, comm.Get_size())     # what depends on the world size / machine
    text = to_yaml(cfg)                   # the resolved config, stored with the results

The schema (the
sections' dataclasses) is in :mod:`dsgd_mpi.schema`; they are re-exported here.

Pure: no MPI, no torch. Only :func:`check_world` and the ``reference_run``
check look at the file system.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from dsgd_mpi.config_reference import ADAPTER, default_values, fields_of, reference, section_of
from dsgd_mpi.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    ConsensusConfig,
    DataConfig,
    GossipConfig,
    Invalid,
    MetricsConfig,
    ModelConfig,
    OptimConfig,
    Phase,
    RunConfig,
    TopologyConfig,
    shown,
)
from dsgd_mpi.topology import Topology, TopologyError

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "ConsensusConfig",
    "DataConfig",
    "GossipConfig",
    "MetricsConfig",
    "ModelConfig",
    "OptimConfig",
    "Phase",
    "RunConfig",
    "TopologyConfig",
    "check_world",
    "load_config",
    "reference",
    "to_yaml",
]


# ---------------------------------------------------------------------- YAML

# YAML 1.1 (PyYAML) needs a dot in a float, so `1e-4` would be the string
# "1e-4". This resolver also accepts the exponent-only spelling.
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_FLOAT_FIRST = list("-+0123456789.")


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: `1e-4` is a float, only true/false are booleans.

    YAML 1.1 reads `on`, `off`, `yes`, `no` as booleans, which would turn
    ``device_buffers: on`` into ``True``; here they stay strings, and a boolean
    key given ``yes`` is a type error. Dates stay strings too.
    """


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings the loader would read as floats (run name "1e5").

    It keeps YAML 1.1's booleans, so ``on`` is written quoted and other YAML
    readers (the analysis tools) see the same values.
    """


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, _FLOAT_FIRST)


def _check_duplicates(node: yaml.Node, path: str, visited: set[int] | None = None) -> None:
    """PyYAML keeps the last of two equal keys; a strict config rejects them."""
    visited = set() if visited is None else visited
    if id(node) in visited:  # an alias seen before (possibly recursive)
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            here = f"{path}.{key}" if path else key
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(here, f"duplicate key (line {line})")
            seen.add(key)
            _check_duplicates(value_node, here, visited)
    elif isinstance(node, yaml.SequenceNode):
        for k, item in enumerate(node.value):
            _check_duplicates(item, f"{path}.{k}" if path else str(k), visited)


def _parse_yaml(text: str, where: str) -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, "")
        return _unshared(loader.construct_document(node))
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{where}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _unshared(value: Any) -> Any:
    """A copy with every mapping and list its own object: YAML aliases (``- *p``) load as one
    shared object, and an override of ``phases.0.x`` must change that phase only."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return value


# ---------------------------------------------------------------- validation


def _clean_loc(loc: Sequence[str | int], extra: bool) -> list[str]:
    """Keep the parts of a pydantic loc that are config keys or list indices."""
    out: list[str] = []
    node: Any = Config
    for i, part in enumerate(loc):
        if isinstance(node, tuple):  # inside a list of dataclasses: expect an index
            if isinstance(part, int):
                out.append(str(part))
                node = node[1]
            continue
        if dataclasses.is_dataclass(node) and isinstance(part, str):
            fields = fields_of(node)  # type: ignore[arg-type]
            if part in fields:
                out.append(part)
                node = section_of(fields[part].annotation)
                continue
            if extra and i == len(loc) - 1:
                out.append(part)
        # anything else is pydantic's own noise (union members, validator names)
    return out


def _reason(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = f" (got {shown(err.get('input'))})"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return "unknown key"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    bounds = {
        "greater_than": ("> ", "gt"),
        "greater_than_equal": (">= ", "ge"),
        "less_than": ("< ", "lt"),
        "less_than_equal": ("<= ", "le"),
    }
    if kind in bounds:
        op, k = bounds[kind]
        return f"must be {op}{ctx.get(k):g}{got}"
    simple = {
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
        "finite_number": "must be a finite number",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "tuple_type": "must be a list",
        "list_type": "must be a list",
        "dataclass_type": "must be a mapping of keys",
        "dataclass_exact_type": "must be a mapping of keys",
        "missing": "is required",
    }
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{got}"
    return simple.get(kind, str(err["msg"])) + got


def _validate(data: Any) -> Config:
    if data is None:
        data = {}
    try:
        text = json.dumps(data, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise ConfigError("", f"config is not plain data: {exc}") from None
    try:
        return ADAPTER.validate_json(text, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        extra = err["type"] in ("unexpected_keyword_argument", "extra_forbidden")
        parts = _clean_loc(err["loc"], extra)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, Invalid):
            parts += cause.path.split(".")
        key = ".".join(parts)
        reason = _reason(err)
        if extra:
            reason += _valid_keys_hint(parts[:-1])
        raise ConfigError(key, reason) from None


def _node_type(parts: Sequence[str]) -> Any:
    """The dataclass (or ('tuple', cls)) that the dotted path leads to, or None."""
    node: Any = Config
    for part in parts:
        if isinstance(node, tuple):
            if not part.isdigit():
                return None
            node = node[1]
            continue
        if not dataclasses.is_dataclass(node) or part not in fields_of(node):  # type: ignore[arg-type]
            return None
        node = section_of(fields_of(node)[part].annotation)  # type: ignore[arg-type]
    return node


def _valid_keys_hint(parts: Sequence[str]) -> str:
    node = _node_type(parts)
    if dataclasses.is_dataclass(node):
        return "; valid keys: " + ", ".join(fields_of(node))  # type: ignore[arg-type]
    return ""


# ----------------------------------------------------------------- overrides


def _merge(base: Any, over: Any) -> Any:
    """Deep-merge mappings (``over`` wins); anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return over


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(item, f"override must look like section.key=value (got {item!r})")
    path, text = item.split("=", 1)
    path = path.strip()
    parts = path.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(path, f"override needs a dotted path section.key (got {item!r})")
    node: Any = Config
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if isinstance(node, tuple):
            if not part.isdigit():
                raise ConfigError(here, "expected a list index (0, 1, ...)")
            node = node[1]
            continue
        if not dataclasses.is_dataclass(node):
            raise ConfigError(here, f"unknown key: {'.'.join(parts[:i])} has no sub-keys")
        if part not in fields_of(node):  # type: ignore[arg-type]
            raise ConfigError(here, "unknown key" + _valid_keys_hint(parts[:i]))
        node = section_of(fields_of(node)[part].annotation)  # type: ignore[arg-type]
    value = _parse_yaml(text, f"override {path}")
    # Walk the (merged) data along the path, creating sections as needed.
    cur: Any = data
    for i, part in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        nxt_is_index = parts[i + 1].isdigit()
        if isinstance(cur, list):
            k = int(part)
            if k >= len(cur):
                raise ConfigError(here, f"index out of range: the list has {len(cur)} item(s)")
            if not isinstance(cur[k], dict):
                cur[k] = {}
            cur = cur[k]
        else:
            if not isinstance(cur.get(part), list if nxt_is_index else dict):
                if nxt_is_index:
                    raise ConfigError(here, "is not a list to index into")
                cur[part] = {}
            cur = cur[part]
    last = parts[-1]
    if isinstance(cur, list):
        k = int(last)
        if k >= len(cur):
            raise ConfigError(path, f"index out of range: the list has {len(cur)} item(s)")
        cur[k] = value
    else:
        cur[last] = value


# -------------------------------------------------------------------- public


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (None = all defaults), apply ``key.path=value`` overrides, validate.

    Override values are parsed with the same YAML loader as the file
    (``optim.milestones=[0.3,0.6]``, ``consensus.phases.0.target=exact``).
    Raises :class:`ConfigError` naming the dotted key on any problem.
    """
    raw: Any = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError("", f"{path}: cannot read config: {exc.strerror}") from None
        raw = _parse_yaml(text, path)
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError("", f"{path}: top level must be a mapping of sections")
    if overrides:
        # Overrides may index into lists that the file left at their default.
        data = _merge(default_values(), raw)
        for item in overrides:
            _apply_override(data, item)
        raw = data
    return _validate(raw)


def check_world(cfg: Config, world_size: int) -> None:
    """Checks that depend on the number of ranks and on the machine.

    Raises :class:`ConfigError` for ``topology.name`` when the topology cannot
    serve ``world_size`` ranks, for a ``reference_run`` that is not a file, and
    for ``data.root`` when it does not exist (unless the data set is synthetic
    or ``data.download`` is true). Only rank 0 calls this: files one node cannot
    see must not make ranks disagree.
    """
    try:
        Topology(cfg.topology.name, world_size, cfg.topology.seed)
    except TopologyError as exc:
        raise ConfigError("topology.name", f"{exc} (world size {world_size})") from None
    for k, phase in enumerate(cfg.consensus.phases):
        if phase.reference_run is not None and not os.path.isfile(phase.reference_run):
            raise ConfigError(
                f"consensus.phases.{k}.reference_run",
                f"no such file (got {shown(phase.reference_run)})",
            )
    if cfg.data.name != "synthetic" and not cfg.data.download:
        if not os.path.isdir(cfg.data.root):
            raise ConfigError(
                "data.root",
                f"no such directory (got {shown(cfg.data.root)}); "
                "set data.download=true or fix the path",
            )


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text; ``load_config`` of it gives an equal Config."""
    data = ADAPTER.dump_python(cfg, mode="json")
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def from_yaml(text: str) -> Config:
    """Validate config text (e.g. the resolved config rank 0 broadcast, or an HDF5 attr)."""
    raw = _parse_yaml(text, "<config text>")
    return _validate(raw if raw is not None else {})

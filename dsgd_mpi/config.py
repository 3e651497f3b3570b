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

Pure: no MPI, no torch. Only :func:`check_world` and the ``reference_run``
check look at the file system.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from dsgd_mpi.topology import NAMES as TOPOLOGY_NAMES
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


class ConfigError(ValueError):
    """A config key that is unknown, of the wrong type or impossible.

    ``key`` is the dotted path of the offending key (``"optim.lr"``,
    ``"consensus.phases.1.until_epoch"``); it is ``""`` for errors about the
    file as a whole. ``str(exc)`` is ``"<key>: <reason>"``.
    """

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}" if key else reason)


class _Invalid(ValueError):
    """Raised by validators: ``path`` (relative to the validated object) + reason."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(reason)


# --------------------------------------------------------------------- types

_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


def _section(cls: type) -> type:
    return dataclass(frozen=True, kw_only=True, config=_CONFIG)(cls)


PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]

DataName = Literal["fashion_mnist", "cifar10", "cifar100", "imagenet32", "synthetic"]
ModelName = Literal["resnet20", "small_cnn", "mlp"]
# One list of names, owned by topology.py: a new topology is accepted here too.
TopologyName = Literal[TOPOLOGY_NAMES]  # type: ignore[valid-type]
Target = Literal["none", "constant", "adaptive", "exact"]


def _fmt(x: object) -> str:
    """Short repr of a value for messages (YAML-ish: floats and lists as written)."""
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in x) + "]"
    text = repr(x)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------ sections


@_section
class RunConfig:
    """Identity and length of the run."""

    name: str = "run"
    """Run name; metrics go to out_dir/name.h5."""
    seed: NonNegInt = 0
    """Seed for model init, data order and partitioning (same on every rank)."""
    out_dir: str = "runs"
    """Directory that holds one subdirectory per run."""
    epochs: PosFloat = 3.0
    """Length of the run in epochs of each rank's shard (may be fractional)."""


@_section
class DataConfig:
    """Data set and its split across ranks."""

    name: DataName = "fashion_mnist"
    """Data set."""
    root: str = "/usr/share/datasets/fashion-mnist"
    """Directory of the data set files (not needed for synthetic)."""
    batch_size: PosInt = 32
    """Mini-batch size per rank (the total batch is batch_size * world size)."""
    partition: Literal["iid", "dirichlet"] = "iid"
    """Split of the training set: iid shards, or label skew drawn from Dirichlet(alpha)."""
    alpha: PosFloat = 0.5
    """Dirichlet concentration for partition=dirichlet (smaller = more skew)."""
    reshuffle: bool = True
    """Reshuffle each rank's shard at every epoch."""
    download: bool = False
    """Download the data set into root if it is missing."""
    augment: bool = True
    """Training augmentation (random crop and flip for the CIFAR-like sets)."""
    workers: NonNegInt = 0
    """Reserved: batches are indexed from in-memory tensors, so loader workers are unused."""
    synthetic_size: PosInt = 2048
    """Number of training samples of the synthetic data set."""


@_section
class ModelConfig:
    """Network architecture."""

    name: ModelName = "small_cnn"
    """Architecture."""
    width: PosInt = 1
    """Width multiplier of the channels / hidden units."""


@_section
class OptimConfig:
    """Local optimizer and learning-rate schedule."""

    name: Literal["sgd", "adam"] = "sgd"
    """Local optimizer."""
    lr: PosFloat = 0.1
    """Base learning rate, for base_batch samples per step."""
    base_batch: PosInt = 64
    """Total batch size that lr refers to."""
    scale_lr: bool = True
    """Scale the peak lr linearly with the batch: lr * total_batch / base_batch."""
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """Momentum (SGD) or beta1 (Adam); buffers stay local to each rank."""
    nesterov: bool = True
    """Nesterov momentum (SGD only)."""
    weight_decay: NonNegFloat = 1e-4
    """L2 weight decay."""
    warmup_epochs: NonNegFloat = 0.0
    """Linear warmup from 0 to the peak lr over this many epochs."""
    milestones: tuple[Fraction, ...] = (0.5, 0.75)
    """Fractions of run.epochs at which the lr is multiplied by decay."""
    decay: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Factor applied to the lr at each milestone."""

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        ms = self.milestones
        for k in range(1, len(ms)):
            if ms[k] <= ms[k - 1]:
                raise _Invalid("milestones", f"must be strictly increasing (got {_fmt(list(ms))})")
        return self


@_section
class TopologyConfig:
    """Communication graph (see python -m dsgd_mpi.topology)."""

    name: TopologyName = "ring"
    """Gossip topology."""
    seed: NonNegInt = 0
    """Seed of the time-varying topologies (random_matching)."""


@_section
class GossipConfig:
    """What is mixed and how the bytes move."""

    local_steps: PosInt = 1
    """Local optimizer steps between gossip phases (H in local SGD)."""
    buffers: bool = False
    """Also mix BatchNorm running statistics (otherwise they stay local)."""
    device_buffers: Literal["auto", "on", "off"] = "auto"
    """Hand device memory to MPI directly: on, off (stage via host), auto (if CUDA-aware)."""


@_section
class Phase:
    """One interval of epochs with its consensus target."""

    until_epoch: PosFloat | None = None
    """End of the phase in epochs; null = end of the run (only for the last phase)."""
    target: Target = "none"
    """Consensus control: none (1 round/step), constant, adaptive, exact (all-reduce)."""
    factor: PosFloat = 1.0
    """Multiplier of the target (constant: of reference; adaptive: of lr^2 EMA(|g|^2))."""
    reference: PosFloat | None = None
    """Target=constant: reference consensus distance (or give reference_run)."""
    reference_run: str | None = None
    """Target=constant: HDF5 file of an uncontrolled run; its max distance in this phase."""
    max_rounds: PosInt = 1
    """Most gossip rounds per step while the target is not met."""
    ema: Fraction = 0.9
    """Target=adaptive: EMA coefficient of the mean squared gradient norm."""

    @model_validator(mode="after")
    def _check(self) -> Phase:
        given = [k for k in ("reference", "reference_run") if getattr(self, k) is not None]
        if self.target == "constant":
            if len(given) != 1:
                what = "both" if given else "neither"
                raise _Invalid(
                    "reference",
                    f"target 'constant' needs exactly one of reference / reference_run "
                    f"(got {what})",
                )
            if self.reference_run is not None and not os.path.isfile(self.reference_run):
                raise _Invalid("reference_run", f"no such file (got {_fmt(self.reference_run)})")
        elif given:
            raise _Invalid(
                given[0],
                f"only used by target 'constant', not {self.target!r} "
                f"(got {_fmt(getattr(self, given[0]))})",
            )
        return self


@_section
class ConsensusConfig:
    """Consensus-distance control, phase by phase."""

    phases: tuple[Phase, ...] = (Phase(),)
    """Phases in order, each ended by its until_epoch; with none given, the lr decays."""

    @model_validator(mode="after")
    def _check(self) -> ConsensusConfig:
        ps = self.phases
        if not ps:
            raise _Invalid("phases", "needs at least one phase (got [])")
        if all(p.until_epoch is None for p in ps):
            return self  # boundaries from the lr decays; the count is checked in Config
        for k, p in enumerate(ps[:-1]):
            if p.until_epoch is None:
                raise _Invalid(
                    f"phases.{k}.until_epoch",
                    "only the last phase may end with the run (got null)",
                )
            if k and p.until_epoch <= ps[k - 1].until_epoch:  # type: ignore[operator]
                raise _Invalid(
                    f"phases.{k}.until_epoch",
                    f"must be greater than phases.{k - 1}.until_epoch="
                    f"{_fmt(ps[k - 1].until_epoch)} (got {_fmt(p.until_epoch)})",
                )
        last = ps[-1].until_epoch
        if len(ps) > 1 and last is not None and last <= ps[-2].until_epoch:  # type: ignore[operator]
            raise _Invalid(
                f"phases.{len(ps) - 1}.until_epoch",
                f"must be greater than phases.{len(ps) - 2}.until_epoch="
                f"{_fmt(ps[-2].until_epoch)} (got {_fmt(last)})",
            )
        return self


@_section
class MetricsConfig:
    """What is measured and how often."""

    log_every: PosInt = 50
    """Log a row of step metrics every this many steps."""
    exact_every: NonNegInt = 0
    """Measure the exact consensus distance every this many steps (0 = never)."""
    eval_every: PosFloat = 1.0
    """Evaluate the averaged and local models every this many epochs."""
    flush_every: PosInt = 50
    """Flush logged rows to the HDF5 file every this many steps."""


@_section
class CheckpointConfig:
    """Checkpoints for resuming a run."""

    every: NonNegInt = 0
    """Checkpoint every this many steps and at the end (0: only on SIGTERM/SIGUSR1)."""
    dir: str | None = None
    """Checkpoint directory; null = out_dir/name/ckpt."""


@_section
class Config:
    """The whole run configuration; every section is optional."""

    run: RunConfig = field(default_factory=RunConfig)
    """Identity and length of the run."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data set and its split across ranks."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Network architecture."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Local optimizer and learning-rate schedule."""
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    """Communication graph."""
    gossip: GossipConfig = field(default_factory=GossipConfig)
    """What is mixed and how the bytes move."""
    consensus: ConsensusConfig = field(default_factory=ConsensusConfig)
    """Consensus-distance control, phase by phase."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """What is measured and how often."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints for resuming a run."""

    @model_validator(mode="after")
    def _check(self) -> Config:
        # Phases are in absolute epochs; one that ends at or after the end of the
        # run would leave the phases after it unreachable.
        ps = self.consensus.phases
        epochs = self.run.epochs
        if len(ps) > 1 and all(p.until_epoch is None for p in ps):
            want = len(self.optim.milestones) + 1
            if len(ps) != want:
                raise _Invalid(
                    "consensus.phases",
                    f"without until_epoch, phases follow the lr decays: {want} phases for "
                    f"{len(self.optim.milestones)} milestones (got {len(ps)})",
                )
            return self
        for k, p in enumerate(ps[:-1]):
            if p.until_epoch is not None and p.until_epoch >= epochs:
                raise _Invalid(
                    f"consensus.phases.{k}.until_epoch",
                    f"must be < run.epochs={_fmt(epochs)} since phases follow it "
                    f"(got {_fmt(p.until_epoch)})",
                )
        last = ps[-1].until_epoch
        if last is not None and last < epochs:
            raise _Invalid(
                f"consensus.phases.{len(ps) - 1}.until_epoch",
                f"the last phase must reach run.epochs={_fmt(epochs)}; use null (got {_fmt(last)})",
            )
        return self


_ADAPTER: TypeAdapter[Config] = TypeAdapter(Config)

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
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{where}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------- validation


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> FieldInfo of a pydantic dataclass."""
    return cls.__pydantic_fields__  # type: ignore[attr-defined,no-any-return]


def _inner(annotation: Any) -> Any:
    """The dataclass inside ``X`` or ``tuple[X, ...]``, else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
            return ("tuple", args[0])
    return None


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
            fields = _fields(node)  # type: ignore[arg-type]
            if part in fields:
                out.append(part)
                node = _inner(fields[part].annotation)
                continue
            if extra and i == len(loc) - 1:
                out.append(part)
        # anything else is pydantic's own noise (union members, validator names)
    return out


def _reason(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = f" (got {_fmt(err.get('input'))})"
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
        return _ADAPTER.validate_json(text, strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        extra = err["type"] in ("unexpected_keyword_argument", "extra_forbidden")
        parts = _clean_loc(err["loc"], extra)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _Invalid):
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
        if not dataclasses.is_dataclass(node) or part not in _fields(node):  # type: ignore[arg-type]
            return None
        node = _inner(_fields(node)[part].annotation)  # type: ignore[arg-type]
    return node


def _valid_keys_hint(parts: Sequence[str]) -> str:
    node = _node_type(parts)
    if dataclasses.is_dataclass(node):
        return "; valid keys: " + ", ".join(_fields(node))  # type: ignore[arg-type]
    return ""


# ----------------------------------------------------------------- overrides


def _defaults() -> dict[str, Any]:
    return _ADAPTER.dump_python(Config(), mode="json")  # type: ignore[no-any-return]


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
        if part not in _fields(node):  # type: ignore[arg-type]
            raise ConfigError(here, "unknown key" + _valid_keys_hint(parts[:i]))
        node = _inner(_fields(node)[part].annotation)  # type: ignore[arg-type]
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
        data = _merge(_defaults(), raw)
        for item in overrides:
            _apply_override(data, item)
        raw = data
    return _validate(raw)


def check_world(cfg: Config, world_size: int) -> None:
    """Checks that depend on the number of ranks and on the machine.

    Raises :class:`ConfigError` for ``topology.name`` when the topology cannot
    serve ``world_size`` ranks, and for ``data.root`` when it does not exist
    (unless the data set is synthetic or ``data.download`` is true).
    """
    try:
        Topology(cfg.topology.name, world_size, cfg.topology.seed)
    except TopologyError as exc:
        raise ConfigError("topology.name", f"{exc} (world size {world_size})") from None
    if cfg.data.name != "synthetic" and not cfg.data.download:
        if not os.path.isdir(cfg.data.root):
            raise ConfigError(
                "data.root",
                f"no such directory (got {_fmt(cfg.data.root)}); "
                "set data.download=true or fix the path",
            )


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text; ``load_config`` of it gives an equal Config."""
    data = _ADAPTER.dump_python(cfg, mode="json")
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


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


def from_yaml(text: str) -> Config:
    """Validate config text (e.g. the resolved config rank 0 broadcast, or an HDF5 attr)."""
    raw = _parse_yaml(text, "<config text>")
    return _validate(raw if raw is not None else {})

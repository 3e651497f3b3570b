"""The config schema: one frozen, typed, documented dataclass per section.

A one-line docstring under every field becomes its description and its row in
``config.reference()``; ``Literal`` for every choice; validators raise
``Invalid`` with the path of the offending key. Loading, overrides and
messages live in :mod:`dsgd_mpi.config`, which re-exports these classes.

Pure: no MPI, no torch; the ``reference_run`` check looks at the file system.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from dsgd_mpi.topology import NAMES as TOPOLOGY_NAMES


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


class Invalid(ValueError):
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
ModelName = Literal["resnet20", "resnet18", "small_cnn", "mlp"]
# One list of names, owned by topology.py: a new topology is accepted here too.
TopologyName = Literal[TOPOLOGY_NAMES]  # type: ignore[valid-type]
Target = Literal["none", "constant", "adaptive", "exact"]


def shown(x: object) -> str:
    """Short repr of a value for messages (YAML-ish: floats and lists as written)."""
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(shown(v) for v in x) + "]"
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
    steps: PosInt | None = None
    """Length of the run in steps instead of epochs (e.g. the same steps at every batch)."""
    overwrite: bool = False
    """Start over when out_dir/name.h5 exists: the old file is kept as name.h5.1, .2, ..."""


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
    resize: PosInt | None = None
    """Resize train and test images to resize x resize (bilinear, on the device); null: as is."""
    synthetic_size: PosInt = 2048
    """Number of training samples of the synthetic data set."""
    train_size: PosInt | None = None
    """Train on a seeded subset of this many samples, the same at every world size; null: all."""


@_section
class ModelConfig:
    """Network architecture."""

    name: ModelName = "small_cnn"
    """Architecture."""
    width: PosInt = 1
    """Width multiplier of the channels / hidden units."""
    pretrained: bool = False
    """resnet18: start from torchvision's ImageNet weights (downloaded; needs internet)."""


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
    """Linear warmup to the peak lr over this many epochs."""
    warmup_steps: NonNegInt = 0
    """Linear warmup over this many steps instead (warmup_epochs must then be 0)."""
    warmup_from: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Warmup starts at this fraction of the peak lr (Zhu et al.: 0.1)."""
    milestones: tuple[Fraction, ...] = (0.5, 0.75)
    """Fractions of run.epochs at which the lr is multiplied by decay."""
    decay: Annotated[float, Field(gt=0, le=1)] = 0.1
    """Factor applied to the lr at each milestone."""
    perturb: Literal["none", "sam", "avg_sam", "gaussian"] = "none"
    """C-SGD baselines: gradient at x + rho g/|g| (sam), x̄ + D-SGD deviations, x̄ + N(0, s I)."""
    rho: NonNegFloat = 0.05
    """perturb=sam: radius of the ascent step."""
    perturb_topology: TopologyName = "ring"
    """avg_sam, gaussian: graph of the D-SGD replicas run beside, whose deviations eps imitates."""
    perturb_xi2: NonNegFloat | None = None
    """perturb=gaussian: the fixed trace Xi^2 of eps ~ N(0, Xi^2/d I); null: the carried D-SGD's."""

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.perturb_xi2 is not None and self.perturb != "gaussian":
            raise Invalid("perturb_xi2", f"only perturb gaussian takes a fixed trace; "
                                          f"{self.perturb} draws from the carried D-SGD replicas "
                                          f"(got {shown(self.perturb_xi2)})")  # fmt: skip
        if self.warmup_steps and self.warmup_epochs:
            raise Invalid("warmup_steps", "give warmup_steps or warmup_epochs, not both")
        ms = self.milestones
        for k in range(1, len(ms)):
            if ms[k] <= ms[k - 1]:
                raise Invalid("milestones", f"must be strictly increasing (got {shown(list(ms))})")
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
    order: Literal["local_first", "gossip_first"] = "local_first"
    """local_first: mix after the local update (Kong); gossip_first: mix x^t, then apply g (Zhu)."""


@_section
class Phase:
    """One interval of epochs with its consensus target."""

    until_epoch: PosFloat | None = None
    """End of the phase in epochs; null = end of the run (only for the last phase)."""
    target: Target = "none"
    """Consensus control: none (1 round/step), constant, adaptive, exact (all-reduce)."""
    factor: PosFloat = 1.0
    """constant: multiplier of the reference in factor_unit; adaptive: of lr^2 EMA(|g|^2)."""
    factor_unit: Literal["distance", "squared"] | None = None
    """constant: factor multiplies Xi_max (Kong's unit; null means this) or squared: Xi^2_max."""
    reference: PosFloat | None = None
    """Target=constant: Xi^2_max, in the measure's squared unit (or give reference_run)."""
    reference_run: str | None = None
    """Target=constant: HDF5 file of an uncontrolled run; its max of the measure in this phase."""
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
                raise Invalid(
                    "reference",
                    f"target 'constant' needs exactly one of reference / reference_run "
                    f"(got {what})",
                )
        if self.factor_unit is not None and self.target != "constant":
            raise Invalid("factor_unit", f"only used by target 'constant', not {self.target!r} "
                                          f"(got {self.factor_unit!r})")  # fmt: skip
        if self.target != "constant" and given:
            raise Invalid(
                given[0],
                f"only used by target 'constant', not {self.target!r} "
                f"(got {shown(getattr(self, given[0]))})",
            )
        return self


@_section
class ConsensusConfig:
    """Consensus-distance control, phase by phase."""

    measure: Literal["estimate", "exact", "sketch"] = "estimate"
    """What targets are compared with: the round's movement e2, the distance Xi^2, or a sketch."""
    sketch_size: Annotated[int, Field(ge=64, le=2**31 - 1)] = 4096
    """Buckets k of the CountSketch of measure=sketch (relative error about sqrt(2/k))."""
    phases: tuple[Phase, ...] = (Phase(),)
    """Phases in order, each ended by its until_epoch; with none given, the lr decays."""

    @model_validator(mode="after")
    def _check(self) -> ConsensusConfig:
        ps = self.phases
        if not ps:
            raise Invalid("phases", "needs at least one phase (got [])")
        if all(p.until_epoch is None for p in ps):
            return self  # boundaries from the lr decays; the count is checked in Config
        for k, p in enumerate(ps[:-1]):
            if p.until_epoch is None:
                raise Invalid(
                    f"phases.{k}.until_epoch",
                    "only the last phase may end with the run (got null)",
                )
            if k and p.until_epoch <= ps[k - 1].until_epoch:  # type: ignore[operator]
                raise Invalid(
                    f"phases.{k}.until_epoch",
                    f"must be greater than phases.{k - 1}.until_epoch="
                    f"{shown(ps[k - 1].until_epoch)} (got {shown(p.until_epoch)})",
                )
        last = ps[-1].until_epoch
        if len(ps) > 1 and last is not None and last <= ps[-2].until_epoch:  # type: ignore[operator]
            raise Invalid(
                f"phases.{len(ps) - 1}.until_epoch",
                f"must be greater than phases.{len(ps) - 2}.until_epoch="
                f"{shown(ps[-2].until_epoch)} (got {shown(last)})",
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
    """Evaluate the averaged and local models every this many epochs (fractions allowed)."""
    eval_local: bool = True
    """Also score every local model and their ensemble (n test passes); false: x̄ only."""
    flush_every: PosInt = 50
    """Flush logged rows to the HDF5 file every this many steps."""
    bn: Literal["averaged", "recompute", "rank0"] = "averaged"
    """BatchNorm statistics of the averaged model: mean of the ranks', recomputed, or rank 0's."""
    bn_batches: NonNegInt = 10
    """bn=recompute: training batches per rank to re-estimate the statistics on."""
    sharpness_every: NonNegFloat = 0.0
    """Measure lambda_max and the Hessian trace of the averaged model every this many epochs."""
    sharpness_samples: PosInt = 1024
    """Training samples (fixed, seeded, split across ranks) the sharpness is measured on."""

    @model_validator(mode="after")
    def _check(self) -> MetricsConfig:
        if self.bn == "recompute" and self.bn_batches == 0:
            raise Invalid("bn_batches", "bn: recompute needs at least one batch (got 0)")
        return self


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
        if self.optim.perturb != "none" and self.topology.name != "complete":
            free = [k for k, p in enumerate(self.consensus.phases) if p.target != "exact"]
            if free:
                raise Invalid(
                    "optim.perturb",
                    f"{self.optim.perturb} is a C-SGD baseline: it needs topology complete or "
                    f"target exact in every phase (phase {free[0]} is decentralized)",
                )
        if self.model.pretrained and self.model.name != "resnet18":
            raise Invalid("model.pretrained", f"only resnet18 has pretrained weights "
                                               f"(model.name is {self.model.name})")  # fmt: skip
        # Phases are in absolute epochs; one that ends at or after the end of the
        # run would leave the phases after it unreachable. (A run given in steps has
        # its length in epochs only once the data set is loaded.)
        ps = self.consensus.phases
        epochs = self.run.epochs if self.run.steps is None else float("inf")
        if len(ps) > 1 and all(p.until_epoch is None for p in ps):
            want = len(self.optim.milestones) + 1
            if len(ps) != want:
                raise Invalid(
                    "consensus.phases",
                    f"without until_epoch, phases follow the lr decays: {want} phases for "
                    f"{len(self.optim.milestones)} milestones (got {len(ps)})",
                )
            return self
        for k, p in enumerate(ps[:-1]):
            if p.until_epoch is not None and p.until_epoch >= epochs:
                raise Invalid(
                    f"consensus.phases.{k}.until_epoch",
                    f"must be < run.epochs={shown(epochs)} since phases follow it "
                    f"(got {shown(p.until_epoch)})",
                )
        last = ps[-1].until_epoch
        if last is not None and last < epochs:
            raise Invalid(
                f"consensus.phases.{len(ps) - 1}.until_epoch",
                f"the last phase must reach run.epochs={shown(epochs)}; use null "
                f"(got {shown(last)})",
            )
        return self

"""Pure schedules: batch sizes, step -> learning rate, epoch -> consensus phase.

Time is measured in fractional epochs at step granularity, at the *end* of a
step: step ``s`` (0-based) with ``spe`` steps per epoch is at
``epoch = (s + 1) / spe`` (see :func:`step_epoch`). So the first step is never
at epoch 0 (warmup starts above zero), and the last step of an epoch sits
exactly on the epoch boundary. Boundaries (milestones, phase ends) belong to
the interval that ends there: a milestone counts as passed once the epoch
*exceeds* it, so the first step of the next epoch is the first at the decayed
rate and the first in the next phase.

No MPI, no torch: everything here is a function of the config and the world size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dsgd_mpi.config import Config

# Epochs are ratios of step counts; allow for rounding in milestone * epochs.
_EPS = 1e-9


def _past(epoch: float, boundary: float) -> bool:
    """``epoch > boundary``, ignoring float noise in the boundary."""
    return epoch > boundary + _EPS * max(1.0, abs(boundary))


def _check_world(world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")


def total_batch(cfg: Config, world_size: int) -> int:
    """Samples per step over all ranks: ``data.batch_size * world_size``."""
    _check_world(world_size)
    return cfg.data.batch_size * world_size


def peak_lr(cfg: Config, world_size: int) -> float:
    """The lr after warmup and before any decay.

    ``optim.lr * total_batch / optim.base_batch`` with ``optim.scale_lr``
    (linear scaling rule), else ``optim.lr``.
    """
    if cfg.optim.scale_lr:
        return cfg.optim.lr * total_batch(cfg, world_size) / cfg.optim.base_batch
    _check_world(world_size)
    return cfg.optim.lr


def run_epochs(cfg: Config, steps_per_epoch: int) -> float:
    """Length of the run in epochs: ``run.epochs``, or ``run.steps / steps_per_epoch``."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return cfg.run.steps / steps_per_epoch if cfg.run.steps else cfg.run.epochs


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Steps of the whole run: ``run.steps``, or ``ceil(run.epochs * steps_per_epoch)``, >= 1."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if cfg.run.steps:
        return cfg.run.steps
    return max(1, math.ceil(cfg.run.epochs * steps_per_epoch - _EPS))


def step_epoch(step: int, steps_per_epoch: int) -> float:
    """Fractional epoch at the end of 0-based ``step``: ``(step + 1) / steps_per_epoch``."""
    if step < 0 or steps_per_epoch < 1:
        raise ValueError(f"need step >= 0 and steps_per_epoch >= 1, got {step}, {steps_per_epoch}")
    return (step + 1) / steps_per_epoch


def milestone_epochs(cfg: Config, epochs: float | None = None) -> tuple[float, ...]:
    """Epochs at which the lr decays: ``optim.milestones`` times the run's length in epochs
    (``epochs``, default ``run.epochs``)."""
    length = cfg.run.epochs if epochs is None else epochs
    return tuple(m * length for m in cfg.optim.milestones)


def lr_at(
    cfg: Config, world_size: int, epoch: float, epochs: float | None = None,
    steps_per_epoch: int | None = None,
) -> float:  # fmt: skip
    """Learning rate of the step that ends at ``epoch`` (pass ``step_epoch(step, spe)``).

    ``peak_lr * (f + (1 - f) min(1, epoch / warmup))`` with ``f =
    optim.warmup_from`` (linear warmup; the last warmup step reaches the peak;
    ``warmup_steps`` counts in steps, hence ``steps_per_epoch``), times
    ``optim.decay`` for every milestone that ``epoch`` has passed. ``epochs``:
    the run's length (default ``run.epochs``).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    o = cfg.optim
    lr = peak_lr(cfg, world_size)
    warmup = o.warmup_epochs
    if o.warmup_steps:
        if not steps_per_epoch:
            raise ValueError("optim.warmup_steps needs steps_per_epoch")
        warmup = o.warmup_steps / steps_per_epoch
    if warmup > 0:
        lr *= o.warmup_from + (1.0 - o.warmup_from) * min(1.0, epoch / warmup)
    passed = sum(1 for b in milestone_epochs(cfg, epochs) if _past(epoch, b))
    return lr * o.decay**passed


@dataclass(frozen=True)
class Timeline:
    """Step -> epoch, lr and consensus phase for one run (its world size and epoch length)."""

    cfg: Config
    world_size: int
    steps_per_epoch: int

    @property
    def epochs(self) -> float:
        return run_epochs(self.cfg, self.steps_per_epoch)

    @property
    def total_steps(self) -> int:
        return total_steps(self.cfg, self.steps_per_epoch)

    @property
    def spans(self) -> tuple[PhaseSpan, ...]:
        return phases(self.cfg, self.epochs)

    def epoch(self, step: int) -> float:
        """Fractional epoch at the end of 0-based ``step``."""
        return step_epoch(step, self.steps_per_epoch)

    def lr(self, step: int) -> float:
        return lr_at(self.cfg, self.world_size, self.epoch(step), self.epochs,
                     self.steps_per_epoch)  # fmt: skip

    def phase(self, step: int) -> PhaseSpan:
        return phase_at(self.spans, self.epoch(step))


@dataclass(frozen=True)
class PhaseSpan:
    """One consensus phase resolved to epochs: ``(start_epoch, end_epoch]``."""

    index: int
    """0-based position in ``consensus.phases``."""
    start_epoch: float
    """Epoch at which the phase starts (0 for the first)."""
    end_epoch: float
    """Epoch at which the phase ends (``run.epochs`` for the last)."""
    target: str
    """none, constant, adaptive or exact."""
    factor: float
    """Multiplier of the target."""
    reference: float | None
    """Reference distance for target=constant, if given as a number."""
    reference_run: str | None
    """HDF5 file of an uncontrolled run for target=constant, if given."""
    max_rounds: int
    """Most gossip rounds per step."""
    ema: float
    """EMA coefficient for target=adaptive."""
    factor_unit: str = "distance"
    """What ``factor`` multiplies: ``distance`` (constant, by default: Xi_max, so the squared
    target is factor^2 x reference) or ``squared`` (constant on request, and adaptive)."""

    @property
    def scale(self) -> float:
        """What multiplies the squared reference: factor^2 for a distance factor, else factor."""
        return self.factor**2 if self.factor_unit == "distance" else self.factor


def phases(cfg: Config, epochs: float | None = None) -> tuple[PhaseSpan, ...]:
    """``consensus.phases`` as consecutive spans covering ``[0, epochs]`` (the run's length,
    default ``run.epochs``).

    Each phase starts where the previous one ends; the last ends with the run.
    """
    length = cfg.run.epochs if epochs is None else epochs
    spans = []
    start = 0.0
    ps = cfg.consensus.phases
    last = len(ps) - 1
    # No boundaries given at all: the phases are the intervals between lr decays.
    by_decay = last > 0 and all(p.until_epoch is None for p in ps)
    ends = list(milestone_epochs(cfg, length)) if by_decay else [p.until_epoch for p in ps]
    for k, p in enumerate(ps):
        end = length if k == last or ends[k] is None else ends[k]
        spans.append(
            PhaseSpan(
                index=k,
                start_epoch=start,
                end_epoch=float(end),
                target=p.target,
                factor=p.factor,
                factor_unit=p.factor_unit or ("distance" if p.target == "constant" else "squared"),
                reference=p.reference,
                reference_run=p.reference_run,
                max_rounds=p.max_rounds,
                ema=p.ema,
            )
        )
        start = float(end)
    return tuple(spans)


def phase_at(spans: Sequence[PhaseSpan], epoch: float) -> PhaseSpan:
    """The span holding the step that ends at ``epoch``.

    A step ending exactly on a boundary belongs to the phase that ends there;
    ``epoch`` 0 maps to the first span, and anything past the end (a last,
    partial step) to the last.
    """
    if not spans:
        raise ValueError("no phases")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    for span in spans:
        if not _past(epoch, span.end_epoch):
            return span
    return spans[-1]

"""Consensus: the gossip-until-target loop, its measures, and the exact distance.

estimate  e2  = (1/n) sum_i ||x_i' - x_i||^2   free from the mixing pass
exact     Xi2 = (1/n) sum_i ||x_i' - xbar||^2  xbar once per step (a full-vector
                                               reduction), the rest in the mixing pass
sketch    Xi2 ~ (1/n) sum_i ||S x_i' - S xbar||^2   S x_i' in the mixing pass, S xbar
                                               from the first round (k floats)
bound     Xi2 <= e2 / (1 - lambda_2)^2         fixed symmetric (normal) W only

Every round ends with one reduction of two numbers (the estimate and the
measure), whose result every replica shares bit for bit: the loop's exit is one
decision. A doubly stochastic round leaves xbar unchanged, so the exact and
sketched measures need xbar (or S xbar) only once per step.

Only parameters are measured: with ``gossip.buffers`` BatchNorm statistics are
mixed too, but they are the tail of each buffer (``Replicas.measured``) and
stay out of every distance.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from dsgd_mpi import mixing
from dsgd_mpi.group import Group, Mixer, mean_
from dsgd_mpi.replica import Buffers, Replicas
from dsgd_mpi.schedule import PhaseSpan
from dsgd_mpi.seeds import Stream, derive_seed
from dsgd_mpi.topology import Topology

MEASURES = ("estimate", "exact", "sketch")
#: Elements sketched at once by :meth:`Measure.remeasure` (its scratch buffer).
SKETCH_CHUNK = 1 << 20


@dataclass
class Communication:
    """What one step's communication did."""

    rounds: int = 0
    estimate: float = math.nan
    measured: float = math.nan
    """What the target was compared with (NaN where no target was: an exact average)."""
    target: float = math.nan
    bytes_sent: int = 0
    time_gossip: float = 0.0
    time_allreduce: float = 0.0
    exact_phase: bool = False
    """Averaged by Allreduce (C-SGD): the bound is moot."""
    distance: float = math.nan
    """Xi^2 of the replicas as this communication left them, when the measure computed it."""

    def then(self, later: Communication) -> Communication:
        """This step's communication followed by ``later``: costs add, the rest is later's."""
        return dataclasses.replace(
            later, rounds=self.rounds + later.rounds, bytes_sent=self.bytes_sent + later.bytes_sent,
            time_gossip=self.time_gossip + later.time_gossip,
            time_allreduce=self.time_allreduce + later.time_allreduce,
        )  # fmt: skip


def clock(device: torch.device) -> float:
    """``perf_counter`` once the device's queued work is done: GPU kernels run
    asynchronously, and a clock read without waiting charges them to whatever
    synchronizes next (the gossip's first wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Diverged(FloatingPointError):
    """The consensus estimate is not finite: the parameters blew up (same on every rank)."""


class Measure:
    """What a controlled phase compares with its target (``consensus.measure``)."""

    def __init__(
        self, name: str, group: Group, replicas: Replicas | Buffers, sketch_size: int = 4096,
        seed: int = 0,
    ) -> None:
        if name not in MEASURES:
            raise ValueError(f"unknown consensus measure {name!r}; one of {', '.join(MEASURES)}")
        self.name, self.group, self.replicas, self.seed = name, group, replicas, seed
        m, device = replicas.measured, replicas.flats[0].device
        self._xbar = torch.empty(m, device=device) if name == "exact" else None
        k = sketch_size if name == "sketch" else 0
        self._sketches = [
            torch.zeros(k, dtype=torch.float64, device=device) for _ in replicas.flats
        ]
        self._sbar = torch.zeros(k, dtype=torch.float64, device=device)
        self._args: list[dict] = [{} for _ in replicas.flats]
        self._fresh = False
        self._scratch: torch.Tensor | None = None

    def begin(self, step: int) -> None:
        """Once per communication step, after the local update: xbar, or a fresh sketch."""
        if self._xbar is not None:
            params = [f[: self.replicas.measured] for f in self.replicas.flats]
            mean_(self.group, params, self._xbar)
            self._args = [{"xbar": self._xbar} for _ in params]
        elif self.name == "sketch":
            # A new S every step: its errors are independent from step to step.
            seed = derive_seed(Stream.SKETCH, self.seed, step)
            self._args = [{"sketch": s, "seed": seed} for s in self._sketches]
            self._fresh = True

    def round_args(self) -> list[dict]:
        return self._args

    def reduce(self, rows: np.ndarray) -> tuple[float, float]:
        """(estimate, measured) over all replicas from this process's (estimate, share) rows."""
        if self.name == "sketch":
            if self._fresh:  # S xbar = the mean of the S x_i' of any round: one k-float reduction
                mean_(self.group, self._sketches, self._sbar)
                self._fresh = False
            rows = rows.copy()
            rows[:, 1] = [float(torch.sum((s - self._sbar) ** 2)) for s in self._sketches]
        sums = self.group.sum(rows) / self.group.size
        estimate = float(sums[0])
        return estimate, estimate if self.name == "estimate" else float(sums[1])

    def remeasure(self, step: int) -> float:
        """``sketch``: Xi^2 of the replicas as they are, through a second CountSketch drawn
        independently of the one the loop stopped on. The loop stops on the first value
        at or below the target, so that value is biased low; this one is not (one sketch
        pass over the parameters, a k-float and a scalar reduction)."""
        seed = derive_seed(Stream.SKETCH, self.seed, step, 1)
        m = self.replicas.measured
        if self._scratch is None:
            self._scratch = torch.empty(min(m, SKETCH_CHUNK), device=self._sbar.device)
        for s, flat in zip(self._sketches, self.replicas.flats, strict=True):
            s.zero_()
            for lo in range(0, m, SKETCH_CHUNK):  # x + 0: the kernel's sketch of x alone
                hi = min(m, lo + SKETCH_CHUNK)
                mixing.mix(flat[lo:hi], [], [], self._scratch[: hi - lo], sketch=(s, lo, seed))
        mean_(self.group, self._sketches, self._sbar)
        shares = [[float(torch.sum((s - self._sbar) ** 2))] for s in self._sketches]
        return float(self.group.sum(np.array(shares))[0]) / self.group.size


class Consensus:
    """Gossip and measurement for the replicas of this process.

    The topology's mixer is built at once; the all-reduce averager of ``exact``
    phases only when a phase first needs it (``complete`` is its own averager).
    """

    def __init__(
        self, group: Group, replicas: Replicas | Buffers, topology: Topology,
        measure: Measure | None = None,
    ) -> None:
        self.group, self.replicas, self.topology = group, replicas, topology
        self.measure = measure or Measure("estimate", group, replicas)
        self.n = group.size
        self.mixer: Mixer = group.mixer(topology, replicas.flats, replicas.measured)
        self._averager: Mixer | None = self.mixer if topology.is_allreduce else None
        self._mean: torch.Tensor | None = None  # allocated on first exact measurement
        lam = topology.lambda2()
        self._bound_factor = 1.0 / (1.0 - lam) ** 2 if lam is not None and lam < 1.0 else math.nan

    @property
    def averager(self) -> Mixer:
        if self._averager is None:
            complete = Topology("complete", self.n)
            self._averager = self.group.mixer(complete, self.replicas.flats,
                                              self.replicas.measured)  # fmt: skip
        return self._averager

    def averages(self, phase: PhaseSpan) -> bool:
        """Whether ``phase`` communicates by an exact average (C-SGD): an ``exact`` phase,
        or any phase on ``complete``."""
        return phase.target == "exact" or self.topology.is_allreduce

    def average(self, target: float = 0.0) -> Communication:
        """Every replica becomes x̄ (one Allreduce). The estimate is the round's movement;
        no target is compared, so ``measured`` is the estimate only under that measure."""
        device = self.replicas.flats[0].device
        t0 = clock(device)
        rows = self.averager.round()
        t1 = clock(device)
        estimate = float(self.group.sum(rows[:, :1])[0]) / self.n
        measured = estimate if self.measure.name == "estimate" else math.nan
        return Communication(
            rounds=1, estimate=estimate, measured=measured, target=target,
            bytes_sent=self.averager.bytes_last_round, time_gossip=t1 - t0,
            time_allreduce=clock(device) - t1, exact_phase=True,
        )  # fmt: skip

    def communicate(self, phase: PhaseSpan, target: float, step: int = 0,
                    record: bool = False) -> Communication:  # fmt: skip
        """Gossip until the measured distance meets ``target`` or the phase's rounds are spent.

        ``exact`` phases and ``complete`` average by Allreduce: one round is exact.
        ``record``: the step will be logged; a sketched ``measured`` is then taken again
        by an independent sketch (:meth:`Measure.remeasure`), not the one the loop tested.
        """
        if self.averages(phase):
            return self.average(target)
        out = Communication(target=target)
        max_rounds = 1 if phase.target == "none" else phase.max_rounds
        # An uncontrolled phase measures every step too: its largest value over every
        # step (consensus_measured_max) is what a later run's constant target reads.
        device = self.replicas.flats[0].device
        t0 = clock(device)
        self.measure.begin(step)
        out.time_allreduce += clock(device) - t0
        while True:
            t0 = clock(device)
            rows = self.mixer.round(self.measure.round_args())
            t1 = clock(device)
            out.estimate, out.measured = self.measure.reduce(rows)
            out.time_gossip += t1 - t0
            out.time_allreduce += clock(device) - t1
            out.rounds += 1
            out.bytes_sent += self.mixer.bytes_last_round
            if not (math.isfinite(out.estimate) and math.isfinite(out.measured)):
                raise Diverged(f"consensus estimate {out.estimate}, {self.measure.name} "
                               f"{out.measured}")  # fmt: skip
            if out.rounds >= max_rounds or out.measured <= target:
                break
        if self.measure.name == "exact":
            out.distance = out.measured  # of the replicas as the last round left them
        elif self.measure.name == "sketch" and record:
            t0 = clock(device)
            out.measured = self.measure.remeasure(step)
            out.time_allreduce += clock(device) - t0
        return out

    def exact_distance(self) -> float:
        """Xi^2 over all replicas' parameters (a full-vector reduction; collective)."""
        m = self.replicas.measured
        params = [f[:m] for f in self.replicas.flats]
        if self._mean is None:
            self._mean = torch.empty_like(params[0])
        xbar = mean_(self.group, params, self._mean)
        local = [[float(torch.linalg.vector_norm(p - xbar, dtype=torch.float64) ** 2)]
                 for p in params]  # fmt: skip
        return float(self.group.sum(np.array(local))[0]) / self.n

    def bound(self, estimate: float) -> float:
        """Upper bound on the exact distance from an estimate; NaN when not certified."""
        return estimate * self._bound_factor

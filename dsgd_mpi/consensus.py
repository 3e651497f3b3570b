"""Consensus: the gossip-until-target loop, its measures, and the exact distance.

estimate  e2  = (1/n) sum_i ||x_i' - x_i||^2   one scalar reduction per round
exact     Xi2 = (1/n) sum_i ||x_i - xbar||^2   a full-vector reduction
bound     Xi2 <= e2 / (1 - lambda_2)^2         fixed symmetric (normal) W only

Only parameters are measured: with ``gossip.buffers`` BatchNorm statistics are
mixed too, but they are the tail of each buffer (``Replicas.measured``) and
stay out of every distance.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from dsgd_mpi.group import Group, Mixer, mean_
from dsgd_mpi.replica import Replicas
from dsgd_mpi.schedule import PhaseSpan
from dsgd_mpi.topology import Topology


@dataclass
class Communication:
    """What one step's communication did."""

    rounds: int = 0
    estimate: float = math.nan
    measured: float = math.nan
    target: float = math.nan
    bytes_sent: int = 0
    time_gossip: float = 0.0
    time_allreduce: float = 0.0
    exact_phase: bool = False
    """Averaged by Allreduce (C-SGD): the distance after it is 0 and the bound is moot."""


class Diverged(FloatingPointError):
    """The consensus estimate is not finite: the parameters blew up (same on every rank)."""


class Consensus:
    """Gossip and measurement for the replicas of this process.

    The topology's mixer is built at once; the all-reduce averager of ``exact``
    phases only when a phase first needs it (``complete`` is its own averager).
    """

    def __init__(self, group: Group, replicas: Replicas, topology: Topology) -> None:
        self.group, self.replicas, self.topology = group, replicas, topology
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

    def communicate(self, phase: PhaseSpan, target: float) -> Communication:
        """Gossip until the measured distance meets ``target`` or the phase's rounds are spent.

        ``exact`` phases and ``complete`` average by Allreduce: one round is exact.
        """
        exact = phase.target == "exact" or self.topology.is_allreduce
        mixer = self.averager if exact else self.mixer
        max_rounds = 1 if exact or phase.target == "none" else phase.max_rounds
        out = Communication(target=target, exact_phase=exact)
        while True:
            t0 = time.perf_counter()
            rows = mixer.round()
            t1 = time.perf_counter()
            sums = self.group.sum(rows) / self.n
            out.time_gossip += t1 - t0
            out.time_allreduce += time.perf_counter() - t1
            out.rounds += 1
            out.bytes_sent += mixer.bytes_last_round
            out.estimate = float(sums[0])
            out.measured = 0.0 if exact else float(sums[1])
            if not math.isfinite(out.estimate):  # every replica sees the same value
                raise Diverged(f"consensus estimate {out.estimate}")
            if out.rounds >= max_rounds or out.measured <= target:
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

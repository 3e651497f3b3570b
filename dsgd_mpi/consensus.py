"""Consensus distance: the cheap estimate and the exact (diagnostic) value.

estimate  e2  = (1/n) sum_i ||x_i' - x_i||^2   one scalar Allreduce per round
exact     Xi2 = (1/n) sum_i ||x_i - xbar||^2   a full-vector Allreduce
bound     Xi2 <= e2 / (1 - lambda_2)^2         fixed symmetric (normal) W only
"""

from __future__ import annotations

import math

import torch

from dsgd_mpi import comm as mpi
from dsgd_mpi.gossip import Gossiper


class Consensus:
    """Measures consensus on one flat buffer; owns the reduction buffers."""

    def __init__(self, comm: mpi.Comm, gossiper: Gossiper) -> None:
        self.comm = comm
        self.gossiper = gossiper
        self.n = comm.Get_size()
        self.scalar = mpi.ScalarReducer(comm)
        self._mean: torch.Tensor | None = None  # allocated on first exact measurement
        lam = gossiper.topology.lambda2()
        self._bound_factor = 1.0 / (1.0 - lam) ** 2 if lam is not None and lam < 1.0 else math.nan

    def gossip_round(self) -> float:
        """One gossip round; returns the estimate e2 (the same on every rank)."""
        return self.scalar.sum(self.gossiper.round()) / self.n

    def bound(self, estimate: float) -> float:
        """Upper bound on the exact distance from an estimate; NaN when not certified."""
        return estimate * self._bound_factor

    def exact(self) -> float:
        """Xi^2 over all ranks (collective: every rank must call it)."""
        x = self.gossiper.flat
        if self._mean is None:
            self._mean = torch.empty_like(x)
        mpi.allreduce_sum(self.comm, x, self._mean)
        self._mean.div_(self.n).sub_(x)
        return self.scalar.sum(float(torch.dot(self._mean, self._mean))) / self.n

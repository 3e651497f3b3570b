"""Where C-SGD baselines that imitate D-SGD take their gradient (``optim.perturb``).

Zhu et al. (2023) show D-SGD is asymptotically C-SGD on the average-direction
SAM objective: each gradient at x̄ + eps, eps with the covariance of the D-SGD
replicas' deviations {y_j - ȳ} at that step, (1/n) sum_j (y_j - ȳ)(y_j - ȳ)^T.
That covariance lives in the few directions where the replicas actually differ.
To have it step by step, a run with ``avg_sam`` carries a D-SGD run beside its
C-SGD model: replicas y on ``optim.perturb_topology`` from the same initial
model, on the same batches, with the same optimizer and schedule, one gossip
round a step in ``gossip.order`` (:class:`Shadow`).

avg_sam   eps_i = (1/sqrt(n)) sum_j z_ij (y_j - ȳ), z_ij ~ N(0, 1) from (seed,
          step): Gaussian, with exactly the deviations' covariance (trace Xi^2(y)).
          Since sum_j (y_j - ȳ) = 0, sum_j z_ij (y_j - ȳ) = sum_j (z_ij - z̄_i) y_j:
          every replica gets its own combination of the y_j from one
          reduce-scatter (:meth:`Group.combine_`), no mean needed.
gaussian  eps_i ~ N(0, Xi^2/d I), isotropic smoothing of the same trace: Xi^2 of
          the carried replicas at that step, or a fixed ``optim.perturb_xi2``
          (then nothing is carried). Not average-direction SAM: its penalty is
          spread over all d directions.

Costs per step, beside C-SGD's: avg_sam a second model, optimizer and gradient
(the D-SGD replicas), their gossip round, and a reduce-scatter of n x d values
(n times an Allreduce's bytes); gaussian with the carried replicas the same
minus the reduce-scatter, plus one full-vector Allreduce (ȳ for Xi^2); gaussian
with a fixed trace nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from dsgd_mpi.config import Config
from dsgd_mpi.consensus import Consensus
from dsgd_mpi.group import Group
from dsgd_mpi.replica import Replicas
from dsgd_mpi.schedule import PhaseSpan
from dsgd_mpi.seeds import Stream, generator
from dsgd_mpi.topology import Topology

#: The carried D-SGD run communicates one round a step, whatever the C-SGD run's phases.
ONE_ROUND = PhaseSpan(0, 0.0, math.inf, "none", 1.0, None, None, 1, 0.9)


def carries_dsgd(cfg: Config) -> bool:
    """Whether ``optim.perturb`` needs D-SGD replicas beside the C-SGD model."""
    o = cfg.optim
    return o.perturb == "avg_sam" or (o.perturb == "gaussian" and o.perturb_xi2 is None)


class Shadow:
    """The D-SGD run carried beside: its replicas, their gossip, their step."""

    def __init__(self, cfg: Config, group: Group, replicas: Replicas) -> None:
        self.group, self.replicas, self.order = group, replicas, cfg.gossip.order
        topology = Topology(cfg.optim.perturb_topology, group.size, seed=cfg.topology.seed)
        self.consensus = Consensus(group, replicas, topology)

    def params(self) -> list[torch.Tensor]:
        return [f[: self.replicas.measured] for f in self.replicas.flats]

    def step(self, step: int, lr: float) -> None:
        """D-SGD's own step: gradient at y^t, one gossip round, the update."""
        self.replicas.gradients(step)
        if self.order == "gossip_first":
            self.consensus.communicate(ONE_ROUND, math.inf, step)
        self.replicas.apply(lr)
        if self.order != "gossip_first":
            self.consensus.communicate(ONE_ROUND, math.inf, step)


class Perturbation:
    """No perturbation (plain C-SGD or D-SGD, and SAM, which the replica does itself)."""

    shadow: Shadow | None = None

    def start(self, step: int) -> None:
        if self.shadow is not None:
            self.shadow.replicas.start(step)

    def draw(self, step: int) -> list[torch.Tensor] | None:
        """eps of every replica here at ``step`` (None: the gradient is taken at x)."""
        return None

    def step(self, step: int, lr: float) -> None:
        if self.shadow is not None:
            self.shadow.step(step, lr)


class AverageDirection(Perturbation):
    """Zhu et al.'s average-direction SAM: eps_i = (1/sqrt(n)) sum_j z_ij (y_j - ȳ)."""

    def __init__(self, shadow: Shadow, seed: int) -> None:
        self.shadow, self.seed = shadow, seed
        self._eps = [torch.empty_like(p) for p in shadow.params()]

    def coefficients(self, step: int) -> np.ndarray:
        """(z_ij - z̄_i) / sqrt(n): the same n x n matrix on every process."""
        n = self.shadow.group.size
        z = torch.randn(n, n, generator=generator(Stream.AVERAGE_DIRECTION, self.seed, step),
                        dtype=torch.float64).numpy()  # fmt: skip
        return (z - z.mean(axis=1, keepdims=True)) / math.sqrt(n)

    def draw(self, step: int) -> list[torch.Tensor]:
        self.shadow.group.combine_(self.coefficients(step), self.shadow.params(), self._eps)
        return self._eps


class Isotropic(Perturbation):
    """Gaussian smoothing: eps_i ~ N(0, Xi^2/d I), Xi^2 fixed or the carried run's."""

    def __init__(self, ranks: Sequence[int], dim: int, device: torch.device, seed: int,
                 xi2: float | None, shadow: Shadow | None) -> None:  # fmt: skip
        self.ranks, self.dim, self.device, self.seed = tuple(ranks), dim, device, seed
        self.xi2, self.shadow = xi2, shadow

    def draw(self, step: int) -> list[torch.Tensor]:
        xi2 = self.xi2 if self.shadow is None else self.shadow.consensus.exact_distance()
        scale = math.sqrt(max(xi2, 0.0) / self.dim)
        return [
            torch.randn(self.dim, device=self.device, generator=generator(
                Stream.PERTURB, self.seed, rank, step, device=self.device)).mul_(scale)
            for rank in self.ranks
        ]  # fmt: skip


def build(cfg: Config, replicas: Replicas, shadow: Shadow | None) -> Perturbation:
    """The perturbation of ``optim.perturb`` for these replicas (``shadow``: the carried
    D-SGD run, when :func:`carries_dsgd`)."""
    o = cfg.optim
    if o.perturb == "avg_sam":
        assert shadow is not None
        return AverageDirection(shadow, cfg.run.seed)
    if o.perturb == "gaussian":
        device = replicas.flats[0].device
        return Isotropic(replicas.ranks, replicas.measured, device, cfg.run.seed,
                         o.perturb_xi2, shadow)  # fmt: skip
    return Perturbation()

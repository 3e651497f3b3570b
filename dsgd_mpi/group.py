"""The replicas of a run and the collectives between them.

A training step needs three things from "the other replicas": reductions of a
few numbers (losses, estimates, flags), reductions of whole tensors (the
averaged model, ensemble probabilities, Hessian-vector products), and gossip.
:class:`Group` names them once, so that the training loop, the consensus
measures and the evaluation are written one time for both backends:

- :class:`dsgd_mpi.ranks.MpiGroup`: one replica per MPI rank;
- :class:`dsgd_mpi.sim.group.SimGroup`: every replica of the run in one process.

Pure: this module only names the interface (no MPI), so the simulator never
initializes MPI.

Each method takes one entry per replica held by this process (``ranks``) and
returns the same result on every process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from dsgd_mpi.topology import Topology


class Mixer(Protocol):
    """Gossip rounds over the buffers of this process's replicas."""

    t: int
    """The global round counter (time-varying topologies read it; checkpointed)."""
    bytes_last_round: int
    """Bytes one replica sent in the last round."""

    def round(self, measures: Sequence[dict] | None = None) -> np.ndarray:
        """One round in place; (replicas here, 2): each one's ``||x' - x||^2`` and measure share.

        ``measures``: per replica here, the keyword arguments of
        :meth:`~dsgd_mpi.gossip.Gossiper.round` (``xbar``, ``sketch``, ``seed``)."""
        ...

    def close(self) -> None: ...


class Group(Protocol):
    size: int
    """Replicas in the run (the world size)."""
    ranks: tuple[int, ...]
    """Global indices of the replicas held by this process."""
    root: bool
    """Whether this process writes the run's files and prints its progress."""

    def sum(self, rows: np.ndarray) -> np.ndarray:
        """Rows (r, k) of this process's values -> (k,) the sum of every row of every
        process, bit-identical everywhere (control flow depends on it)."""
        ...

    def max(self, rows: np.ndarray) -> np.ndarray: ...

    def sum_(
        self, parts: Sequence[torch.Tensor], out: torch.Tensor, identical: bool = False
    ) -> torch.Tensor:
        """``out`` = the elementwise sum over all replicas of their ``parts``; ``identical``:
        the same bytes on every process (when control flow depends on them)."""
        ...

    def first_(self, parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """``out`` = replica 0's part, on every process."""
        ...

    def combine_(
        self, coeffs: np.ndarray, parts: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]
    ) -> None:
        """Each replica i here gets ``outs[k] = sum_j coeffs[i, j] part_j`` over every
        replica j of the run: n different combinations (``coeffs`` n x n, the same on
        every process), at the cost of n vectors' traffic per replica, not n^2."""
        ...

    def mixer(self, topology: Topology, flats: Sequence[torch.Tensor], measured: int) -> Mixer: ...

    def barrier(self) -> None: ...


def mean_(group: Group, parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``out`` = the average over all replicas of their ``parts``."""
    return group.sum_(parts, out).div_(group.size)

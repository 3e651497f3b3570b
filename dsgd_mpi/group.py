"""The replicas of a run and the collectives between them.

A training step needs three things from "the other replicas": reductions of a
few numbers (losses, estimates, flags), reductions of whole tensors (the
averaged model, ensemble probabilities, Hessian-vector products), and gossip.
:class:`Group` names them once, so that the training loop, the consensus
measures and the evaluation are written one time for both backends:

- :class:`MpiGroup`: one replica per MPI rank (this module, through ``comm``);
- ``dsgd_mpi.sim``: every replica of the run in one process.

Each method takes one entry per replica held by this process (``ranks``) and
returns the same result on every process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from dsgd_mpi import comm as mpi
from dsgd_mpi.gossip import DEFAULT_CHUNK, Gossiper
from dsgd_mpi.topology import Topology


class Mixer(Protocol):
    """Gossip rounds over the buffers of this process's replicas."""

    t: int
    """The global round counter (time-varying topologies read it; checkpointed)."""
    bytes_last_round: int
    """Bytes one replica sent in the last round."""

    def round(self) -> np.ndarray:
        """One round in place; (replicas here, 2): each one's ``||x' - x||^2`` and measure share."""
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

    def sum_(self, parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """``out`` = the elementwise sum over all replicas of their ``parts``."""
        ...

    def first_(self, parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """``out`` = replica 0's part, on every process."""
        ...

    def mixer(self, topology: Topology, flats: Sequence[torch.Tensor], measured: int) -> Mixer: ...

    def barrier(self) -> None: ...


def mean_(group: Group, parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``out`` = the average over all replicas of their ``parts``."""
    return group.sum_(parts, out).div_(group.size)


class MpiGroup:
    """One replica per rank: reductions and gossip over an MPI communicator."""

    def __init__(self, comm: mpi.Comm, port: mpi.TensorPort, chunk: int = DEFAULT_CHUNK) -> None:
        self.comm, self.port, self.chunk = comm, port, chunk
        self.size = comm.Get_size()
        self.ranks = (comm.Get_rank(),)
        self.root = comm.Get_rank() == 0
        self._reducer = mpi.Reducer(comm)

    def sum(self, rows: np.ndarray) -> np.ndarray:
        return self._reducer.sum(np.atleast_2d(np.asarray(rows, dtype=np.float64)).sum(axis=0))

    def max(self, rows: np.ndarray) -> np.ndarray:
        return self._reducer.max(np.atleast_2d(np.asarray(rows, dtype=np.float64)).max(axis=0))

    def sum_(self, parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        (part,) = parts
        if part.data_ptr() != out.data_ptr():
            out.copy_(part)
        return self.port.allreduce_(self.comm, out)

    def first_(self, parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        (part,) = parts
        if part.data_ptr() != out.data_ptr():
            out.copy_(part)
        return self.port.bcast_(self.comm, out, root=0)

    def mixer(self, topology: Topology, flats: Sequence[torch.Tensor], measured: int) -> Mixer:
        (flat,) = flats
        return _OneGossiper(
            Gossiper(self.comm, topology, flat, port=self.port, measured=measured,
                     chunk=self.chunk)  # fmt: skip
        )

    def barrier(self) -> None:
        self.comm.Barrier()


class _OneGossiper:
    """The :class:`Mixer` of one rank: its Gossiper, with rows of one."""

    def __init__(self, gossiper: Gossiper) -> None:
        self.gossiper = gossiper

    @property
    def t(self) -> int:
        return self.gossiper.t

    @t.setter
    def t(self, value: int) -> None:
        self.gossiper.t = value

    @property
    def bytes_last_round(self) -> int:
        return self.gossiper.bytes_last_round

    def round(self) -> np.ndarray:
        return np.array([self.gossiper.round()], dtype=np.float64)

    def close(self) -> None:
        self.gossiper.close()

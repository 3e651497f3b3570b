"""One replica per MPI rank: the :class:`~dsgd_mpi.group.Group` of ``dsgd_mpi.run``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dsgd_mpi import comm as mpi
from dsgd_mpi.gossip import Gossiper
from dsgd_mpi.group import Mixer
from dsgd_mpi.mixing import DEFAULT_CHUNK
from dsgd_mpi.topology import Topology


class MpiGroup:
    """One replica per rank: reductions and gossip over an MPI communicator."""

    def __init__(self, comm: mpi.Comm, port: mpi.TensorPort, chunk: int = DEFAULT_CHUNK) -> None:
        self.comm, self.port, self.chunk = comm, port, chunk
        self.size = comm.Get_size()
        self.ranks = (comm.Get_rank(),)
        self.root = comm.Get_rank() == 0
        self._reducer = mpi.Reducer(comm)
        self._rows: torch.Tensor | None = None  # combine_'s send buffer, allocated once

    def sum(self, rows: np.ndarray) -> np.ndarray:
        return self._reducer.sum(np.atleast_2d(np.asarray(rows, dtype=np.float64)).sum(axis=0))

    def max(self, rows: np.ndarray) -> np.ndarray:
        return self._reducer.max(np.atleast_2d(np.asarray(rows, dtype=np.float64)).max(axis=0))

    def sum_(
        self, parts: Sequence[torch.Tensor], out: torch.Tensor, identical: bool = False
    ) -> torch.Tensor:
        (part,) = parts
        if part.data_ptr() != out.data_ptr():
            out.copy_(part)
        return self.port.allreduce_(self.comm, out, identical=identical)

    def first_(self, parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        (part,) = parts
        if part.data_ptr() != out.data_ptr():
            out.copy_(part)
        return self.port.bcast_(self.comm, out, root=0)

    def combine_(
        self, coeffs: np.ndarray, parts: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]
    ) -> None:
        """Reduce-scatter in chunks: row i of this rank's (n, chunk) buffer is
        coeffs[i, me] times its part, and rank i receives the sum of every rank's row i."""
        ((part,), (out,)), me = (parts, outs), self.ranks[0]
        width = max(1, self.chunk // self.size)
        if self._rows is None or self._rows.numel() < self.size * width:
            self._rows = torch.empty(self.size * width, dtype=part.dtype, device=part.device)
        column = torch.as_tensor(coeffs[:, me], dtype=part.dtype, device=part.device)
        for lo in range(0, part.numel(), width):
            hi = min(part.numel(), lo + width)
            rows = self._rows[: self.size * (hi - lo)].view(self.size, hi - lo)
            torch.outer(column, part[lo:hi], out=rows)
            self.port.reduce_scatter_(self.comm, rows, out[lo:hi])

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

    def round(self, measures: Sequence[dict] | None = None) -> np.ndarray:
        args = measures[0] if measures else {}
        return np.array([self.gossiper.round(**args)], dtype=np.float64)

    def close(self) -> None:
        self.gossiper.close()

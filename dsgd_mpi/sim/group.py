"""The collectives of a run whose replicas all live in this process.

Sums are taken in replica order; gossip runs the MPI Gossiper's own round
(:mod:`dsgd_mpi.rounds`: the same plan, chunks and kernel) for every replica,
from the values the neighbours held before the round (what MPI would have
delivered), copied into receive buffers allocated as the Gossiper allocates
its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dsgd_mpi import rounds
from dsgd_mpi.flat import allocate
from dsgd_mpi.mixing import DEFAULT_CHUNK, chunk_bounds
from dsgd_mpi.topology import Topology


class SimGroup:
    """Every replica of the run, here: reductions are sums over a list."""

    def __init__(
        self, size: int, chunk: int = DEFAULT_CHUNK, stack: torch.Tensor | None = None
    ) -> None:
        """``stack``: the fast mode's N x d buffer, whose rows are the replicas' buffers:
        gossip then runs on the whole stack at once."""
        self.size, self.chunk, self.stack = size, chunk, stack
        self.ranks = tuple(range(size))
        self.root = True

    def sum(self, rows: np.ndarray) -> np.ndarray:
        # Row by row in replica order: the order MPI ranks sum their gathered values in.
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        total = rows[0].copy()
        for row in rows[1:]:
            total += row
        return total

    def max(self, rows: np.ndarray) -> np.ndarray:
        return np.atleast_2d(np.asarray(rows, dtype=np.float64)).max(axis=0)

    def sum_(
        self, parts: Sequence[torch.Tensor], out: torch.Tensor, identical: bool = False
    ) -> torch.Tensor:
        first = parts[0]
        if first.data_ptr() != out.data_ptr():
            out.copy_(first)
        for part in parts[1:]:
            out.add_(part)
        return out

    def first_(self, parts: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        if parts[0].data_ptr() != out.data_ptr():
            out.copy_(parts[0])
        return out

    def combine_(
        self, coeffs: np.ndarray, parts: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]
    ) -> None:
        stacked = torch.stack(list(parts))
        c = torch.as_tensor(coeffs, dtype=stacked.dtype, device=stacked.device)
        for i, out in zip(self.ranks, outs, strict=True):
            torch.mv(stacked.t(), c[i], out=out)

    def mixer(self, topology: Topology, flats: Sequence[torch.Tensor], measured: int):
        if self.stack is not None:
            from dsgd_mpi.sim.fast import StackMixer

            return StackMixer(topology, self.stack, measured)
        return SimMixer(topology, flats, measured, self.chunk)

    def barrier(self) -> None:
        pass


class SimMixer:
    """Gossip rounds over all replicas, each mixed exactly as its MPI rank mixes itself."""

    def __init__(
        self, topology: Topology, flats: Sequence[torch.Tensor], measured: int, chunk: int
    ) -> None:  # fmt: skip
        if topology.n != len(flats):
            raise ValueError(f"topology is for n={topology.n} but there are {len(flats)} replicas")
        self.topology, self.flats, self.measured = topology, list(flats), measured
        self.t = 0
        self.bytes_last_round = 0
        numel = self.flats[0].numel()
        self.chunks = chunk_bounds(numel, measured, chunk)
        width = max(hi - lo for lo, hi, _ in self.chunks)
        device = self.flats[0].device
        self._host = device.type == "cpu"
        self._recv = [allocate(width, device) for _ in range(max(1, topology.max_exchanges))]
        self._scratch = allocate(width, device)
        self._before = [allocate(numel, device) for _ in self.flats]  # what neighbours send

    def close(self) -> None:
        pass

    def round(self, measures: Sequence[dict] | None = None) -> np.ndarray:
        t, self.t = self.t, self.t + 1
        n = self.topology.n
        rows = np.zeros((n, 2))
        if n == 1:
            self.bytes_last_round = 0
            return rows
        if self.topology.is_allreduce:
            return self._average()
        for before, x in zip(self._before, self.flats, strict=True):
            before.copy_(x)
        sent = 0
        for i, x in enumerate(self.flats):
            plan = rounds.plan(self.topology, i, t, x.numel())
            sent = max(sent, plan.bytes_sent)

            def fetch(c: int, lo: int, hi: int, plan=plan) -> list[torch.Tensor]:
                # what MPI would have put in receive buffer k: the peer's chunk before the round
                return [self._recv[k][: hi - lo].copy_(self._before[e.recv_from][lo:hi])
                        for k, e in enumerate(plan.exchanges)]  # fmt: skip

            measure = dict(measures[i]) if measures else {}
            rows[i] = rounds.mix_chunks(x, self.chunks, plan.weights, self._scratch, fetch,
                                        measure)  # fmt: skip
        self.bytes_last_round = sent
        return rows

    def _average(self) -> np.ndarray:
        """``complete``: every replica becomes the average (summed in replica order)."""
        n, m = self.topology.n, self.measured
        avg = self._before[0].copy_(self.flats[0])
        for x in self.flats[1:]:
            avg.add_(x)
        avg.mul_(1.0 / n)
        rows = np.zeros((n, 2))
        for i, x in enumerate(self.flats):
            d = avg[:m] - x[:m]
            rows[i, 0] = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
            x.copy_(avg)
        self.bytes_last_round = 4 * self.flats[0].numel()
        return rows

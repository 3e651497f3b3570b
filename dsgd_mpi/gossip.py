"""Gossip: mix one contiguous float32 buffer with the neighbours of a topology.

Three roles stay apart (as in SGP): *who* the peers are and *with what weights*
come from :class:`~dsgd_mpi.topology.Topology` (pure, testable without MPI);
*moving the bytes* is this module, through the helpers of :mod:`dsgd_mpi.comm`.

One round computes ``x_i' = w_ii x_i + sum_j w_ij x_j`` in place and returns
the local ``||x_i' - x_i||^2`` so that the consensus estimate costs one scalar
Allreduce. Because the weights of a row sum to one,
``x_i' - x_i = sum_j w_ij (x_j - x_i)``: only the difference is accumulated.

CPU path: the buffer is exchanged and mixed chunk by chunk. For each chunk the
receives and sends of every peer are posted together, and the chunk is mixed
as soon as they complete, while the received pieces are still in cache: on a
memory-bound machine this saves a trip to memory per peer, so a round costs
little more than the exchange alone. The requests are persistent (set up once
per exchange pattern and restarted every round), so a round spends no Python
or MPI matching work per message beyond a start and a wait. Every rank walks
the same chunks in the same order and each chunk's requests are all posted
before any wait, so no ordering of ranks can deadlock.

Device path: with a CUDA-aware MPI the device buffer goes to MPI directly (after
synchronizing the stream, since MPI does not know torch's streams); otherwise it
is staged through pinned host memory and mixed there.
"""

from __future__ import annotations

import weakref
from typing import Literal

import numpy as np
import torch

from dsgd_mpi import comm as mpi
from dsgd_mpi import mixing
from dsgd_mpi.flat import allocate
from dsgd_mpi.topology import Exchange, Topology

DeviceBuffers = Literal["auto", "on", "off"]

#: 256 Ki floats (1 MiB per buffer). Measured on a 2-core EPYC (512 KiB L2 per
#: core, 32 MiB L3), 4 ranks, ring, 11M floats: 64 Ki pieces were ~15 % slower
#: than 256 Ki, 8-16 Ki pieces 2-3x slower (per-message cost); 256 Ki pieces
#: still fit the shared L3 beside the peers' pieces.
DEFAULT_CHUNK = 1 << 18


class _Plan:
    """Persistent requests and buffer views for one pattern of exchanges.

    Time-varying topologies cycle through few patterns (log2 n for the
    exponential graphs, at most n - 1 partners for a matching), so each is set
    up once and kept.
    """

    def __init__(self, comm, x: np.ndarray, recv, scratch, exchanges, chunk: int) -> None:
        self.weights = [e.weight for e in exchanges]
        self.chunks = []
        for start in range(0, x.size, chunk):
            xc = x[start : start + chunk]
            m = xc.size
            received = [r[:m] for r in recv[: len(exchanges)]]
            requests = []
            for k, (e, r) in enumerate(zip(exchanges, received, strict=True)):
                requests += mpi.persistent_exchange(comm, xc, e.send_to, r, e.recv_from, tag=k)
            self.chunks.append((xc, received, scratch[:m], requests))

    def run(self, mix: bool = True) -> float:
        """Exchange (and mix) every chunk; returns the local ``||x' - x||^2``."""
        total = 0.0
        for x, received, scratch, requests in self.chunks:
            mpi.start_all(requests)
            mpi.wait_all(requests)
            if mix:
                total += mixing.mix_numpy(x, received, self.weights, scratch)[0]
        return total

    def requests(self) -> list:
        return [r for *_, requests in self.chunks for r in requests]


def _free_plans(plans: dict) -> None:
    for plan in plans.values():
        mpi.free_all(plan.requests())
    plans.clear()


class Gossiper:
    """Mixes ``flat`` in place with one gossip round per call of :meth:`round`.

    ``t`` is the global round counter that time-varying topologies read; it
    advances by one per round (including repeated rounds of consensus control)
    and is saved in checkpoints.
    """

    def __init__(
        self,
        comm: mpi.Comm,
        topology: Topology,
        flat: torch.Tensor,
        *,
        device_buffers: DeviceBuffers = "auto",
        chunk: int = DEFAULT_CHUNK,
        t: int = 0,
    ) -> None:
        if flat.dtype != torch.float32 or flat.dim() != 1 or not flat.is_contiguous():
            raise ValueError("gossip needs one contiguous 1-D float32 buffer")
        if topology.n != comm.Get_size():
            raise ValueError(
                f"topology is for n={topology.n} but the job has {comm.Get_size()} ranks"
            )
        self.comm = comm
        self.topology = topology
        self.rank = comm.Get_rank()
        self.flat = flat
        self.t = t
        # Equal pieces: a 270k buffer in 256k chunks would otherwise pay a whole
        # extra round trip for an 8k tail.
        pieces = -(-flat.numel() // max(1, chunk))
        self.chunk = -(-flat.numel() // pieces)
        on_device = flat.device.type != "cpu"
        self.direct = on_device and (
            device_buffers == "on" or (device_buffers == "auto" and mpi.cuda_aware())
        )
        # The buffer MPI reads and writes: the device buffer itself, or a pinned
        # host copy when MPI cannot touch device memory.
        if on_device and not self.direct:
            self.host = torch.empty(flat.numel(), dtype=torch.float32, pin_memory=True)
        else:
            self.host = flat
        peers = 1 if topology.is_allreduce else max(1, topology.degree)
        size = flat.numel() if self.direct else self.chunk
        device = self.host.device
        self._recv = [allocate(size, device) for _ in range(peers)]
        self._diff = allocate(size, device)
        self._plans: dict[tuple, _Plan] = {}
        # Persistent requests must be freed before MPI_Finalize; close() does it
        # early, this does it at garbage collection or interpreter exit.
        self._finalizer = weakref.finalize(self, _free_plans, self._plans)
        self.bytes_last_round = 0

    def close(self) -> None:
        """Release the persistent MPI requests (also done at exit)."""
        self._finalizer()

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def round(self) -> float:
        """One gossip round in place; returns this rank's ``||x' - x||^2``."""
        t, self.t = self.t, self.t + 1
        if self.topology.n == 1:
            self.bytes_last_round = 0
            return 0.0
        if self.direct:
            torch.cuda.current_stream(self.flat.device).synchronize()
            return self._mix_whole(t)
        if self.host is not self.flat:
            torch.cuda.current_stream(self.flat.device).synchronize()
            self.host.copy_(self.flat)
        local = self._mix_chunked(t)
        if self.host is not self.flat:
            self.flat.copy_(self.host, non_blocking=False)
        return local

    def _mix_chunked(self, t: int) -> float:
        x_all, n = self.host, self.host.numel()
        if self.topology.is_allreduce:
            scale = 1.0 / self.topology.n
            total = 0.0
            for start in range(0, n, self.chunk):
                x = x_all[start : start + self.chunk]
                r, d = self._recv[0][: x.numel()], self._diff[: x.numel()]
                mpi.allreduce_sum(self.comm, x, r)
                torch.add(r.mul_(scale), x, alpha=-1.0, out=d)
                total += float(torch.dot(d, d))
                x.copy_(r)
            self.bytes_last_round = 4 * n
            return total
        exchanges = self.topology.exchanges(self.rank, t)
        self.bytes_last_round = 4 * n * len(exchanges)
        if not exchanges:  # e.g. the rank that sits out an odd random matching
            return 0.0
        return self._plan(exchanges).run()

    def exchange(self) -> None:
        """The communication of one round alone: the same messages, no mixing.

        For benchmarks (the MPI cost of the Gossiper's own schedule); leaves
        the buffer unchanged. CPU, non-``complete`` topologies only.
        """
        if self.topology.is_allreduce or self.direct:
            raise ValueError("exchange() times the chunked point-to-point path only")
        t, self.t = self.t, self.t + 1
        exchanges = self.topology.exchanges(self.rank, t)
        if exchanges:
            self._plan(exchanges).run(mix=False)

    def _plan(self, exchanges: list[Exchange]) -> _Plan:
        key = tuple((e.send_to, e.recv_from, e.weight) for e in exchanges)
        plan = self._plans.get(key)
        if plan is None:
            recv = [r.numpy() for r in self._recv]
            plan = _Plan(self.comm, self.host.numpy(), recv, self._diff.numpy(), exchanges,
                         self.chunk)  # fmt: skip
            self._plans[key] = plan
        return plan

    def _mix_whole(self, t: int) -> float:
        """Device-direct path: whole-buffer exchanges, mixing on the device."""
        x = self.flat
        if self.topology.is_allreduce:
            r = self._recv[0]
            mpi.allreduce_sum(self.comm, x, r)
            torch.add(r.mul_(1.0 / self.topology.n), x, alpha=-1.0, out=self._diff)
            x.copy_(r)
            self.bytes_last_round = 4 * x.numel()
            return float(torch.dot(self._diff, self._diff))
        exchanges = self.topology.exchanges(self.rank, t)
        self.bytes_last_round = 4 * x.numel() * len(exchanges)
        if not exchanges:
            return 0.0
        for k, e in enumerate(exchanges):
            mpi.sendrecv(self.comm, x, e.send_to, self._recv[k], e.recv_from, tag=k)
        weights = [e.weight for e in exchanges]
        return mixing.mix(x, self._recv[: len(exchanges)], weights, self._diff)[0]

"""Gossip: mix one contiguous float32 buffer with the neighbours of a topology.

Three roles stay apart (as in SGP): *who* the peers are and *with what weights*
come from :class:`~dsgd_mpi.topology.Topology` (pure, testable without MPI);
*moving the bytes* is this module, through the helpers of :mod:`dsgd_mpi.comm`.

One round computes ``x_i' = w_ii x_i + sum_j w_ij x_j`` in place and returns
the local ``||x_i' - x_i||^2`` so that the consensus estimate costs one scalar
Allreduce. Because the weights of a row sum to one,
``x_i' - x_i = sum_j w_ij (x_j - x_i)``: only the difference is accumulated.

CPU path: the buffer is exchanged and mixed chunk by chunk. Each chunk is sent
to every peer of the round before it is overwritten, so updating in place is
safe, and the mixing arithmetic runs while the chunk is still in cache — on a
memory-bound machine this is what keeps a round close to a bare ``Sendrecv``.
Every rank walks the same chunks and exchanges in the same order, and each
exchange is a combined ``Sendrecv`` paired by the topology, so no ordering of
ranks can deadlock.

Device path: with a CUDA-aware MPI the device buffer goes to MPI directly (after
synchronizing the stream, since MPI does not know torch's streams); otherwise it
is staged through pinned host memory and mixed there.
"""

from __future__ import annotations

from typing import Literal

import torch

from dsgd_mpi import comm as mpi
from dsgd_mpi import mixing
from dsgd_mpi.topology import Topology

DeviceBuffers = Literal["auto", "on", "off"]

#: 256 Ki floats (1 MiB per buffer). Measured on a 2-core EPYC (1 MiB L2, 32 MiB
#: L3), mixing 11M floats took 30 / 20 / 16 / 21 ms with 16 Ki / 64 Ki / 256 Ki /
#: unchunked pieces: small enough to stay in cache, large enough that the fixed
#: cost of each Sendrecv and torch call does not dominate.
DEFAULT_CHUNK = 1 << 18


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
        overlap: bool = True,
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
        self.overlap = overlap
        # Two sets of receive buffers when overlapping: chunk c arrives in one set
        # while chunk c-1 is mixed from the other.
        sets = 2 if overlap and not self.direct else 1
        self._recv_sets = [
            [torch.empty(size, dtype=torch.float32, device=self.host.device) for _ in range(peers)]
            for _ in range(sets)
        ]
        self._recv = self._recv_sets[0]
        self._diff = torch.empty(size, dtype=torch.float32, device=self.host.device)
        self.bytes_last_round = 0

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
        if self.overlap:
            return self._mix_overlapped(exchanges)
        total = 0.0
        for start in range(0, n, self.chunk):
            x = x_all[start : start + self.chunk]
            m = x.numel()
            for k, e in enumerate(exchanges):
                mpi.sendrecv(self.comm, x, e.send_to, self._recv[k][:m], e.recv_from, tag=k)
            received = [r[:m] for r in self._recv[: len(exchanges)]]
            total += self._accumulate(x, received, exchanges)
        return total

    def _mix_overlapped(self, exchanges) -> float:
        """Post chunk c's exchanges, mix chunk c-1 meanwhile, then wait for chunk c.

        With ranks sharing cores, a rank that waits for a peer spins in MPI's
        polling; here it mixes the previous chunk instead. Chunk c-1 is mixed in
        place only after its sends completed; chunk c's sends read other memory.
        """
        x_all, n = self.host, self.host.numel()
        total, pending = 0.0, None
        for c, start in enumerate(range(0, n, self.chunk)):
            x = x_all[start : start + self.chunk]
            m = x.numel()
            received = [r[:m] for r in self._recv_sets[c % 2][: len(exchanges)]]
            requests = []
            for k, (e, r) in enumerate(zip(exchanges, received, strict=True)):
                requests += mpi.start_exchange(self.comm, x, e.send_to, r, e.recv_from, tag=k)
            if pending is not None:
                total += self._accumulate(*pending, exchanges)
            mpi.wait_all(requests)
            pending = (x, received)
        total += self._accumulate(*pending, exchanges)
        return total

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
        received = self._recv[: len(exchanges)]
        return self._accumulate(x, received, exchanges)

    def _accumulate(self, x, received, exchanges) -> float:
        """``d = sum_k w_k r_k - (sum_k w_k) x``; ``x += d``; return ``||d||^2`` (fused)."""
        weights = [e.weight for e in exchanges]
        return mixing.accumulate(x, received, weights, self._diff[: x.numel()])

"""Gossip: mix one contiguous float32 buffer with the neighbours of a topology.

Three roles stay apart (as in SGP): *who* the peers are and *with what weights*
come from :class:`~dsgd_mpi.topology.Topology` (pure, testable without MPI);
*moving the bytes* is this module, through the helpers of :mod:`dsgd_mpi.comm`.

One round computes ``x_i' = w_ii x_i + sum_j w_ij x_j`` in place and returns
the local ``||x_i' - x_i||^2`` (the consensus estimate's share) and the
measure's share of the round (:mod:`dsgd_mpi.consensus`). Because the weights
of a row sum to one, ``x_i' - x_i = sum_j w_ij (x_j - x_i)``: only the
difference is accumulated. A buffer may end with tensors that are mixed but not
measured (BatchNorm statistics with ``gossip.buffers``): ``measured`` elements
from the start are measured, the rest only mixed.

Host path (CPU tensors): the buffer is exchanged and mixed chunk by chunk. For
each chunk the receives and sends of every peer are posted together, on
persistent requests set up once per exchange pattern, and the chunk is mixed
by one fused numba pass as soon as they complete, while the received pieces are
still in cache. Every rank walks the same chunks in the same order and each
chunk's requests are all posted before any wait, so no ordering of ranks can
deadlock.

Pipeline path (device tensors): the same chunks and requests, with the mixing
done by torch on the device and nothing waiting on the host but MPI itself.
With a CUDA-aware MPI the requests read and write device memory (after one
stream synchronize per round). Otherwise each chunk is staged: all chunks are
copied down into pinned host memory up front on a side stream, each chunk goes
to MPI as soon as its copy is done, and the received pieces are copied up and
mixed on the device while MPI moves the next chunk. Two slots of receive
buffers alternate between chunks; events keep a slot from being overwritten
while the previous chunk in it is still being copied or mixed. On the CPU the
events are no-ops and copies synchronous, so tests run this path (forced) too.
"""

from __future__ import annotations

import weakref

import torch

from dsgd_mpi import comm as mpi
from dsgd_mpi import mixing, rounds
from dsgd_mpi.flat import allocate
from dsgd_mpi.mixing import DEFAULT_CHUNK, chunk_bounds
from dsgd_mpi.topology import Exchange, Topology


class _Plan:
    """Persistent requests of one exchange pattern, per chunk, and the buffers they use."""

    def __init__(self, comm, exchanges, chunks) -> None:
        """``chunks``: (send buffer, [receive buffer per exchange]) per chunk."""
        self.weights = [e.weight for e in exchanges]
        self.requests = []
        for send, received in chunks:
            reqs = []
            for k, (e, r) in enumerate(zip(exchanges, received, strict=True)):
                reqs += mpi.persistent_exchange(comm, send, e.send_to, r, e.recv_from, tag=k)
            self.requests.append(reqs)

    def all_requests(self) -> list:
        return [r for reqs in self.requests for r in reqs]


def _free_plans(plans: dict) -> None:
    for plan in plans.values():
        mpi.free_all(plan.all_requests())
    plans.clear()


class _Device:
    """A side stream and events on CUDA; nothing on the CPU, where copies are synchronous."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.side = torch.cuda.Stream(device) if self.cuda else None

    def event(self, stream=None):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream or torch.cuda.current_stream(self.device))
        return ev

    @staticmethod
    def host_wait(ev) -> None:
        if ev is not None:
            ev.synchronize()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()


def _pinned(numel: int) -> torch.Tensor:
    return torch.empty(numel, dtype=torch.float32, pin_memory=torch.cuda.is_available())


class Gossiper:
    """Mixes ``flat`` in place with one gossip round per call of :meth:`round`.

    ``t`` is the global round counter that time-varying topologies read; it
    advances by one per round (including repeated rounds of consensus control)
    and is saved in checkpoints. ``pipeline`` forces the device path for a CPU
    buffer (tests); by default device buffers take it and host buffers do not.
    """

    def __init__(
        self,
        comm: mpi.Comm,
        topology: Topology,
        flat: torch.Tensor,
        *,
        port: mpi.TensorPort,
        measured: int | None = None,
        chunk: int = DEFAULT_CHUNK,
        pipeline: bool | None = None,
        t: int = 0,
    ) -> None:
        if flat.dtype != torch.float32 or flat.dim() != 1 or not flat.is_contiguous():
            raise ValueError("gossip needs one contiguous 1-D float32 buffer")
        if topology.n != comm.Get_size():
            raise ValueError(
                f"topology is for n={topology.n} but the job has {comm.Get_size()} ranks"
            )
        self.comm, self.topology, self.flat, self.port, self.t = comm, topology, flat, port, t
        self.rank = comm.Get_rank()
        numel = flat.numel()
        self.measured = numel if measured is None else measured
        self.chunks = chunk_bounds(numel, self.measured, chunk)
        self.pipeline = (flat.device.type != "cpu" or port.staged) if pipeline is None else pipeline
        self.dev = _Device(flat.device)
        width = max(hi - lo for lo, hi, _ in self.chunks)
        slots = 2 if self.pipeline else 1
        # Receive buffers by exchanges, not peers: one-peer graphs have degree 2
        # but receive once per round.
        k = topology.max_exchanges
        self._recv = [[allocate(width, flat.device) for _ in range(slots)] for _ in range(k)]
        self._scratch = allocate(width, flat.device)
        self._acc = torch.zeros(2, dtype=torch.float64, device=flat.device)
        self._discard = torch.zeros(2, dtype=torch.float64, device=flat.device)
        staged = self.pipeline and port.staged and k > 0
        self._host_send = _pinned(numel) if staged else None
        self._host_recv = [[_pinned(width) for _ in range(2)] for _ in range(k)] if staged else []
        self._average: torch.Tensor | None = None  # complete: allocated on first use
        self._plans: dict[tuple, _Plan] = {}
        # Persistent requests must be freed before MPI_Finalize; close() does it
        # early, this does it at garbage collection or interpreter exit.
        self._finalizer = weakref.finalize(self, _free_plans, self._plans)
        self.bytes_last_round = 0

    def close(self) -> None:
        """Release the persistent MPI requests (also done at exit)."""
        self._finalizer()

    # ------------------------------------------------------------------ rounds

    def round(
        self, xbar: torch.Tensor | None = None, sketch: torch.Tensor | None = None, seed: int = 0
    ) -> tuple[float, float]:
        """One gossip round in place; returns this rank's ``||x' - x||^2`` and its measure share.

        The measure share, over the measured prefix and in the same pass as the
        mixing: ``||x' - xbar||^2`` when ``xbar`` is given; with ``sketch`` (float64
        buckets on the buffer's device) the buckets are overwritten with ``S x'``
        (CountSketch with ``seed``) and the share is 0. Neither is asked of an
        all-reduce round, after which every replica equals the average.
        """
        t, self.t = self.t, self.t + 1
        if self.topology.n == 1:
            self.bytes_last_round = 0
            return 0.0, 0.0
        if self.topology.is_allreduce:
            return self._allreduce()
        plan = rounds.plan(self.topology, self.rank, t, self.flat.numel())
        self.bytes_last_round = plan.bytes_sent
        measure = rounds.measure_of(xbar, sketch, seed)
        requests = self._plan(plan.exchanges).requests if plan.exchanges else []
        if self.pipeline:
            if sketch is not None:
                sketch.zero_()
            if not requests:  # e.g. the rank that sits out an odd random matching: x' = x
                return self._measure_only(measure)
            return self._pipelined(self._plan(plan.exchanges), measure)

        def fetch(c: int, lo: int, hi: int) -> list[torch.Tensor]:
            if requests:  # every peer's requests of the chunk posted together, then waited
                mpi.start_all(requests[c])
                mpi.wait_all(requests[c])
            return [slots[0][: hi - lo] for slots in self._recv[: len(plan.exchanges)]]

        return rounds.mix_chunks(self.flat, self.chunks, plan.weights, self._scratch, fetch,
                                 measure)  # fmt: skip

    def exchange(self) -> None:
        """The communication of one round alone: the same messages, no mixing.

        For benchmarks (the MPI cost of the Gossiper's own schedule); leaves
        the buffer unchanged. Host path, non-``complete`` topologies only.
        """
        if self.topology.is_allreduce or self.pipeline:
            raise ValueError("exchange() times the host point-to-point path only")
        t, self.t = self.t, self.t + 1
        exchanges = self.topology.exchanges(self.rank, t)
        if exchanges:
            for reqs in self._plan(exchanges).requests:
                mpi.start_all(reqs)
                mpi.wait_all(reqs)

    def _measure_only(self, measure: dict) -> tuple[float, float]:
        """Device path, a round without exchanges: x stays; the measure needs its share."""
        if not measure:
            return 0.0, 0.0
        acc = self._acc.zero_()
        for lo, hi, measured in self.chunks:
            if measured:
                args = rounds.kernel_args(measure, lo, hi)
                mixing.mix_torch_into(acc, self.flat[lo:hi], [], [], self._scratch[: hi - lo],
                                      **args)  # fmt: skip
        return 0.0, float(acc[1])

    def _pipelined(self, plan: _Plan, measure) -> tuple[float, float]:
        x, dev = self.flat, self.dev
        acc = self._acc.zero_()
        staged = self._host_send is not None
        down = []
        if staged:  # every chunk down at once, on the side stream, after x is final
            if dev.cuda:
                dev.side.wait_stream(torch.cuda.current_stream(dev.device))
            with torch.cuda.stream(dev.side) if dev.cuda else _nothing():
                for lo, hi, _ in self.chunks:
                    self._host_send[lo:hi].copy_(x[lo:hi], non_blocking=dev.cuda)
                    down.append(dev.event(dev.side))
        else:
            dev.sync()  # MPI reads x directly: the kernels that wrote it must be done
        up: list = [None] * len(self.chunks)
        mixed: list = [None] * len(self.chunks)
        exchanges = len(plan.weights)
        chunks = zip(self.chunks, plan.requests, strict=True)
        for c, ((lo, hi, measured), reqs) in enumerate(chunks):
            slot, m = c % 2, hi - lo
            if c >= 2:  # the slot's previous chunk must be out of its buffers
                dev.host_wait(up[c - 2] if staged else mixed[c - 2])
            if staged:
                dev.host_wait(down[c])
            mpi.start_all(reqs)
            mpi.wait_all(reqs)
            received = [self._recv[k][slot][:m] for k in range(exchanges)]
            if staged:
                with torch.cuda.stream(dev.side) if dev.cuda else _nothing():
                    if dev.cuda and c >= 2:
                        dev.side.wait_event(mixed[c - 2])
                    for k in range(exchanges):
                        received[k].copy_(self._host_recv[k][slot][:m], non_blocking=dev.cuda)
                    up[c] = dev.event(dev.side)
                if dev.cuda:
                    torch.cuda.current_stream(dev.device).wait_event(up[c])
            scratch = self._scratch[:m]
            if measured:
                args = rounds.kernel_args(measure, lo, hi)
                mixing.mix_torch_into(acc, x[lo:hi], received, plan.weights, scratch, **args)
            else:
                mixing.mix_torch_into(self._discard, x[lo:hi], received, plan.weights, scratch)
            mixed[c] = dev.event()
        estimate, distance = acc.tolist()  # the round's one host sync
        return estimate, distance

    def _allreduce(self) -> tuple[float, float]:
        """``complete``: x' = the average, by Allreduce (C-SGD); the distance after it is 0."""
        x = self.flat
        self.bytes_last_round = 4 * x.numel()
        if self._average is None:
            self._average = allocate(x.numel(), x.device)
        avg = self._average
        if self.pipeline:
            self.port.allreduce_(self.comm, avg.copy_(x))
        else:  # chunked: each piece is summed while the next one's data is still in cache
            for lo, hi, _ in self.chunks:
                avg[lo:hi].copy_(x[lo:hi])
                self.port.allreduce_(self.comm, avg[lo:hi])
        avg.mul_(1.0 / self.topology.n)
        d = avg[: self.measured] - x[: self.measured]
        # float64, as every other estimate: a float32 dot of 10^7 terms is off in its 4th digit
        estimate = float(torch.linalg.vector_norm(d, dtype=torch.float64) ** 2)
        x.copy_(avg)
        return estimate, 0.0

    def _plan(self, exchanges: tuple[Exchange, ...]) -> _Plan:
        key = tuple((e.send_to, e.recv_from, e.weight) for e in exchanges)
        plan = self._plans.get(key)
        if plan is None:
            plan = _Plan(self.comm, exchanges, self._buffers(len(exchanges)))
            self._plans[key] = plan
        return plan

    def _buffers(self, exchanges: int) -> list[tuple[object, list[object]]]:
        """What MPI reads and writes for each chunk: host memory, or device memory (direct)."""
        out = []
        for c, (lo, hi, _) in enumerate(self.chunks):
            slot, m = (c % 2 if self.pipeline else 0), hi - lo
            if self._host_send is not None:
                send = self._host_send[lo:hi].numpy()
                recv = [self._host_recv[k][slot][:m].numpy() for k in range(exchanges)]
            else:
                send = _mpi_view(self.flat[lo:hi])
                recv = [_mpi_view(self._recv[k][slot][:m]) for k in range(exchanges)]
            out.append((send, recv))
        return out


def _mpi_view(t: torch.Tensor):
    """Host tensors as numpy arrays; device tensors as they are (CUDA array interface)."""
    return t.numpy() if t.device.type == "cpu" else t


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

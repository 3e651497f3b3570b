"""The only door to mpi4py.

Everything below ``run.py`` receives a communicator as an argument and calls the
helpers here for anything that needs MPI. Buffers are moved with the
capital-letter (buffer-protocol) calls; lowercase pickling calls are used only
for small control data (config text, checkpoint step lists).

One rule for every tensor that goes to MPI (:class:`TensorPort`): MPI reads
host memory directly; device memory is handed over only when the MPI library
can read it (CUDA-aware), and only after the stream that filled it has been
synchronized (MPI knows nothing of torch's streams); otherwise the tensor is
staged through a reused pinned host buffer. Every collective and
point-to-point call on tensors in the package goes through a port.
"""

from __future__ import annotations

import ctypes
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import mpi4py

# MPI is initialized by init() (or the first use of WORLD), not at import: dsgd_mpi.run
# first checks that the launcher speaks a PMI this library has, and binds the GPU, since
# an MPI_Init that cannot reach its launcher kills the process without a word of ours and
# some MPIs set up CUDA inside MPI_Init. finalize: mpi4py still ends MPI at exit.
# Takes effect only if nothing imported mpi4py.MPI before (a script that did keeps it).
mpi4py.rc.initialize = False
mpi4py.rc.finalize = True
# The training loop makes every MPI call from the main thread; MPI_THREAD_MULTIPLE
# (mpi4py's default) costs a lock on every call in some MPIs.
mpi4py.rc.thread_level = "funneled"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from dsgd_mpi.watchdog import Watchdog, report_and  # noqa: E402

Comm = MPI.Comm


def init() -> MPI.Comm:
    """Initialize MPI once (funneled threads); returns the world communicator."""
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_FUNNELED)
    return MPI.COMM_WORLD


def finalize() -> None:
    """End MPI normally, so that the exit status every rank agreed on reaches the launcher.

    ``python -m mpi4py`` turns a non-zero exit into ``MPI_Abort``, which Slurm
    records as a failure with another code; after ``MPI_Finalize`` the
    process exits with its own status. Only for codes every rank returns.
    """
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()


def __getattr__(name: str):
    # ``comm.WORLD``: the world communicator, MPI initialized on first use.
    if name == "WORLD":
        return init()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------- launch


def node_local(comm: MPI.Comm) -> tuple[int, int]:
    """(rank among the ranks on this node, number of ranks on this node)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def node_affinities(comm: MPI.Comm) -> list[frozenset[int]]:
    """The CPU sets of the ranks on this node, this rank's first (collective)."""
    mine = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        sets = local.allgather(sorted(mine))  # small control data: a few CPU numbers
        me = local.Get_rank()
    finally:
        local.Free()
    return [mine] + [frozenset(s) for i, s in enumerate(sets) if i != me]


# ------------------------------------------------------------ device memory


def _libmpi() -> ctypes.CDLL | None:
    """The MPI library this process loaded (mpi4py opens it privately, so look it up)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = [ln.split()[-1] for ln in fh if "/libmpi" in ln and ".so" in ln]
    except OSError:
        return None
    for path in dict.fromkeys(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def cuda_aware(
    env: Mapping[str, str] | None = None, lib: ctypes.CDLL | None = None
) -> tuple[bool, str]:
    """Whether this MPI can read CUDA device memory, and why we think so.

    Asks the library where it can (``MPIX_Query_cuda_support``: Open MPI, and
    MPICH >= 4 which also has ``MPIX_GPU_query_support``), then the documented
    switches of MPIs that only say so through the environment (Cray MPICH,
    MVAPICH2-GDR). Unknown means no: staging is slower but never wrong.
    ``gossip.device_buffers: on|off`` overrides the answer. ``lib``: the
    library to ask (default: the loaded libmpi). Initializes MPI: the queries
    are only meaningful after MPI_Init.
    """
    init()
    env = os.environ if env is None else env
    version = library_version()
    lib = _libmpi() if lib is None else lib
    if lib is not None:
        fn = getattr(lib, "MPIX_Query_cuda_support", None)
        if fn is not None:
            fn.restype = ctypes.c_int
            answer = bool(fn())
            return answer, f"MPIX_Query_cuda_support() returned {int(answer)}"
        fn = getattr(lib, "MPIX_GPU_query_support", None)
        if fn is not None:
            flag = ctypes.c_int(0)
            if fn(0, ctypes.byref(flag)) == 0:  # 0 = MPIX_GPU_SUPPORT_CUDA
                return bool(flag.value), f"MPIX_GPU_query_support(CUDA) = {flag.value}"
    if env.get("MPICH_GPU_SUPPORT_ENABLED") == "1":
        return True, "MPICH_GPU_SUPPORT_ENABLED=1 (Cray MPICH)"
    if env.get("MV2_USE_CUDA") == "1":
        return True, "MV2_USE_CUDA=1 (MVAPICH2-GDR)"
    return False, f"{version} does not say it is CUDA-aware"


#: Elements per staged piece of a whole-vector reduction (4 MB of float32): large enough for
#: MPI to run at full bandwidth, small enough that copies of the others overlap it.
STAGE_CHUNK = 1 << 20


def _sync(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.current_stream(t.device).synchronize()


class TensorPort:
    """How tensors on one device reach MPI (see the module docstring).

    ``staged``: MPI only ever sees host buffers; a device tensor (or, for tests,
    a CPU tensor) is copied into a pinned host buffer that is allocated once per
    slot and reused, and copied back after a receive. Otherwise a host tensor is
    handed over as it is and a device tensor after a stream synchronize.
    """

    def __init__(self, device: torch.device | str, staged: bool, chunk: int = STAGE_CHUNK) -> None:
        self.device = torch.device(device)
        self.staged = staged
        self.chunk = chunk
        self._host: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._side: torch.cuda.Stream | None = None

    def host(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        """A reused host buffer for ``like``'s elements (pinned where CUDA exists), 1-D."""
        key = (slot, like.dtype)
        buf = self._host.get(key)
        if buf is None or buf.numel() < like.numel():
            pin = torch.cuda.is_available()
            buf = torch.empty(like.numel(), dtype=like.dtype, pin_memory=pin)
            self._host[key] = buf
        return buf[: like.numel()]

    def readable(self, t: torch.Tensor, slot: str = "send") -> Any:
        """A buffer MPI may read that holds ``t`` now."""
        if self.staged:
            h = self.host(slot, t)
            h.copy_(t.reshape(-1))  # a device-to-host copy into pinned memory waits for t
            return h.numpy()
        _sync(t)
        return t.numpy() if t.device.type == "cpu" else t

    def allreduce_(
        self, comm: MPI.Comm, t: torch.Tensor, op: str = "sum", identical: bool = False
    ) -> torch.Tensor:
        """Elementwise sum (or max) over ranks, in place; returns ``t``.

        ``identical``: reduce to rank 0 and broadcast, so that every rank holds the
        same bytes (MPI does not promise that of Allreduce); for values that
        decide control flow on every rank.
        """
        mpi_op = {"sum": MPI.SUM, "max": MPI.MAX}[op]
        if self.staged:
            self._staged_allreduce(comm, t.reshape(-1), mpi_op, identical)
            return t
        _sync(t)
        _allreduce(comm, t.numpy() if t.device.type == "cpu" else t, mpi_op, identical)
        return t

    def reduce_scatter_(
        self, comm: MPI.Comm, rows: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """``out`` = the sum over ranks of their row ``rows[rank]`` (a contiguous (size, m)
        tensor; Reduce_scatter_block): rank i receives sum_j rows_j[i]. Returns ``out``."""
        if self.staged:
            h, r = self.host("scatter", rows), self.host("scattered", out)
            h.copy_(rows.reshape(-1))
            comm.Reduce_scatter_block(h.numpy(), r.numpy(), op=MPI.SUM)
            out.reshape(-1).copy_(r)
            return out
        _sync(rows)
        host = rows.device.type == "cpu"
        comm.Reduce_scatter_block(rows.numpy() if host else rows, out.numpy() if host else out,
                                  op=MPI.SUM)  # fmt: skip
        return out

    def _staged_allreduce(self, comm: MPI.Comm, flat: torch.Tensor, op: MPI.Op,
                          identical: bool) -> None:  # fmt: skip
        """Chunk by chunk through pinned host memory: on a GPU every chunk's copy down is
        queued at once on a side stream, each chunk is reduced as soon as its copy is done
        and copied back up on that stream while MPI reduces the next (the C-SGD average and
        x̄ of the exact measure move whole models this way). On the CPU (tests) the copies
        are synchronous and the chunks the same."""
        h = self.host("reduce", flat)
        n, step = flat.numel(), max(1, self.chunk)
        bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        if not flat.is_cuda:
            for lo, hi in bounds:
                h[lo:hi].copy_(flat[lo:hi])
                _allreduce(comm, h[lo:hi].numpy(), op, identical)
                flat[lo:hi].copy_(h[lo:hi])
            return
        if self._side is None:
            self._side = torch.cuda.Stream(flat.device)
        side, main = self._side, torch.cuda.current_stream(flat.device)
        side.wait_stream(main)  # the kernels that wrote flat come first
        down = []
        with torch.cuda.stream(side):
            for lo, hi in bounds:
                h[lo:hi].copy_(flat[lo:hi], non_blocking=True)
                down.append(torch.cuda.Event())
                down[-1].record(side)
        for (lo, hi), ready in zip(bounds, down, strict=True):
            ready.synchronize()
            _allreduce(comm, h[lo:hi].numpy(), op, identical)
            with torch.cuda.stream(side):
                flat[lo:hi].copy_(h[lo:hi], non_blocking=True)
        main.wait_stream(side)  # whatever reads flat next sees the sums

    def bcast_(self, comm: MPI.Comm, t: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Overwrite ``t`` with root's ``t`` on every rank."""
        if self.staged:
            h = self.host("bcast", t)
            h.copy_(t.reshape(-1))
            comm.Bcast(h.numpy(), root=root)
            t.reshape(-1).copy_(h)
            return t
        _sync(t)
        comm.Bcast(t.numpy() if t.device.type == "cpu" else t, root=root)
        return t


def _allreduce(comm: MPI.Comm, buf: Any, op: MPI.Op, identical: bool) -> None:
    if not identical:
        comm.Allreduce(MPI.IN_PLACE, buf, op=op)
        return
    if comm.Get_rank() == 0:
        comm.Reduce(MPI.IN_PLACE, buf, op=op, root=0)
    else:
        comm.Reduce(buf, None, op=op, root=0)
    comm.Bcast(buf, root=0)


# --------------------------------------------------------- point to point


def sendrecv(comm: MPI.Comm, sendbuf: np.ndarray, dest: int, recvbuf: np.ndarray, source: int,
             tag: int = 0) -> None:  # fmt: skip
    """One blocking Sendrecv of host arrays: the bare-MPI baseline of the benchmarks."""
    comm.Sendrecv(sendbuf, dest, tag, recvbuf, source, tag)


def wait_all(requests: list[MPI.Request]) -> None:
    MPI.Request.Waitall(requests)


def persistent_exchange(
    comm: MPI.Comm, sendbuf: Any, dest: int, recvbuf: Any, source: int, tag: int = 0
) -> list[MPI.Prequest]:
    """Post a receive from ``source`` and a send to ``dest``, set up once and
    restarted every round with :func:`start_all` / :func:`wait_all`: MPI matches
    the peers and buffers one time instead of once per message. Neither buffer
    may be touched between start and wait. Release with :func:`free_all`.
    Buffers are numpy arrays, or device tensors of a CUDA-aware MPI (synchronize
    before every start)."""
    return [
        comm.Recv_init(recvbuf, source, tag),
        comm.Send_init(sendbuf, dest, tag),
    ]


def start_all(requests: list[MPI.Prequest]) -> None:
    MPI.Prequest.Startall(requests)


def free_all(requests: list[MPI.Prequest]) -> None:
    """Release inactive persistent requests (MPICH warns about leftovers at exit)."""
    if MPI.Is_finalized():
        return
    for r in requests:
        if r != MPI.REQUEST_NULL:
            r.Free()


# ------------------------------------------------------------- reductions


class Reducer:
    """Reductions of a few float64s to a value that every rank shares bit for bit.

    MPI does not promise bit-identical Allreduce results on every rank
    (hierarchical or offloaded reductions may sum in different orders), and the
    gossip loop, the stop flag and the targets decide control flow from these
    values: one ulp apart near a target means different round counts and a hang.
    So every rank's values are gathered (one Allgather of a few bytes, the
    latency of an Allreduce) and every rank sums them in rank order, the order
    the simulator sums its replicas in. No pickling.
    """

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.size = comm.Get_size()
        self._send = np.zeros(0, dtype=np.float64)
        self._all = np.zeros((self.size, 0), dtype=np.float64)

    def _gather(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.size != self._send.size:
            self._send = np.zeros(v.size, dtype=np.float64)
            self._all = np.zeros((self.size, v.size), dtype=np.float64)
        self._send[:] = v
        self.comm.Allgather([self._send, MPI.DOUBLE], [self._all, MPI.DOUBLE])
        return self._all

    def sum(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        return ordered_sum(self._gather(values))

    def max(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        return self._gather(values).max(axis=0)


def ordered_sum(rows: np.ndarray) -> np.ndarray:
    """Rows added one after the other in their order: the same bits wherever it runs."""
    total = np.array(rows[0], dtype=np.float64)
    for row in rows[1:]:
        total += row
    return total


# ----------------------------------------------------------------- faults


def node_pids(comm: MPI.Comm) -> dict[int, int]:
    """{world rank: pid} of the other ranks on this node (collective)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        pairs = local.allgather((comm.Get_rank(), os.getpid()))  # small control data
    finally:
        local.Free()
    return {rank: pid for rank, pid in pairs if rank != comm.Get_rank()}


def watch_peers(comm: MPI.Comm) -> Watchdog:
    """Arm a watchdog that names a rank of this node that dies and aborts the job.

    Collective. Disarm with ``.stop()`` on every rank before the final barrier.
    The abort is the one MPI call made off the main thread; at that point a
    peer is already dead and the job is going down.
    """
    return Watchdog(node_pids(comm), comm.Get_rank(), report_and(lambda: comm.Abort(1))).start()


def library_version(full: bool = False) -> str:
    """The MPI library's version string (its first line unless ``full``); callable before
    MPI_Init. Open MPI pads it with NUL bytes, which an HDF5 string attribute refuses."""
    text = MPI.Get_library_version().replace("\0", "").strip()
    return text if full else (text.splitlines() or ["unknown MPI"])[0].strip()


def abort(comm: MPI.Comm, code: int) -> None:
    """End every rank of the job with ``code`` (after this rank said why)."""
    sys.stdout.flush()
    sys.stderr.flush()
    comm.Abort(code)


def abort_on_exception(comm: MPI.Comm, exc: BaseException, code: int = 1) -> None:
    """Report which rank failed and why, then take the whole job down.

    Without this, the surviving ranks wait forever in their next collective.
    """
    rank = comm.Get_rank()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"\n[rank {rank}] failed: {type(exc).__name__}: {exc}\n{text}")
    abort(comm, code)

"""The only door to mpi4py.

Everything below ``run.py`` receives a communicator as an argument and calls the
helpers here for anything that needs MPI constants (datatypes, ops). Buffers are
moved with the capital-letter (buffer-protocol) calls; lowercase pickling calls
are used only for small control data (config text, checkpoint step lists).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

from mpi4py import MPI

from dsgd_mpi.watchdog import Watchdog, report_and

Comm = MPI.Comm

WORLD: MPI.Comm = MPI.COMM_WORLD


def _buf(x: Any) -> Any:
    """A buffer mpi4py can read: numpy arrays as they are, CPU tensors through
    ``.numpy()`` (zero copy), CUDA tensors as they are (mpi4py reads
    ``__cuda_array_interface__``). mpi4py infers the MPI datatype from each.
    """
    if hasattr(x, "is_cuda") and not x.is_cuda:
        return x.numpy()
    return x


def sendrecv(
    comm: MPI.Comm, sendbuf: Any, dest: int, recvbuf: Any, source: int, tag: int = 0
) -> None:
    """Send ``sendbuf`` to ``dest`` while receiving ``recvbuf`` from ``source``."""
    comm.Sendrecv(_buf(sendbuf), dest, tag, _buf(recvbuf), source, tag)


def wait_all(requests: list[MPI.Request]) -> None:
    MPI.Request.Waitall(requests)


def persistent_exchange(
    comm: MPI.Comm, sendbuf: Any, dest: int, recvbuf: Any, source: int, tag: int = 0
) -> list[MPI.Prequest]:
    """Post a receive from ``source`` and a send to ``dest``, set up once and
    restarted every round with :func:`start_all` / :func:`wait_all`: MPI matches
    the peers and buffers one time instead of once per message. Neither buffer
    may be touched between start and wait. Release with :func:`free_all`."""
    return [
        comm.Recv_init(_buf(recvbuf), source, tag),
        comm.Send_init(_buf(sendbuf), dest, tag),
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


def allreduce_sum(comm: MPI.Comm, sendbuf: Any, recvbuf: Any) -> None:
    """Elementwise sum of ``sendbuf`` over ranks into ``recvbuf``."""
    comm.Allreduce(_buf(sendbuf), _buf(recvbuf), op=MPI.SUM)


def allreduce_inplace(comm: MPI.Comm, buf: Any) -> None:
    """Elementwise sum over ranks, in place."""
    comm.Allreduce(MPI.IN_PLACE, _buf(buf), op=MPI.SUM)


class ScalarReducer:
    """Sums one float64 over ranks with a preallocated buffer (no pickling)."""

    def __init__(self, comm: MPI.Comm) -> None:
        import numpy as np

        self.comm = comm
        self._send = np.zeros(1, dtype=np.float64)
        self._recv = np.zeros(1, dtype=np.float64)

    def sum(self, value: float) -> float:
        return self._reduce(value, MPI.SUM)

    def max(self, value: float) -> float:
        return self._reduce(value, MPI.MAX)

    def _reduce(self, value: float, op: MPI.Op) -> float:
        self._send[0] = value
        self.comm.Allreduce([self._send, MPI.DOUBLE], [self._recv, MPI.DOUBLE], op=op)
        return float(self._recv[0])


def node_local(comm: MPI.Comm) -> tuple[int, int]:
    """(rank among the ranks on this node, number of ranks on this node)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


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
    """
    return Watchdog(node_pids(comm), comm.Get_rank(), report_and(lambda: comm.Abort(1))).start()


def cuda_aware() -> bool:
    """Best-effort detection of a CUDA-aware MPI.

    MPICH and Open MPI expose this differently; we look for the documented
    switches. ``gossip.device_buffers: on|off`` overrides the guess.
    """
    query = getattr(MPI, "Query_cuda_support", None)
    if query is not None:
        try:
            return bool(query())
        except Exception:  # noqa: BLE001 - an MPI without the query is simply "unknown"
            pass
    version = MPI.Get_library_version()
    if "Open MPI" in version:
        return os.environ.get("OMPI_MCA_opal_cuda_support", "").lower() in ("1", "true")
    if "MPICH" in version:
        return os.environ.get("MPIR_CVAR_ENABLE_GPU", "0") == "1"
    return False


def library_version() -> str:
    return MPI.Get_library_version().splitlines()[0].strip()


def abort_on_exception(comm: MPI.Comm, exc: BaseException, code: int = 1) -> None:
    """Report which rank failed and why, then take the whole job down.

    Without this, the surviving ranks wait forever in their next collective.
    """
    rank = comm.Get_rank()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"\n[rank {rank}] failed: {type(exc).__name__}: {exc}\n{text}")
    sys.stderr.flush()
    comm.Abort(code)

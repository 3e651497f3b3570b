"""Run on real ranks: MPI gossip must equal the numpy reference X <- W(t) X.

Usage: python -m mpi4py tests/mpi/gossip_vs_numpy.py ROUNDS NUMEL CHUNK [MEASURED [PATHS [DEVICE]]]
       python -m mpi4py tests/mpi/gossip_vs_numpy.py --cases CASE ...
       (CASE = SIZE:ROUNDS:NUMEL:CHUNK[:MEASURED[:PATHS]], run on the first SIZE ranks)

Every rank builds the same random X (n x NUMEL) from a fixed seed, keeps its
row, and gossips ROUNDS rounds for every topology that can serve this n, on
three paths at once: the host path (numba kernels), the device pipeline forced
onto CPU tensors with MPI reading them directly, and the same pipeline staged
through host buffers (what a GPU without a CUDA-aware MPI does). Rank 0
replays the rounds in float64 with the dense W(t). Checked per round: the rows
of every path against the reference, the staged and direct paths against each
other, each rank's ||x' - x||^2 over the first MEASURED elements (default: all),
and for static topologies the design bound Xi^2 <= e2 / (1 - lambda_2)^2.
PATHS (comma-separated, default all three) picks the paths; DEVICE=cuda runs the
direct and staged paths on device buffers (tests/gpu), the staged port reducing
whole vectors in pieces of CHUNK floats.
"""

import sys
import time

import numpy as np
import torch
from mpi4py import MPI

from dsgd_mpi.comm import TensorPort
from dsgd_mpi.gossip import Gossiper
from dsgd_mpi.topology import NAMES, Topology, TopologyError

torch.set_num_threads(1)


def paths(argv: list[str], rank: int) -> tuple[dict, torch.device]:
    """The paths to run (PATHS argument, default all three) and the device."""
    chosen = {
        "host": dict(port=TensorPort("cpu", staged=False)),
        "direct": dict(port=TensorPort("cpu", staged=False), pipeline=True),
        "staged": dict(port=TensorPort("cpu", staged=True)),
    }
    if argv:
        chosen = {p: chosen[p] for p in argv[0].split(",")}
    device = torch.device(argv[1] if len(argv) > 1 else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        # The staged port reduces whole vectors (topology complete) in chunks of this size:
        # several of them, with copies overlapping the reductions on the GPU.
        chunk = int(argv[2]) if len(argv) > 2 else 65536
        chosen = {
            p: dict(port=TensorPort(device, staged=(p == "staged"), chunk=chunk))
            for p in chosen if p != "host"
        }  # fmt: skip
    return chosen, device


def check(comm, rounds: int, numel: int, chunk: int, measured: int, extra: list[str]) -> None:
    """Every topology that can serve comm's size, on every path, against numpy."""
    rank, n = comm.Get_rank(), comm.Get_size()
    PATHS, device = paths(extra, rank)
    checked = []
    for name in NAMES:
        try:
            topo = Topology(name, n, seed=7)
        except TopologyError:
            assert name == "bipartite_exponential" and n % 2 == 1, f"{name} refused n={n}"
            continue
        X = np.random.default_rng(123).standard_normal((n, numel)).astype(np.float32)
        rows = {p: np.zeros((rounds, numel), dtype=np.float32) for p in PATHS}
        local = {p: np.zeros(rounds) for p in PATHS}
        for path, kwargs in PATHS.items():
            flat = torch.from_numpy(X[rank].copy()).to(device)
            gossiper = Gossiper(comm, topo, flat, chunk=chunk, measured=measured, **kwargs)
            assert gossiper.pipeline == (path != "host")
            for r in range(rounds):
                estimate, _ = gossiper.round()
                local[path][r] = estimate
                rows[path][r] = flat.cpu().numpy()
        if "staged" in PATHS and "direct" in PATHS:
            np.testing.assert_allclose(rows["staged"], rows["direct"], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{name}: staged and direct pipelines differ")
            np.testing.assert_allclose(local["staged"], local["direct"], rtol=1e-6, atol=1e-9)
        for path in PATHS:
            all_rows = np.zeros((n, rounds, numel), dtype=np.float32) if rank == 0 else None
            all_local = np.zeros((n, rounds)) if rank == 0 else None
            comm.Gather(rows[path], all_rows, root=0)
            comm.Gather(local[path], all_local, root=0)
            if rank != 0:
                continue
            ref = X.astype(np.float64)
            for r in range(rounds):
                new = topo.matrix(r) @ ref
                diff = (new - ref)[:, :measured]
                want_local = (diff**2).sum(axis=1)
                scale = max(1.0, np.abs(new).max())
                err = np.abs(all_rows[:, r, :] - new).max()
                assert err <= 1e-5 * scale, f"{name} {path} n={n} r{r}: |MPI - numpy| = {err:.3g}"
                np.testing.assert_allclose(
                    all_local[:, r], want_local, rtol=2e-4, atol=1e-6,
                    err_msg=f"{name} {path} n={n} round {r}: local ||x'-x||^2",
                )  # fmt: skip
                if topo.is_allreduce:  # d = x̄ - x in float32 as the rank formed it: its
                    before = X if r == 0 else all_rows[:, r - 1, :]  # norm summed in float64
                    d32 = (all_rows[:, r, :] - before)[:, :measured].astype(np.float64)
                    np.testing.assert_allclose(all_local[:, r], (d32**2).sum(axis=1),
                                               rtol=1e-12, err_msg=f"{name} n={n}: float64")
                lam = topo.lambda2()
                if lam is not None and lam < 1 - 1e-9 and n > 1 and measured == numel:
                    xi2_before = ((ref - ref.mean(axis=0)) ** 2).sum(axis=1).mean()
                    xi2_after = ((new - new.mean(axis=0)) ** 2).sum(axis=1).mean()
                    e2 = all_local[:, r].mean()
                    bound = e2 / (1 - lam) ** 2
                    assert xi2_before <= bound * (1 + 1e-4) + 1e-9, f"{name} n={n}: bound, before"
                    assert xi2_after <= bound * (1 + 1e-4) + 1e-9, f"{name} n={n}: bound, after"
                ref = new
            if name == "one_peer_exponential" and n >= 2 and n & (n - 1) == 0:
                k = int(np.log2(n))
                mean = X.astype(np.float64).mean(axis=0)
                assert np.abs(all_rows[:, k - 1, :] - mean).max() < 1e-5, "not exact after log2 n"
        if rank == 0:
            checked.append(name)
        comm.Barrier()
    if rank == 0:
        print("checked", n, " ".join(checked))


def main(argv: list[str]) -> None:
    world = MPI.COMM_WORLD
    if argv[0] != "--cases":
        rounds, numel, chunk = (int(a) for a in argv[:3])
        measured = int(argv[3]) if len(argv) > 3 else numel
        check(world, rounds, numel, chunk, measured, argv[4:])
        return
    # Several world sizes in one job (torch starts once): each case runs on the first
    # SIZE ranks; the others wait without spinning, so the working ranks get the cores.
    for case in argv[1:]:
        size, rounds, numel, chunk, *rest = case.split(":")
        size, rounds, numel, chunk = int(size), int(rounds), int(numel), int(chunk)
        measured = int(rest[0]) if rest and rest[0] else numel
        sub = world.Split(0 if world.Get_rank() < size else MPI.UNDEFINED, world.Get_rank())
        if sub != MPI.COMM_NULL:
            check(sub, rounds, numel, chunk, measured, rest[1:])
            sub.Free()
        done = world.Ibarrier()
        while not done.Test():
            time.sleep(0.002)


main(sys.argv[1:])

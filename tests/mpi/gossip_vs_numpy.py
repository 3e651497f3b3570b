"""Run on real ranks: MPI gossip must equal the numpy reference X <- W(t) X.

Usage: python -m mpi4py tests/mpi/gossip_vs_numpy.py ROUNDS NUMEL CHUNK [MEASURED [PATHS [DEVICE]]]

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
direct and staged paths on device buffers (tests/gpu).
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

from dsgd_mpi.comm import TensorPort
from dsgd_mpi.gossip import Gossiper
from dsgd_mpi.topology import NAMES, Topology, TopologyError

comm = MPI.COMM_WORLD
rank, n = comm.Get_rank(), comm.Get_size()
rounds, numel, chunk = (int(a) for a in sys.argv[1:4])
measured = int(sys.argv[4]) if len(sys.argv) > 4 else numel
torch.set_num_threads(1)
PATHS = {
    "host": dict(port=TensorPort("cpu", staged=False)),
    "direct": dict(port=TensorPort("cpu", staged=False), pipeline=True),
    "staged": dict(port=TensorPort("cpu", staged=True)),
}
if len(sys.argv) > 5:
    PATHS = {p: PATHS[p] for p in sys.argv[5].split(",")}
device = torch.device(sys.argv[6] if len(sys.argv) > 6 else "cpu")
if device.type == "cuda":
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device())
    PATHS = {
        p: dict(port=TensorPort(device, staged=(p == "staged")))
        for p in PATHS if p != "host"
    }  # fmt: skip

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
            assert err <= 1e-5 * scale, f"{name} {path} n={n} round {r}: |MPI - numpy| = {err:.3g}"
            np.testing.assert_allclose(
                all_local[:, r], want_local, rtol=2e-4, atol=1e-6,
                err_msg=f"{name} {path} n={n} round {r}: local ||x'-x||^2",
            )  # fmt: skip
            lam = topo.lambda2()
            if lam is not None and lam < 1 - 1e-9 and n > 1 and measured == numel:
                xi2_before = ((ref - ref.mean(axis=0)) ** 2).sum(axis=1).mean()
                xi2_after = ((new - new.mean(axis=0)) ** 2).sum(axis=1).mean()
                e2 = all_local[:, r].mean()
                bound = e2 / (1 - lam) ** 2
                assert xi2_before <= bound * (1 + 1e-4) + 1e-9, f"{name} n={n}: bound broken before"
                assert xi2_after <= bound * (1 + 1e-4) + 1e-9, f"{name} n={n}: bound broken after"
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

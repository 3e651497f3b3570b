"""Run on real ranks: MPI gossip must equal the numpy reference X <- W(t) X.

Usage: python -m mpi4py tests/mpi/gossip_vs_numpy.py ROUNDS NUMEL CHUNK

Every rank builds the same random X (n x NUMEL) from a fixed seed, keeps its
row, gossips ROUNDS rounds with the Gossiper for every topology that can serve
this n, and rank 0 replays the same rounds in float64 with the dense W(t).
Checked per round: the rows, each rank's ||x' - x||^2, and for static
topologies the design bound Xi^2 <= e2 / (1 - lambda_2)^2.
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

from dsgd_mpi.gossip import Gossiper
from dsgd_mpi.topology import NAMES, Topology, TopologyError

comm = MPI.COMM_WORLD
rank, n = comm.Get_rank(), comm.Get_size()
rounds, numel, chunk = (int(a) for a in sys.argv[1:4])
torch.set_num_threads(1)

checked = []
for name in NAMES:
    try:
        topo = Topology(name, n, seed=7)
    except TopologyError:
        assert name == "bipartite_exponential" and n % 2 == 1, f"{name} refused n={n}"
        continue
    X = np.random.default_rng(123).standard_normal((n, numel)).astype(np.float32)
    flat = torch.from_numpy(X[rank].copy())
    gossiper = Gossiper(comm, topo, flat, chunk=chunk)
    local = np.zeros(rounds)
    rows = np.zeros((rounds, numel), dtype=np.float32)
    for r in range(rounds):
        local[r] = gossiper.round()
        rows[r] = flat.numpy()
    all_rows = np.zeros((n, rounds, numel), dtype=np.float32) if rank == 0 else None
    all_local = np.zeros((n, rounds)) if rank == 0 else None
    comm.Gather(rows, all_rows, root=0)
    comm.Gather(local, all_local, root=0)
    if rank == 0:
        ref = X.astype(np.float64)
        for r in range(rounds):
            new = topo.matrix(r) @ ref
            want_local = ((new - ref) ** 2).sum(axis=1)
            scale = max(1.0, np.abs(new).max())
            err = np.abs(all_rows[:, r, :] - new).max()
            assert err <= 1e-5 * scale, f"{name} n={n} round {r}: max |MPI - numpy| = {err:.3g}"
            np.testing.assert_allclose(
                all_local[:, r],
                want_local,
                rtol=2e-4,
                atol=1e-6,
                err_msg=f"{name} n={n} round {r}: local ||x'-x||^2",
            )
            lam = topo.lambda2()
            if lam is not None and lam < 1 - 1e-9 and n > 1:
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
        checked.append(name)
    comm.Barrier()
if rank == 0:
    print("checked", n, " ".join(checked))

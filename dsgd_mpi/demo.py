"""Watch gossip converge on real ranks: the `make demo` view of the gossip engine.

    mpiexec -n 4 python -m mpi4py -m dsgd_mpi.demo [--topology ring] [--rounds 15]

Each rank starts a small MLP from its own random initialization, moves its
parameters into one flat buffer, and gossips. Rank 0 prints, round by round, the
estimate e2 (one scalar reduction), the exact consensus distance Xi^2 and the
design's bound on it for static graphs.
"""

from __future__ import annotations

import argparse
import sys

import torch

from dsgd_mpi import comm as mpi
from dsgd_mpi.consensus import Consensus
from dsgd_mpi.flat import flatten
from dsgd_mpi.ranks import MpiGroup
from dsgd_mpi.replica import Buffers
from dsgd_mpi.schedule import PhaseSpan
from dsgd_mpi.topology import NAMES, Topology, TopologyError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd_mpi.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--topology", default="ring", help=f"one of {', '.join(NAMES)}")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    comm = mpi.WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    try:
        topology = Topology(args.topology, n, seed=args.seed)
    except TopologyError as exc:
        if rank == 0:
            print(f"dsgd_mpi.demo: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    torch.manual_seed(args.seed + rank)  # a different replica on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    )
    flat, _ = flatten(model)
    group = MpiGroup(comm, mpi.TensorPort("cpu", staged=False))
    consensus = Consensus(group, Buffers([flat]), topology)
    one_round = PhaseSpan(0, 0.0, 1.0, "none", 1.0, None, None, 1, 0.9)
    say = print if rank == 0 else (lambda *a, **k: None)
    summary = topology.summary()
    say(f"gossip demo: {n} ranks, topology {topology.name}, {flat.numel():,} parameters per rank")
    say(
        f"rho = {summary['rho']:.4f}, spectral gap = {summary['spectral_gap']:.4f}, "
        f"exact after = {summary['exact_after']}"
    )
    say(f"{'round':>5}  {'estimate e2':>12}  {'exact Xi^2':>12}  {'bound':>12}")
    say(f"{0:>5}  {'':>12}  {consensus.exact_distance():12.4e}  {'':>12}")
    for r in range(1, args.rounds + 1):
        estimate = consensus.communicate(one_round, target=0.0).estimate
        exact = consensus.exact_distance()
        say(f"{r:>5}  {estimate:12.4e}  {exact:12.4e}  {consensus.bound(estimate):12.4e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

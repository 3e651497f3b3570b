"""Run on real ranks: invariants of one training step.

Usage: python -m mpi4py tests/mpi/train_invariants.py MODE[,MODE] CONFIG.yaml

complete  -> after every step all ranks hold bitwise-identical parameters (C-SGD)
ring_lr0  -> with lr = 0 the ranks' average is unchanged by gossip, while the
             replicas (started apart on purpose) move towards each other
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

from dsgd_mpi.config import load_config
from dsgd_mpi.run import build
from dsgd_mpi.schedule import phases

comm = MPI.COMM_WORLD
rank, n = comm.Get_rank(), comm.Get_size()


def check(mode: str, path: str) -> None:
    topology = "complete" if mode == "complete" else "ring"
    cfg = load_config(path, [f"topology.name={topology}", f"run.name=invariants_{mode}"])
    trainer = build(comm, cfg)
    (flat,) = trainer.replicas.flats
    phase = phases(cfg)[0]
    if mode == "ring_lr0":
        torch.manual_seed(100 + rank)
        flat.add_(torch.randn_like(flat))  # distinct replicas, or the test would be trivial

    def gathered() -> np.ndarray:
        out = np.zeros((n, flat.numel()), dtype=np.float32)
        comm.Allgather(flat.numpy(), out)
        return out

    trainer.replicas.start(0)
    for step in range(5):
        before = gathered()
        lr = 0.0 if mode == "ring_lr0" else 0.05
        trainer.replicas.gradients(step)
        trainer.replicas.apply(lr)
        trainer.communicate(phase, trainer.policy.target(phase, lr))
        after = gathered()
        if mode == "complete":
            assert (after == after[0]).all(), f"step {step}: ranks differ after averaging"
            assert not np.array_equal(after[0], before[0]), "parameters did not change"
        else:
            drift = np.abs(after.mean(0) - before.mean(0)).max()
            assert drift < 1e-5, f"step {step}: gossip moved the average by {drift}"
            spread = ((after - after.mean(0)) ** 2).sum()
            assert spread < ((before - before.mean(0)) ** 2).sum(), "replicas did not get closer"
    if rank == 0:
        print("ok", mode)


for mode in sys.argv[1].split(","):  # one job for every mode: torch starts once
    check(mode, sys.argv[2])

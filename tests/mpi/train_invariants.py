"""Run on real ranks: what training steps do, against numpy recomputations.

Usage: python -m mpi4py tests/mpi/train_invariants.py MODE[,MODE] CONFIG.yaml OUT_DIR

complete   -> a C-SGD step (plain SGD): every rank holds x̄ - lr mean_i g_i, the mean of
              the parameters before the step minus lr times the mean of the gathered
              gradients, taken at x̄ (numpy)
ring_lr0   -> with lr = 0 the ranks' average is unchanged by gossip, while the
              replicas (started apart on purpose) move towards each other
distances  -> every logged consensus_exact equals Xi^2 recomputed from the gathered
              parameters, in D-SGD and exact phases, both orders, every measure
csgd       -> C-SGD (complete, plain SGD) in both orders equals single-model SGD on
              the union of the ranks' batches (tests/instruments.py)
avg_sam    -> each rank's average-direction eps is its row of the coefficients times
              every rank's carried D-SGD replica (the reduce-scatter against numpy)
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

from dsgd_mpi.config import load_config
from dsgd_mpi.run import build
from tests.instruments import (
    CSGD,
    CSGD_STEPS,
    PHASED,
    assert_distances_match,
    config,
    logged_and_recomputed,
    single_model_sgd,
)  # fmt: skip

comm = MPI.COMM_WORLD
rank, n = comm.Get_rank(), comm.Get_size()


def gathered(vector: torch.Tensor) -> np.ndarray:
    out = np.zeros((n, vector.numel()), dtype=np.float32)
    comm.Allgather(np.ascontiguousarray(vector.numpy()), out)
    return out


def check(mode: str, path: str) -> None:
    topology = "complete" if mode == "complete" else "ring"
    overrides = [f"topology.name={topology}", f"run.name=invariants_{mode}",
                 "optim.momentum=0", "optim.weight_decay=0"]  # fmt: skip
    trainer = build(comm, load_config(path, overrides))
    (flat,) = trainer.replicas.flats
    m = trainer.replicas.measured
    if mode == "ring_lr0":
        torch.manual_seed(100 + rank)
        flat.add_(torch.randn_like(flat))  # distinct replicas, or the test would be trivial
        trainer.timeline = _Zero(trainer.timeline)
    trainer.replicas.start(0)
    for step in range(5):
        before = gathered(flat[:m])
        lr = trainer.timeline.lr(step)
        trainer.train_step()
        after = gathered(flat[:m])
        if mode == "complete":
            grads = gathered(trainer.replicas.items[0].grad)
            expected = before.mean(0) - lr * grads.mean(0)
            for i in range(n):
                np.testing.assert_allclose(after[i], expected, rtol=1e-5, atol=1e-6,
                                           err_msg=f"step {step}: rank {i} is not x̄ - lr ḡ")
            assert np.abs(after[0] - before[0]).max() > 1e-4, "parameters did not change"
        else:
            drift = np.abs(after.mean(0) - before.mean(0)).max()
            assert drift < 1e-5, f"step {step}: gossip moved the average by {drift}"
            spread = ((after - after.mean(0)) ** 2).sum()
            assert spread < ((before - before.mean(0)) ** 2).sum(), "replicas did not get closer"
    if rank == 0:
        print("ok", mode, flush=True)


class _Zero:
    """A timeline whose learning rate is 0 (the rest as the run's)."""

    def __init__(self, timeline) -> None:
        self._timeline = timeline

    def __getattr__(self, name):
        return getattr(self._timeline, name)

    def lr(self, step: int) -> float:
        return 0.0


def distances(out_dir: str) -> None:
    for order in ("local_first", "gossip_first"):
        for measure in ("estimate", "exact", "sketch"):
            cfg = config(PHASED, {"gossip": {"order": order}, "consensus": {"measure": measure},
                                  "run": {"out_dir": out_dir,
                                          "name": f"distances_{order}_{measure}"}})  # fmt: skip
            trainer = build(comm, cfg)
            (flat,) = trainer.replicas.flats
            params = flat[: trainer.replicas.measured]
            pairs = logged_and_recomputed(trainer, PHASED["run"]["steps"],
                                          lambda p=params: gathered(p))  # fmt: skip
            scale = float((gathered(params).astype(np.float64) ** 2).sum(1).mean())
            assert_distances_match(pairs, scale, f"{n} ranks, {order}/{measure}")
            assert {row["phase"] for row, _ in pairs} == {0, 1, 2}
    if rank == 0:
        print("ok distances", flush=True)


def csgd(out_dir: str) -> None:
    expected = single_model_sgd(config(CSGD), n, CSGD_STEPS) if rank == 0 else None
    ends = {}
    for order in ("local_first", "gossip_first"):
        cfg = config(CSGD, {"gossip": {"order": order},
                            "run": {"out_dir": out_dir, "name": f"csgd_{order}"}})  # fmt: skip
        trainer = build(comm, cfg)
        trainer.replicas.start(0)
        for _ in range(CSGD_STEPS):
            trainer.train_step()
        (flat,) = trainer.replicas.flats
        ends[order] = gathered(flat[: trainer.replicas.measured])
        if rank == 0:
            for i, replica in enumerate(ends[order]):
                np.testing.assert_allclose(replica, expected, rtol=1e-4, atol=2e-6,
                                           err_msg=f"{order}: rank {i} is not SGD's model")
    if rank == 0:
        np.testing.assert_array_equal(ends["local_first"], ends["gossip_first"])
        print("ok csgd", flush=True)


def avg_sam(out_dir: str) -> None:
    """Each rank's eps is its own combination of every rank's D-SGD replica (numpy)."""
    cfg = config(CSGD, {"optim": {"perturb": "avg_sam", "momentum": 0.9},
                        "run": {"out_dir": out_dir, "name": "avg_sam"}})  # fmt: skip
    trainer = build(comm, cfg)
    trainer.replicas.start(0)
    trainer.perturbation.start(0)
    for _ in range(4):
        trainer.train_step()
    perturbation = trainer.perturbation
    (y,) = perturbation.shadow.params()
    ys = gathered(y).astype(np.float64)
    assert ((ys - ys.mean(0)) ** 2).sum() > 0, "the carried D-SGD replicas never moved apart"
    for step in (4, 99):
        (eps,) = perturbation.draw(step)
        expected = perturbation.coefficients(step) @ ys
        np.testing.assert_allclose(gathered(eps), expected, rtol=1e-4, atol=1e-6,
                                   err_msg=f"draw at step {step}")  # fmt: skip
    if rank == 0:
        print("ok avg_sam", flush=True)


for mode in sys.argv[1].split(","):  # one job for every mode: torch starts once
    if mode == "avg_sam":
        avg_sam(sys.argv[3])
    elif mode == "distances":
        distances(sys.argv[3])
    elif mode == "csgd":
        csgd(sys.argv[3])
    else:
        check(mode, sys.argv[2])

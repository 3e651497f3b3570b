"""Independent recomputations of what a run logs, from the replicas themselves.

Used in one process by tests/test_instruments.py (the simulator) and on real
ranks by tests/mpi/instruments.py: each drives a trainer step by step, and
after every logged step recomputes the consensus distance in numpy (float64)
from the replicas' parameters as they are at that moment, never from what the
loop measured. ``single_model_sgd`` is C-SGD's definition: one model, plain
SGD, on the union of the replicas' batches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dsgd_mpi import schedule
from dsgd_mpi.config import Config, from_yaml
from dsgd_mpi.data import load
from dsgd_mpi.models import build_model
from dsgd_mpi.shards import ShardedLoader

#: A small run with every kind of phase: D-SGD, an exact (all-reduce) phase, D-SGD
#: again with a target that binds. 16 steps an epoch on 4 replicas.
PHASED = {
    "run": {"steps": 14, "seed": 5},
    "data": {"name": "synthetic", "synthetic_size": 512, "batch_size": 8},
    "model": {"name": "mlp"},
    "optim": {"lr": 0.05, "base_batch": 32, "milestones": [0.5]},
    "consensus": {"phases": [
        {"target": "none", "until_epoch": 0.25},
        {"target": "exact", "until_epoch": 0.5},
        {"target": "constant", "reference": 1e-6, "max_rounds": 3}]},
    "metrics": {"log_every": 1, "exact_every": 1, "eval_every": 10, "flush_every": 100},
}  # fmt: skip
#: C-SGD with plain SGD: what single-model SGD on the total batch must reproduce.
CSGD_STEPS = 20
CSGD = {
    "run": {"steps": CSGD_STEPS, "seed": 2},
    "data": {"name": "synthetic", "synthetic_size": 1024, "batch_size": 8},
    "model": {"name": "small_cnn"},
    "optim": {"lr": 0.05, "base_batch": 32, "momentum": 0.0, "weight_decay": 0.0,
              "milestones": [0.5]},
    "topology": {"name": "complete"},
    "metrics": {"log_every": 5, "exact_every": 5, "eval_every": 10, "flush_every": 100},
}  # fmt: skip


def config(body: dict, *extra: dict) -> Config:
    """A validated config from nested dicts (later ones override earlier keys)."""
    import yaml

    merged: dict = yaml.safe_load(yaml.safe_dump(body))
    for more in extra:
        for key, value in more.items():
            merged.setdefault(key, {}).update(value)
    return from_yaml(yaml.safe_dump(merged))


def xi2(params: np.ndarray) -> float:
    """(1/n) sum_i ||x_i - x̄||^2 of an (n, d) array, in float64."""
    p = np.asarray(params, dtype=np.float64)
    return float(((p - p.mean(axis=0)) ** 2).sum(axis=1).mean())


class Recorder:
    """A metrics writer that keeps the rows in memory."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.evals: list[dict] = []

    def log_step(self, row) -> None:
        self.steps.append(dict(row))

    def log_eval(self, row) -> None:
        self.evals.append(dict(row))

    def flush(self) -> None:
        pass

    def close(self, finished: bool) -> None:
        pass


def logged_and_recomputed(trainer, steps: int, gather: Callable[[], np.ndarray]) -> list:
    """Run ``steps`` steps; per logged step (row, Xi^2 recomputed from ``gather()``,
    the (n, d) parameters of every replica right after that step)."""
    recorder = Recorder()
    trainer.writer = recorder
    trainer.replicas.start(trainer.step)
    out = []
    for _ in range(steps):
        logged = len(recorder.steps)
        trainer.train_step()
        params = gather()
        if len(recorder.steps) > logged:
            out.append((recorder.steps[-1], xi2(params)))
    return out


def assert_distances_match(pairs: list, scale: float, what: str) -> None:
    """Every logged ``consensus_exact`` equals its recomputation (rtol 1e-5; near 0, to
    float32 rounding of parameters of squared norm ``scale``)."""
    assert pairs, f"{what}: no logged step"
    for row, recomputed in pairs:
        logged = row["consensus_exact"]
        tol = 1e-5 * recomputed + 1e-12 * scale
        assert abs(logged - recomputed) <= tol, (
            f"{what}: step {row['step']} (phase {row['phase']}) logged Xi^2 {logged:.6g}, "
            f"the replicas' is {recomputed:.6g}"
        )


def single_model_sgd(cfg: Config, world_size: int, steps: int) -> np.ndarray:
    """Plain SGD of one model on the union of the ``world_size`` replicas' batches, from
    the replicas' own initial model: C-SGD's definition. Returns the flat parameters."""
    assert cfg.optim.momentum == 0 and cfg.optim.weight_decay == 0 and cfg.optim.name == "sgd"
    d = cfg.data
    split, info = load(d.name, d.root, train=True, synthetic_size=d.synthetic_size,
                       seed=cfg.run.seed)  # fmt: skip
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model.name, num_classes=info.num_classes,
                        in_channels=info.in_channels, width=cfg.model.width,
                        image_size=d.resize or info.height)  # fmt: skip
    loaders = [
        ShardedLoader(split, info, rank=r, world_size=world_size, batch_size=d.batch_size,
                      partition=d.partition, alpha=d.alpha, reshuffle=d.reshuffle,
                      augment=d.augment, seed=cfg.run.seed, resize=d.resize)  # fmt: skip
        for r in range(world_size)
    ]
    timeline = schedule.Timeline(cfg, world_size, loaders[0].steps_per_epoch)
    streams = [_stream(loader) for loader in loaders]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for step in range(steps):
        batches = [next(s) for s in streams]
        images = torch.cat([b[0] for b in batches])
        labels = torch.cat([b[1] for b in batches])
        loss = F.cross_entropy(model(images), labels)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(g, alpha=-timeline.lr(step))
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy()


def _stream(loader: ShardedLoader):
    epoch = 0
    while True:
        yield from loader.batches(epoch)
        epoch += 1

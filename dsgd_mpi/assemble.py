"""Wiring the parts of a run, whatever holds the replicas (MPI ranks or one process).

``run.py`` (one replica per rank) and ``dsgd_mpi.sim`` (all replicas here)
differ in the group they pass and the replicas they ask for; the rest of a
run -- data, models, the metrics file, targets, checkpoints, the trainer -- is
built here, the same way for both.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence

import h5py
import torch

from dsgd_mpi import atomic, checkpoint, control, perturb, schedule
from dsgd_mpi import config as config_mod
from dsgd_mpi.config import Config
from dsgd_mpi.control import TargetPolicy
from dsgd_mpi.data import DatasetInfo, Split
from dsgd_mpi.evaluation.evaluate import Evaluator
from dsgd_mpi.flat import flatten
from dsgd_mpi.group import Group
from dsgd_mpi.metrics import H5Writer, NullWriter
from dsgd_mpi.models import build_model
from dsgd_mpi.replica import Replica, Replicas
from dsgd_mpi.shards import DEFAULT_MAX_DEVICE_BYTES, ShardedLoader
from dsgd_mpi.trainer import Trainer

__version__ = "0.1.0"


def run_path(cfg: Config) -> str:
    return os.path.join(cfg.run.out_dir, f"{cfg.run.name}.h5")


def existing_run_problem(cfg: Config) -> str:
    """Why a fresh run may not start here (its file exists), or "": nothing is overwritten."""
    path = run_path(cfg)
    if cfg.run.overwrite or not os.path.exists(path):
        return ""
    try:
        with h5py.File(path, "r", locking=False) as f:
            state = "a finished run" if "finished" in f.attrs else "an unfinished run"
    except OSError:
        state = "a file that is not a readable run"
    return (
        f"run.name: {path} already holds {state} named {cfg.run.name!r} and there is no "
        "checkpoint of it to resume; give this run another run.name, or pass "
        "run.overwrite=true to start over (the old file is kept as "
        f"{os.path.basename(path)}.1, .2, ...)"
    )


def start_problem(cfg: Config, world_size: int, resume: int | None) -> str:
    """Why this run may not start, or "" (the root process decides; all follow).

    A checkpoint of another recipe or world size is not continued; a run file
    that exists is never overwritten unless this launch resumes that run (its
    checkpoint) or ``run.overwrite`` moves it aside.
    """
    if resume is None:
        return existing_run_problem(cfg)
    directory = checkpoint_dir(cfg)
    state = checkpoint.load(directory, resume, 0)
    key = checkpoint.config_mismatch(state["config"], config_mod.to_yaml(cfg))
    if state["world_size"] != world_size:
        problem = f"written by {state['world_size']} replicas, this run has {world_size}"
    elif key:
        problem = f"written by a run whose {key} differs"
    else:
        return ""
    return (
        f"checkpoint.dir: {checkpoint.step_dir(directory, resume)} was {problem}; "
        "use another run.name or checkpoint.dir, or delete it to start over"
    )


def start_over(cfg: Config, run_file: bool = True) -> list[str]:
    """``run.overwrite``: move the run file (unless ``run_file`` is False) and its checkpoint
    directory to their next numbered names (nothing is deleted); what moved, as said."""
    moved = []
    if run_file:
        atomic.TwoCopies(run_path(cfg)).forget()  # hidden copies of the old file: not kept
    for path in ([run_path(cfg)] if run_file else []) + [checkpoint_dir(cfg)]:
        if os.path.exists(path):
            moved.append(f"{path} as {atomic.move_aside(path)}")
    return moved


def checkpoint_dir(cfg: Config) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.run.out_dir, cfg.run.name, "ckpt")


def make_replicas(
    cfg: Config, ranks: Sequence[int], world_size: int, train: tuple[Split, DatasetInfo],
    device: torch.device,
) -> Replicas:  # fmt: skip
    """The replicas ``ranks`` of a run of ``world_size``, each built as its MPI rank builds it.

    The training set is moved to the device once, when it fits, and shared by
    every replica here.
    """
    split, info = train
    if split.images.numel() + 8 * split.labels.numel() <= DEFAULT_MAX_DEVICE_BYTES:
        split = split.to(device)
    d = cfg.data
    items, measured = [], 0
    for rank in ranks:
        torch.manual_seed(cfg.run.seed)  # the same initial model on every replica
        model = build_model(
            cfg.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
            width=cfg.model.width, image_size=d.resize or info.height,
            pretrained=cfg.model.pretrained,
        ).to(device)  # fmt: skip
        flat, slots = flatten(model, buffers=cfg.gossip.buffers)
        params = {n for n, p in model.named_parameters() if p.requires_grad}
        measured = sum(s.numel for s in slots if s.name in params)
        loader = ShardedLoader(
            split, info, rank=rank, world_size=world_size, batch_size=d.batch_size,
            partition=d.partition, alpha=d.alpha, reshuffle=d.reshuffle, augment=d.augment,
            seed=cfg.run.seed, device=device, resize=d.resize,
        )  # fmt: skip
        items.append(Replica(rank, model, flat, measured, loader, cfg.optim, cfg.run.seed))
    return Replicas(items, measured)


def run_attrs(cfg: Config, world_size: int, backend: str, mpi_version: str) -> dict[str, object]:
    """The root attributes of a run file (DESIGN.md "HDF5 layout"), with the unit of
    ``/steps/target`` and each phase's target in words."""
    measure = cfg.consensus.measure
    return {
        "target_unit": control.target_unit(measure),
        "phase_targets": json.dumps([control.describe(s, measure) for s in schedule.phases(cfg)]),
        "config": config_mod.to_yaml(cfg), "version": __version__, "git": git_describe(),
        "mpi": mpi_version, "torch": torch.__version__, "world_size": world_size,
        "topology": cfg.topology.name, "backend": backend,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip


def make_trainer(
    cfg: Config,
    group: Group,
    replicas: Replicas,
    train: tuple[Split, DatasetInfo],
    test: tuple[Split, DatasetInfo],
    device: torch.device,
    *,
    attrs: dict[str, object],
    reference: dict[int, float],
    resume_step: int | None,
    log: Callable[[str], None],
    shadow: perturb.Shadow | None = None,
    stop: checkpoint.StopRequest | None = None,
) -> Trainer:
    """The trainer of a run, resumed from ``resume_step``'s checkpoint when given.

    ``shadow``: the D-SGD run that ``optim.perturb`` carries beside (avg-SAM).
    ``stop``: the stop request installed when the process started (``dsgd_mpi.run``
    installs it before building anything); otherwise one is installed here."""
    ckpt_dir = checkpoint_dir(cfg)
    states = [checkpoint.load(ckpt_dir, resume_step, r) for r in group.ranks] if (
        resume_step is not None) else []  # fmt: skip
    changed = checkpoint.changed_keys(states[0]["config"], attrs["config"]) if states else {}
    writer = (
        H5Writer(run_path(cfg), attrs, cfg.metrics.flush_every, resume_after_step=resume_step,
                 relaunch=changed)  # fmt: skip
        if group.root
        else NullWriter()
    )
    spe = replicas.items[0].loader.steps_per_epoch
    timeline = schedule.Timeline(cfg, group.size, spe)
    policy = TargetPolicy(timeline.spans, reference)
    stop = stop or checkpoint.StopRequest().install()
    checkpoints = checkpoint.Checkpointer(group, ckpt_dir, cfg.checkpoint.every, stop)
    split, info = test
    loaders = [item.loader for item in replicas.items]

    def bn_batches(i: int):  # metrics.bn: recompute
        return (images for images, _ in itertools.islice(loaders[i].batches(0),
                                                         cfg.metrics.bn_batches))

    evaluator = Evaluator(group, replicas.models, (split.to(device), info), train, device, cfg,
                          bn_batches)  # fmt: skip
    trainer = Trainer(cfg, group, replicas, evaluator, writer, log, policy, timeline, checkpoints,
                      perturb.build(cfg, replicas, shadow))  # fmt: skip
    if states:
        trainer.load_state_dict(states)
        log(f"resumed from {checkpoint.step_dir(ckpt_dir, resume_step)}")
    return trainer


def git_describe() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"

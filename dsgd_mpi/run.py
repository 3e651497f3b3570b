"""Train one model replica per MPI rank with decentralized SGD.

    mpirun -n 16 python -m mpi4py -m dsgd_mpi.run configs/cifar10_resnet20_ring.yaml
    mpirun -n 4  python -m mpi4py -m dsgd_mpi.run configs/quickstart.yaml optim.lr=0.05 run.seed=1

Rank 0 reads and validates the config before any rank starts work (a bad
config prints one line naming the key and every rank exits with status 2), then
broadcasts the resolved text so that every rank runs the same config. Ranks on a
node are bound to GPU ``local_rank % gpus`` (CPU without GPUs) and torch gets
``cores on the node / ranks on the node`` threads: oversubscribed ranks with
default threads ran ~80x slower. An exception on any rank aborts the whole job
with the rank and the reason.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from dsgd_mpi import checkpoint, schedule
from dsgd_mpi import comm as mpi
from dsgd_mpi import config as config_mod
from dsgd_mpi.config import Config, ConfigError
from dsgd_mpi.control import TargetPolicy, reference_maxima
from dsgd_mpi.data import DataError, load
from dsgd_mpi.flat import FlatError, flatten
from dsgd_mpi.metrics import H5Writer, NullWriter
from dsgd_mpi.models import build_model
from dsgd_mpi.shards import ShardedLoader
from dsgd_mpi.trainer import Trainer

__version__ = "0.1.0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd_mpi.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("config", nargs="?", help="YAML config (defaults when omitted)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.05"
    )
    args = parser.parse_args(argv)
    comm = mpi.WORLD
    return guarded(comm, lambda: run_config(comm, args.config, args.overrides))


def run_config(comm: mpi.Comm, path: str | None, overrides: list[str]) -> int:
    """One run from a config file and overrides: 0 when done, 2 on a bad config."""
    agreed = _agree_on_config(comm, path, overrides)
    if agreed is None:
        return 2
    return _train(comm, *agreed)


def guarded(comm: mpi.Comm, work: Callable[[], int]) -> int:
    """Run ``work`` so that a failure on any rank takes the whole job down, naming the rank."""
    try:
        return work()
    except ConfigError as exc:  # raised on every rank alike (e.g. a checkpoint of another config)
        if comm.Get_rank() == 0:
            print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (DataError, FlatError) as exc:  # bad input discovered while building: no traceback wall
        sys.stderr.write(f"[rank {comm.Get_rank()}] {type(exc).__name__}: {exc}\n")
        comm.Abort(2)
    except BaseException as exc:  # noqa: BLE001 - any failure must take the whole job down
        mpi.abort_on_exception(comm, exc)
    return 1


def _agree_on_config(
    comm: mpi.Comm, path: str | None, overrides: list[str]
) -> tuple[Config, dict[int, float]] | None:
    """Rank 0 validates; everyone gets the same resolved text and reference maxima, or exits 2."""
    message: tuple[str, str, dict] = ("", "", {})
    if comm.Get_rank() == 0:
        try:
            cfg = config_mod.load_config(path, overrides)
            config_mod.check_world(cfg, comm.Get_size())
            message = ("", config_mod.to_yaml(cfg), reference_maxima(cfg, comm.Get_size()))
        except ConfigError as exc:
            message = (str(exc), "", {})
    error, text, maxima = comm.bcast(message, root=0)  # small control data: config text
    if error:
        if comm.Get_rank() == 0:
            print(f"config error: {error}", file=sys.stderr)
        return None
    return config_mod.from_yaml(text), maxima


EXIT_STOPPED = 3  # stopped by a signal after a checkpoint: relaunch the same command to resume


def _train(comm: mpi.Comm, cfg: Config, reference: dict[int, float]) -> int:
    trainer, path = build_trainer(comm, cfg, reference)
    watchdog = mpi.watch_peers(comm)
    try:
        result = trainer.run()
    finally:
        trainer.checkpoints.stop.uninstall()
    watchdog.stop()  # every rank disarms before anyone may exit (see watchdog.Watchdog)
    comm.Barrier()
    if result is None:
        where = checkpoint.step_dir(trainer.checkpoints.directory, trainer.step)
        trainer.log(
            f"stopped by {trainer.checkpoints.stop.name} at step {trainer.step}: checkpoint in "
            f"{where}; run the same command to resume"
        )
        return EXIT_STOPPED
    trainer.log(
        f"done: averaged model test accuracy {100 * result['test_acc']:.2f}%  metrics in {path}"
    )
    return 0


def build_trainer(
    comm: mpi.Comm, cfg: Config, reference: dict[int, float] | None = None
) -> tuple[Trainer, str]:
    """Every component of a run, wired together; returns the trainer and the HDF5 path."""
    rank, n = comm.Get_rank(), comm.Get_size()
    local_rank, local_size = mpi.node_local(comm)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    gpus = torch.cuda.device_count()
    device = torch.device(f"cuda:{local_rank % gpus}" if gpus else "cpu")
    if gpus:
        torch.cuda.set_device(device)
    log = print if rank == 0 else (lambda *a, **k: None)

    torch.manual_seed(cfg.run.seed)  # the same initial model on every rank
    d = cfg.data
    train, info = load(d.name, d.root, train=True, download=d.download,
                       synthetic_size=d.synthetic_size, seed=cfg.run.seed)  # fmt: skip
    test = load(d.name, d.root, train=False, download=d.download,
                synthetic_size=d.synthetic_size, seed=cfg.run.seed)  # fmt: skip
    loader = ShardedLoader(
        train, info, rank=rank, world_size=n, batch_size=d.batch_size, partition=d.partition,
        alpha=d.alpha, reshuffle=d.reshuffle, augment=d.augment, seed=cfg.run.seed, device=device,
    )  # fmt: skip
    model = build_model(cfg.model.name, num_classes=info.num_classes,
                        in_channels=info.in_channels, width=cfg.model.width).to(device)  # fmt: skip
    flat, _ = flatten(model, buffers=cfg.gossip.buffers)

    path = os.path.join(cfg.run.out_dir, f"{cfg.run.name}.h5")
    attrs = {
        "config": config_mod.to_yaml(cfg), "version": __version__, "git": _git_describe(),
        "mpi": mpi.library_version(), "torch": torch.__version__, "world_size": n,
        "topology": cfg.topology.name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.run.out_dir, cfg.run.name, "ckpt")
    resume_step, state = _resume(comm, cfg, ckpt_dir)
    writer = (
        H5Writer(path, attrs, cfg.metrics.flush_every, resume_after_step=resume_step)
        if rank == 0
        else NullWriter()
    )
    log(
        f"dsgd_mpi: {n} ranks, {cfg.topology.name}, {cfg.model.name} ({flat.numel():,} params) "
        f"on {d.name}, {loader.steps_per_epoch} steps/epoch, {device}, metrics -> {path}"
    )
    policy = TargetPolicy(schedule.phases(cfg), reference or {})
    stop = checkpoint.StopRequest().install()
    checkpoints = checkpoint.Checkpointer(comm, ckpt_dir, cfg.checkpoint.every, stop)
    trainer = Trainer(cfg, comm, model, flat, loader, test, writer, log, device, policy,
                      checkpoints)  # fmt: skip
    if state is not None:
        trainer.load_state_dict(state)
        log(f"resumed from {checkpoint.step_dir(ckpt_dir, resume_step)}")
    return trainer, path


def _resume(comm: mpi.Comm, cfg: Config, directory: str) -> tuple[int | None, dict | None]:
    """The latest checkpoint complete on all ranks, if it belongs to this config (collective)."""
    step = checkpoint.agree_on_resume(comm, directory)
    if step is None:
        return None, None
    state = checkpoint.load(directory, step, comm.Get_rank())
    problem = ""
    if comm.Get_rank() == 0:
        key = checkpoint.config_mismatch(state["config"], config_mod.to_yaml(cfg))
        if state["world_size"] != comm.Get_size():
            problem = f"written by {state['world_size']} ranks, this job has {comm.Get_size()}"
        elif key:
            problem = f"written by a run whose {key} differs"
    problem = comm.bcast(problem, root=0)  # small control data
    if problem:
        raise ConfigError(
            "checkpoint.dir",
            f"{checkpoint.step_dir(directory, step)} was {problem}; "
            "use another run.name or checkpoint.dir, or delete it to start over",
        )
    return step, state


def _git_describe() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())

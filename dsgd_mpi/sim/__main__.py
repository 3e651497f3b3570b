"""Run a config with N replicas in one process (see :mod:`dsgd_mpi.sim`).

    python -m dsgd_mpi.sim configs/quickstart.yaml --workers 4
    python -m dsgd_mpi.sim configs/quickstart.yaml --workers 16 --mode reference run.seed=1

Exit status as ``dsgd_mpi.run``: 0 done, 2 bad input (config, --workers the
topology cannot serve, a run file that exists), 3 stopped by SIGTERM/SIGUSR1
after a checkpoint (run the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from dsgd_mpi import assemble, checkpoint, perturb
from dsgd_mpi import config as config_mod
from dsgd_mpi.allocator import keep_freed_memory
from dsgd_mpi.config import ConfigError
from dsgd_mpi.control import reference_maxima
from dsgd_mpi.data import DataError, load
from dsgd_mpi.launch import threads_for
from dsgd_mpi.replica import Replicas
from dsgd_mpi.sim.group import SimGroup
from dsgd_mpi.trainer import Trainer

EXIT_BAD_INPUT, EXIT_STOPPED = 2, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd_mpi.sim", description=__doc__.splitlines()[0]
    )
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--workers", type=int, required=True, help="replicas (the world size)")
    parser.add_argument("--mode", choices=("fast", "reference"), default="fast",
                        help="fast: batched replicas; reference: the MPI ranks' arithmetic")
    # Intermixed: DESIGN.md's `CONFIG --workers N key=value ...` puts overrides after the option.
    args = parser.parse_intermixed_args(argv)
    return run_config(args.config, args.overrides, args.workers, args.mode)


def run_config(path: str | None, overrides: list[str], workers: int, mode: str = "fast") -> int:
    """One simulated run from a config file and overrides: 0 done, 2 bad input, 3 stopped.

    The simulator's counterpart of ``dsgd_mpi.run.run_config``, so that a plan
    (``python -m dsgd_mpi.study --sim N``) runs its lines in this process.
    """
    try:
        cfg = config_mod.load_config(path, overrides)
        config_mod.check_world(cfg, workers)
        reference = reference_maxima(cfg, workers)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    group = SimGroup(workers)
    resume = checkpoint.agree_on_resume(group, assemble.checkpoint_dir(cfg))
    problem = assemble.start_problem(cfg, workers, resume)
    if problem:
        print(f"config error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return _train(cfg, group, mode, reference, resume)
    except (DataError, ConfigError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def build(cfg, workers: int, mode: str = "fast", reference: dict | None = None,
          resume: int | None = None, log=print) -> Trainer:  # fmt: skip
    """Every replica of the run in this process, wired into a trainer (``run.build``'s twin)."""
    # The reference mode must compute what an MPI rank computes, which runs one
    # thread when oversubscribed (and torch's CPU kernels may sum differently per
    # thread count); the fast mode takes the CPUs it is given.
    threads = 1 if mode == "reference" else threads_for(os.environ, [_cpus()])[0]
    torch.set_num_threads(threads)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        keep_freed_memory()  # big activations would page-fault on every step otherwise
    d = cfg.data
    train, test = (
        load(d.name, d.root, train=split, download=d.download, synthetic_size=d.synthetic_size,
             seed=cfg.run.seed, train_size=d.train_size)  # fmt: skip
        for split in (True, False)
    )
    replicas, group = _replicas(cfg, workers, mode, train, device)
    shadow = None
    if perturb.carries_dsgd(cfg):  # the D-SGD run that avg-SAM imitates, beside this one
        shadow = perturb.Shadow(cfg, *_replicas(cfg, workers, mode, train, device)[::-1])
    attrs = assemble.run_attrs(cfg, group.size, "sim", "none")
    attrs["sim_mode"] = mode
    trainer = assemble.make_trainer(cfg, group, replicas, train, test, device, attrs=attrs,
                                    reference=reference or {}, resume_step=resume, log=log,
                                    shadow=shadow)  # fmt: skip
    log(
        f"dsgd_mpi.sim ({mode}): {group.size} replicas, {cfg.topology.name}, {cfg.model.name} "
        f"({replicas.measured:,} params) on {d.name}, {trainer.spe} steps/epoch, {device}, "
        f"{threads} thread(s), metrics -> {assemble.run_path(cfg)}"
    )
    return trainer


def _replicas(cfg, workers: int, mode: str, train, device) -> tuple[Replicas, SimGroup]:
    """Every replica, as MPI ranks build them (reference) or as one stack (fast), and the
    group that mixes them."""
    ranks = list(range(workers))
    if mode == "reference":
        return assemble.make_replicas(cfg, ranks, workers, train, device), SimGroup(workers)
    from dsgd_mpi.sim.fast import make_fast_replicas

    replicas = make_fast_replicas(cfg, ranks, workers, train, device)
    return replicas, SimGroup(workers, stack=replicas.stack)


def _train(cfg, group: SimGroup, mode: str, reference: dict, resume: int | None) -> int:
    log = lambda message: print(message, flush=True)  # noqa: E731
    trainer = build(cfg, group.size, mode, reference, resume, log)
    path = assemble.run_path(cfg)
    try:
        result = trainer.run()
    finally:
        trainer.checkpoints.stop.uninstall()
    if result is None:
        where = checkpoint.step_dir(trainer.checkpoints.directory, trainer.step)
        log(f"stopped by {trainer.checkpoints.stop.name} at step {trainer.step}: checkpoint in "
            f"{where}; run the same command to resume")  # fmt: skip
        return EXIT_STOPPED
    log(f"done: averaged model test accuracy {100 * result['test_acc']:.2f}%  metrics in {path}")
    return 0


def _cpus() -> frozenset[int]:
    return frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


if __name__ == "__main__":
    raise SystemExit(main())

"""Train one model replica per MPI rank with decentralized SGD.

    mpirun -n 16 python -m mpi4py -m dsgd_mpi.run configs/cifar10_resnet20_ring.yaml
    mpirun -n 4  python -m mpi4py -m dsgd_mpi.run configs/quickstart.yaml optim.lr=0.05 run.seed=1

Before ``MPI_Init`` a launcher whose PMI the loaded MPI lacks is refused (exit 2,
naming both), and the GPU is chosen from the launcher's local rank. Rank 0 then
validates everything that can be wrong before any rank works (the config, the
files it names, the reference runs, the checkpoint to resume, the pretrained
weights) and broadcasts one verdict, so that every rank exits 2 together on bad
input, with one line naming the key. Codes every rank agrees on (0, 2, 3) leave
through ``MPI_Finalize``, so that the launcher and Slurm see them. Anything
that fails later, on any rank, aborts the whole job with the rank and the
reason: no rank is ever left waiting in a collective. Ranks on a node use GPU
``local_rank % gpus`` (CPU without GPUs) and get torch threads from their CPU
affinity mask.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

import torch

from dsgd_mpi import assemble, checkpoint, perturb
from dsgd_mpi import comm as mpi
from dsgd_mpi import config as config_mod
from dsgd_mpi.allocator import keep_freed_memory
from dsgd_mpi.config import Config, ConfigError
from dsgd_mpi.control import reference_maxima
from dsgd_mpi.data import DataError, fetch_once, load
from dsgd_mpi.flat import FlatError
from dsgd_mpi.launch import (
    announced_rank,
    launch_mismatch,
    local_rank,
    oversubscribed_mpich_hint,
    pmi_mismatch,
    threads_for,
)
from dsgd_mpi.models import fetch_pretrained
from dsgd_mpi.ranks import MpiGroup
from dsgd_mpi.trainer import Trainer

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3  # stopped by a signal after a checkpoint: relaunch the same command to resume


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd_mpi.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("config", nargs="?", help="YAML config (defaults when omitted)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.05"
    )
    args = parser.parse_args(argv)
    # Before MPI_Init: from now on SIGTERM/SIGUSR1 is a stop request (during the data and
    # model build it would otherwise kill the rank, and Slurm's warning would be lost); a
    # launcher whose PMI this MPI lacks is refused in words (MPI_Init would abort without
    # any); the GPU follows the launcher's local rank (some MPIs bind CUDA in MPI_Init).
    stop = checkpoint.StopRequest().install()
    problem = pmi_mismatch(os.environ, mpi.library_version(full=True))
    if problem:
        if announced_rank(os.environ) in (None, 0):
            print(f"launch error: {problem}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    bind_gpu(local_rank(os.environ))
    comm = mpi.init()
    code = guarded(comm, lambda: run_config(comm, args.config, args.overrides, stop))
    mpi.finalize()  # every rank returns the same code: let the launcher see it (not Abort)
    return code


def run_config(
    comm: mpi.Comm, path: str | None, overrides: list[str],
    stop: checkpoint.StopRequest | None = None,
) -> int:  # fmt: skip
    """One run from a config file and overrides: 0 when done, 2 on bad input, 3 if stopped."""
    problem = launch_mismatch(os.environ, comm.Get_size())
    if problem:
        print(f"launch error: {problem}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    agreed = _agree_on_config(comm, path, overrides)
    if agreed is None:
        return EXIT_BAD_INPUT
    cfg, reference = agreed
    if cfg.run.overwrite:
        _start_over(comm, cfg)
    group = MpiGroup(comm, mpi.TensorPort("cpu", staged=False))
    resume = checkpoint.agree_on_resume(group, assemble.checkpoint_dir(cfg))
    if not _agree(comm, lambda: assemble.start_problem(cfg, comm.Get_size(), resume)):
        return EXIT_BAD_INPUT
    if cfg.model.pretrained and not _fetch_weights(comm, cfg):
        return EXIT_BAD_INPUT
    return _train(comm, cfg, reference, resume, stop or checkpoint.StopRequest().install())


def guarded(comm: mpi.Comm, work: Callable[[], int]) -> int:
    """Run ``work`` so that a failure on any rank takes the whole job down, naming the rank.

    Bad input found before training is agreed on by every rank and returned as
    2 by all of them. An error raised on some ranks only (a file one node cannot
    see) would leave the others waiting in a collective: it aborts the job.
    """
    try:
        return work()
    except (ConfigError, DataError, FlatError) as exc:  # bad input found while building
        sys.stderr.write(f"[rank {comm.Get_rank()}] {type(exc).__name__}: {exc}\n")
        mpi.abort(comm, EXIT_BAD_INPUT)
    except BaseException as exc:  # noqa: BLE001 - any failure must take the whole job down
        mpi.abort_on_exception(comm, exc)
    return 1


def _agree(comm: mpi.Comm, check: Callable[[], str]) -> bool:
    """Rank 0 runs ``check`` (an error message or ""); every rank learns the verdict."""
    error = ""
    if comm.Get_rank() == 0:
        try:
            error = check()
        except ConfigError as exc:
            error = str(exc)
    error = comm.bcast(error, root=0)  # small control data: one message
    if error and comm.Get_rank() == 0:
        print(f"config error: {error}", file=sys.stderr, flush=True)
    return not error


def _start_over(comm: mpi.Comm, cfg: Config) -> None:
    """``run.overwrite``: the old run file and its checkpoints move aside before anything
    looks for a checkpoint to resume (collective). Rank 0 moves them; then a rank per node
    that still sees a checkpoint directory (node-local disks) moves its own."""
    node_rank, _ = mpi.node_local(comm)
    if comm.Get_rank() == 0:
        for moved in assemble.start_over(cfg):
            print(f"run.overwrite: kept the old {moved}", flush=True)
    comm.Barrier()
    if node_rank == 0 and comm.Get_rank() != 0:
        assemble.start_over(cfg, run_file=False)
    comm.Barrier()


def _fetch_weights(comm: mpi.Comm, cfg: Config) -> bool:
    """``model.pretrained``: the weight file, downloaded once per file system (rank 0, then
    a rank per node that still lacks it) before training; False, said once, when that fails
    (every rank agrees: no rank is left waiting for one that could not download)."""
    node_rank, _ = mpi.node_local(comm)
    name, rank = cfg.model.name, comm.Get_rank()
    error = fetch_pretrained(name) if rank == 0 else ""
    error = comm.bcast(error, root=0)  # small control data: one message
    if not error:
        mine = fetch_pretrained(name) if node_rank == 0 and rank != 0 else ""
        error = next((e for e in comm.allgather(mine) if e), "")  # small control data
    if error and rank == 0:
        print(f"config error: model.pretrained: {error}", file=sys.stderr, flush=True)
    return not error


def _agree_on_config(
    comm: mpi.Comm, path: str | None, overrides: list[str]
) -> tuple[Config, dict[int, float]] | None:
    """Rank 0 validates; everyone gets the same resolved text and reference maxima, or None.

    The other ranks only parse the broadcast text: nothing they see (files, the
    environment) can make them disagree with rank 0.
    """
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
            print(f"config error: {error}", file=sys.stderr, flush=True)
        return None
    return config_mod.from_yaml(text), maxima


def build(
    comm: mpi.Comm, cfg: Config, reference: dict[int, float] | None = None,
    resume: int | None = None, stop: checkpoint.StopRequest | None = None,
) -> Trainer:  # fmt: skip
    """This rank's replica and everything around it, wired into a trainer (collective)."""
    rank, n = comm.Get_rank(), comm.Get_size()
    log = _printer(rank == 0)
    device, port = device_and_port(comm, cfg, log)
    group = MpiGroup(comm, port)
    d = cfg.data
    # With data.download every rank calls load twice (collectives): rank 0 downloads,
    # then one rank per node that still cannot see the files; the others wait.
    node_rank, _ = mpi.node_local(comm)
    once = functools.partial(fetch_once, rank0=rank == 0, node_leader=node_rank == 0,
                             barrier=comm.Barrier)  # fmt: skip
    train, test = (
        load(d.name, d.root, train=split, download=d.download, synthetic_size=d.synthetic_size,
             seed=cfg.run.seed, coordinate=once, train_size=d.train_size)  # fmt: skip
        for split in (True, False)
    )
    replicas = assemble.make_replicas(cfg, [rank], n, train, device)
    shadow = None
    if perturb.carries_dsgd(cfg):  # the D-SGD run that avg-SAM imitates, beside this one
        shadow = perturb.Shadow(cfg, group, assemble.make_replicas(cfg, [rank], n, train, device))
    attrs = assemble.run_attrs(cfg, n, "mpi", mpi.library_version())
    trainer = assemble.make_trainer(cfg, group, replicas, train, test, device, attrs=attrs,
                                    reference=reference or {}, resume_step=resume, log=log,
                                    shadow=shadow, stop=stop)  # fmt: skip
    log(
        f"dsgd_mpi: {n} ranks, {cfg.topology.name}, {cfg.model.name} "
        f"({replicas.measured:,} params) on {d.name}, {trainer.spe} steps/epoch, {device}, "
        f"metrics -> {assemble.run_path(cfg)}"
    )
    return trainer


def _train(
    comm: mpi.Comm, cfg: Config, reference: dict[int, float], resume: int | None,
    stop: checkpoint.StopRequest,
) -> int:  # fmt: skip
    trainer = build(comm, cfg, reference, resume, stop)
    log, path = trainer.log, assemble.run_path(cfg)
    watchdog = mpi.watch_peers(comm)
    try:
        result = trainer.run()
    finally:
        trainer.checkpoints.stop.uninstall()
    watchdog.stop()  # every rank disarms before anyone may exit (see watchdog.Watchdog)
    comm.Barrier()
    if result is None:
        where = checkpoint.step_dir(trainer.checkpoints.directory, trainer.step)
        log(
            f"stopped by {trainer.checkpoints.stop.name} at step {trainer.step}: checkpoint in "
            f"{where}; run the same command to resume"
        )
        return EXIT_STOPPED
    log(f"done: averaged model test accuracy {100 * result['test_acc']:.2f}%  metrics in {path}")
    return 0


def _printer(on: bool) -> Callable[[str], None]:
    """Rank 0's progress lines, flushed one by one (Slurm buffers a job's output otherwise)."""
    if not on:
        return lambda message: None
    return lambda message: print(message, flush=True)


def device_and_port(
    comm: mpi.Comm, cfg: Config, log: Callable[[str], None]
) -> tuple[torch.device, mpi.TensorPort]:
    """This rank's device and torch threads, and how its tensors reach MPI (logged with why)."""
    mpi_local, local_size = mpi.node_local(comm)
    announced = local_rank(os.environ)  # what bind_gpu used before MPI_Init, if anything
    local = mpi_local if announced is None else announced
    affinities = mpi.node_affinities(comm)  # collective: every rank calls it once
    threads, why = threads_for(os.environ, affinities)
    torch.set_num_threads(threads)
    gpus = torch.cuda.device_count()
    if gpus and local_size > gpus and mpi_local == 0:
        print(
            f"warning: {local_size} ranks on {os.uname().nodename} share {gpus} GPU(s); "
            "launch one rank per GPU",
            file=sys.stderr, flush=True,
        )  # fmt: skip
    device = torch.device(f"cuda:{local % gpus}" if gpus else "cpu")
    if gpus:
        torch.cuda.set_device(device)
    log(f"torch threads per rank: {threads} ({why})")
    hint = oversubscribed_mpich_hint(os.environ, mpi.library_version(), affinities)
    if hint and mpi_local == 0:
        print(f"warning: {hint}", file=sys.stderr, flush=True)
    if device.type == "cpu":
        keep_freed_memory()  # big activations would page-fault on every step otherwise
        return device, mpi.TensorPort(device, staged=False)
    choice = cfg.gossip.device_buffers
    aware, reason = mpi.cuda_aware()
    direct = choice == "on" or (choice == "auto" and aware)
    how = "handed to MPI directly" if direct else "staged through pinned host memory"
    because = f"gossip.device_buffers={choice}" + ("" if choice != "auto" else f": {reason}")
    log(f"device buffers: {how} ({because})")
    return device, mpi.TensorPort(device, staged=not direct)


def bind_gpu(local: int | None) -> None:
    """Make GPU ``local % gpus`` this process's current device before MPI_Init (no-op on CPU
    or without a launcher's local rank); the context is created now, so that an MPI that
    sets up CUDA inside MPI_Init finds this device and not GPU 0."""
    if local is None or not torch.cuda.is_available():
        return
    device = torch.device("cuda", local % torch.cuda.device_count())
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)  # creates the context on this device


if __name__ == "__main__":
    raise SystemExit(main())

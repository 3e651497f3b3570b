"""Run a plan of several configs inside ONE MPI job (torch starts once per world size).

    mpirun -n 16 python -m mpi4py -m dsgd_mpi.study configs/study/fmnist/plan_n16.txt
    mpirun -n 4  python -m mpi4py -m dsgd_mpi.study PLAN.txt data.root=/data/fmnist --force

A plan has one run per line, ``CONFIG.yaml [key.path=value ...]`` (blank and
``#`` lines skipped), the format of jobs/sweeps/*.txt; overrides given after the
plan are added to every run. Runs go in order, so
uncontrolled reference runs must come before the controlled runs that name
them in ``reference_run``. Each run is ``dsgd_mpi.run.run_config`` inside
``dsgd_mpi.run.guarded``: a failure on any rank aborts the whole job, as a
single run would. A run whose HDF5 file is finished and holds the same resolved
config is skipped (``--force`` runs it again), so a plan that stopped resumes.

Rank 0 writes each run's own log beside its HDF5 file (``NAME.log``) and prints
one line per run here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass

from dsgd_mpi import comm as mpi
from dsgd_mpi import config as config_mod
from dsgd_mpi.config import ConfigError
from dsgd_mpi.run import guarded, run_config


@dataclass(frozen=True)
class Entry:
    """One line of a plan."""

    config: str
    overrides: tuple[str, ...]


def read_plan(path: str) -> list[Entry]:
    """The runs of a plan file, in order."""
    with open(path, encoding="utf-8") as fh:
        lines = [ln.split() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    return [Entry(words[0], tuple(words[1:])) for words in lines]


def _resolved(entry: Entry) -> config_mod.Config | None:
    try:
        return config_mod.load_config(entry.config, list(entry.overrides))
    except ConfigError:
        return None  # run_config reports it


def done_before(cfg: config_mod.Config | None) -> str | None:
    """The HDF5 path if this exact run already finished there, else None (rank 0)."""
    import h5py

    if cfg is None:
        return None
    path = os.path.join(cfg.run.out_dir, f"{cfg.run.name}.h5")
    try:
        with h5py.File(path, "r", locking=False) as f:
            same = str(f.attrs.get("config", "")) == config_mod.to_yaml(cfg)
            return path if same and "finished" in f.attrs else None
    except OSError:
        return None


def log_path(cfg: config_mod.Config | None) -> str | None:
    return None if cfg is None else os.path.join(cfg.run.out_dir, f"{cfg.run.name}.log")


def run_plan(comm: mpi.Comm, entries: list[Entry], force: bool = False) -> int:
    """Every run of the plan in order; stops at the first one that does not return 0."""
    rank = comm.Get_rank()
    say = print if rank == 0 else (lambda *a, **k: None)
    start = time.perf_counter()
    for i, entry in enumerate(entries, start=1):
        what = " ".join([entry.config, *entry.overrides])
        cfg = _resolved(entry) if rank == 0 else None  # rank 0 reads files; the rest follow
        skip = comm.bcast(None if force or rank else done_before(cfg), root=0)
        if skip:
            say(f"[{i}/{len(entries)}] skip (finished, same config): {skip}", flush=True)
            continue
        t0 = time.perf_counter()
        logfile = log_path(cfg)
        with _redirected(logfile):
            status = guarded(comm, lambda e=entry: run_config(comm, e.config, list(e.overrides)))
        took = time.perf_counter() - t0
        if status != 0:
            say(f"[{i}/{len(entries)}] FAILED (status {status}): {what}", flush=True)
            if logfile and os.path.exists(logfile):
                with open(logfile, encoding="utf-8") as fh:
                    sys.stdout.write(fh.read()[-2000:])
            return status
        last = _last_line(logfile)
        say(f"[{i}/{len(entries)}] {took:6.1f}s  {what}\n        {last}", flush=True)
    say(f"plan done: {len(entries)} runs in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


@contextlib.contextmanager
def _redirected(path: str | None):
    """Rank 0's prints of one run go to its log file; config errors stay on stderr."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
        yield


def _last_line(path: str | None) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as fh:
        lines = [ln.rstrip() for ln in fh if ln.strip()]
    return lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd_mpi.study", description=__doc__.splitlines()[0]
    )
    parser.add_argument("plan", help="plan file: one 'CONFIG [key=value ...]' per line")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    parser.add_argument("--force", action="store_true", help="rerun finished runs too")
    args = parser.parse_args(argv)
    comm = mpi.WORLD
    entries: list[Entry] | None = None
    error = ""
    if comm.Get_rank() == 0:
        try:
            entries = [Entry(e.config, e.overrides + tuple(args.overrides))
                       for e in read_plan(args.plan)]  # fmt: skip
        except OSError as exc:
            error = f"{args.plan}: cannot read plan: {exc.strerror}"
    entries, error = comm.bcast((entries, error), root=0)
    if error:
        if comm.Get_rank() == 0:
            print(f"study error: {error}", file=sys.stderr)
        return 2
    return run_plan(comm, entries or [], force=args.force)


if __name__ == "__main__":
    raise SystemExit(main())

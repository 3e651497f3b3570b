"""Plans: several runs, one per line, run in order by one job (see :mod:`dsgd_mpi.study`).

A plan has one run per line, ``CONFIG.yaml [key.path=value ...]`` (blank and
``#`` lines skipped), the format of jobs/sweeps/*.txt. This module holds what
does not depend on who trains (MPI ranks or the one-process simulator): reading
a plan, deciding that a run already finished, each run's log file, and the loop
that runs the lines in order and stops at the first failure.

Pure: no MPI, no torch (h5py only, to look at finished run files).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dsgd_mpi import config as config_mod
from dsgd_mpi.config import ConfigError


@dataclass(frozen=True)
class Entry:
    """One line of a plan."""

    config: str
    overrides: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join([self.config, *self.overrides])


def read_plan(path: str, extra: tuple[str, ...] = ()) -> list[Entry]:
    """The runs of a plan file, in order, each with ``extra`` overrides appended."""
    with open(path, encoding="utf-8") as fh:
        lines = [ln.split() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    return [Entry(words[0], (*words[1:], *extra)) for words in lines]


def resolved(entry: Entry) -> config_mod.Config | None:
    """The entry's config, or None when it is invalid (the run itself then reports why)."""
    try:
        return config_mod.load_config(entry.config, list(entry.overrides))
    except ConfigError:
        return None


def done_before(cfg: config_mod.Config | None) -> str | None:
    """The HDF5 path if this exact run already finished there, else None.

    "This exact run": the file is marked finished and holds the same resolved
    config, so a plan that stopped half-way resumes where it stopped, and a
    changed config (another recipe, another seed) is never mistaken for done.
    """
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
    """Where a run's own output goes: ``NAME.log`` beside its HDF5 file."""
    return None if cfg is None else os.path.join(cfg.run.out_dir, f"{cfg.run.name}.log")


def run_plan(
    entries: list[Entry],
    run_one: Callable[[Entry], int],
    *,
    root: bool = True,
    agree: Callable[[Any], Any] = lambda value: value,
    force: bool = False,
) -> int:
    """Every run of the plan in order; stops at the first one that does not return 0.

    ``run_one(entry)`` trains one run and returns its exit status. Under MPI every
    rank calls this: ``root`` is rank 0 (it alone reads files and prints) and
    ``agree`` broadcasts rank 0's value, so that all ranks skip the same runs;
    the simulator is its own root and agrees with itself. Each run's output goes
    to its log file; here one line per run, and the log's tail when a run fails.
    """
    say = print if root else (lambda *a, **k: None)
    start = time.perf_counter()
    for i, entry in enumerate(entries, start=1):
        cfg = resolved(entry) if root else None
        skip = agree(None if force or not root else done_before(cfg))
        if skip:
            say(f"[{i}/{len(entries)}] skip (finished, same config): {skip}", flush=True)
            continue
        t0 = time.perf_counter()
        logfile = log_path(cfg)
        with redirected(logfile):
            status = run_one(entry)
        took = time.perf_counter() - t0
        if status != 0:
            say(f"[{i}/{len(entries)}] FAILED (status {status}): {entry}", flush=True)
            if root and logfile and os.path.exists(logfile):
                with open(logfile, encoding="utf-8") as fh:
                    sys.stdout.write(fh.read()[-2000:])
            return status
        say(f"[{i}/{len(entries)}] {took:6.1f}s  {entry}\n        {last_line(logfile)}",
            flush=True)  # fmt: skip
    say(f"plan done: {len(entries)} runs in {time.perf_counter() - start:.0f}s", flush=True)
    return 0


@contextlib.contextmanager
def redirected(path: str | None) -> Iterator[None]:
    """The root's prints of one run go to its log file; config errors stay on stderr."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
        yield


def last_line(path: str | None) -> str:
    """The last non-empty line of a run's log ("done: ..." when it finished)."""
    if not path or not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as fh:
        lines = [ln.rstrip() for ln in fh if ln.strip()]
    return lines[-1] if lines else ""

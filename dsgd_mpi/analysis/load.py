"""One run file into a :class:`Run` of pandas DataFrames.

Files are opened read-only without HDF5 file locking, so a running job (which
opens, appends and closes the file at every flush) can be read at the same
time. A read that fails with ``OSError`` -- as it may in the middle of a flush
-- is retried once after half a second. Datasets of one group that differ in
length (a reader that caught a flush half-way) are cut to the shortest.

    run = load_run("runs/quickstart.h5")
    run.steps.plot(x="step", y="consensus_estimate", logy=True)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import pandas as pd
import yaml

from dsgd_mpi.metrics import EVAL_FIELDS, STEP_FIELDS

RETRY_DELAY = 0.5
"""Seconds to wait before the one retry of a read that failed with OSError."""


class LoadError(Exception):
    """A run file that cannot be analysed; ``str(exc)`` says which file and why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True, eq=False)
class Run:
    """Everything one run file holds."""

    path: str
    """File the run was read from."""
    name: str
    """``run.name`` from the config, or the file stem when there is none."""
    attrs: dict[str, Any]
    """Root attributes (config, version, git, mpi, torch, world_size, topology, ...)."""
    config: dict[str, Any]
    """The resolved config (``yaml.safe_load`` of ``attrs['config']``; ``{}`` if absent)."""
    steps: pd.DataFrame
    """One row per logged step; at least the ``STEP_FIELDS`` columns."""
    eval: pd.DataFrame
    """One row per evaluation; at least the ``EVAL_FIELDS`` columns."""
    ranks: pd.DataFrame | None
    """Per-rank arrays in long form (columns row, rank, <field>...), or None."""
    eval_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    """2-D ``/eval`` fields (evaluation x bin): the reliability diagrams."""

    @property
    def world_size(self) -> int | None:
        n = self.attrs.get("world_size")
        return int(n) if n is not None else None

    @property
    def topology(self) -> str | None:
        t = self.attrs.get("topology", self.config.get("topology", {}).get("name"))
        return None if t is None else str(t)

    @property
    def finished(self) -> bool:
        return "finished" in self.attrs


def load_run(path: str | os.PathLike[str], retry_delay: float | None = None) -> Run:
    """Read one run file; raises :class:`LoadError` if it is unreadable or has no /steps.

    A read that fails with OSError is retried once after ``retry_delay``
    seconds (default :data:`RETRY_DELAY`).
    """
    path = os.fspath(path)
    delay = RETRY_DELAY if retry_delay is None else retry_delay
    for attempt in (0, 1):
        try:
            return _read(path)
        except OSError as exc:  # also what a reader may see in the middle of a flush
            if attempt:
                raise LoadError(path, _reason(exc)) from exc
            time.sleep(delay)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:  # corrupt objects
            raise LoadError(path, f"corrupt run file ({type(exc).__name__}: {exc})") from exc
    raise AssertionError("unreachable")


def steps_frame(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The ``/steps`` table of one run file."""
    return load_run(path).steps


def eval_frame(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The ``/eval`` table of one run file."""
    return load_run(path).eval


# ------------------------------------------------------------------ internals


def _read(path: str) -> Run:
    with h5py.File(path, "r", locking=False) as f:
        if "steps" not in f or not isinstance(f["steps"], h5py.Group):
            raise LoadError(path, "no /steps group (not a dsgd_mpi run file?)")
        attrs = {key: _py(value) for key, value in f.attrs.items()}
        steps = _table(f["steps"], STEP_FIELDS)
        group = f["eval"] if isinstance(f.get("eval"), h5py.Group) else None
        evals = _table(group, EVAL_FIELDS)
        arrays = {} if group is None else {
            k: d[()] for k, d in group.items() if isinstance(d, h5py.Dataset) and d.ndim == 2
        }  # fmt: skip
        ranks = _ranks(f["ranks"]) if isinstance(f.get("ranks"), h5py.Group) else None
    config = _config(attrs.get("config"))
    run_section = config.get("run") if isinstance(config.get("run"), dict) else {}
    name = run_section.get("name")
    if name is None or str(name) == "":
        name = os.path.splitext(os.path.basename(path))[0]
    rows = len(evals)
    arrays = {k: v[:rows] for k, v in arrays.items()}
    return Run(path, str(name), attrs, config, steps, evals, ranks, arrays)


def _table(group: h5py.Group | None, fields: tuple[str, ...]) -> pd.DataFrame:
    """1-D datasets of a group as columns, cut to the shortest; missing fields are NaN."""
    columns: dict[str, np.ndarray] = {}
    if group is not None:
        for key, dset in group.items():
            if isinstance(dset, h5py.Dataset) and dset.ndim == 1:
                columns[key] = dset[()]
    rows = min((len(v) for v in columns.values()), default=0)
    data = {key: columns[key][:rows] for key in fields if key in columns}
    data.update({key: np.full(rows, np.nan) for key in fields if key not in columns})
    data.update({key: v[:rows] for key, v in columns.items() if key not in data})
    return pd.DataFrame(data, columns=list(fields) + [k for k in data if k not in fields])


def _ranks(group: h5py.Group) -> pd.DataFrame | None:
    """2-D (row x rank) datasets in long form: one row per (row, rank)."""
    arrays = {
        key: dset[()]
        for key, dset in group.items()
        if isinstance(dset, h5py.Dataset) and dset.ndim == 2
    }
    if not arrays:
        return None
    rows = min(a.shape[0] for a in arrays.values())
    width = min(a.shape[1] for a in arrays.values())
    data: dict[str, np.ndarray] = {
        "row": np.repeat(np.arange(rows), width),
        "rank": np.tile(np.arange(width), rows),
    }
    for key, a in arrays.items():
        data[key] = a[:rows, :width].reshape(-1)
    return pd.DataFrame(data)


def _config(text: Any) -> dict[str, Any]:
    if not isinstance(text, str):
        return {}
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _py(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    return value


def _reason(exc: OSError) -> str:
    """One line about why h5py could not read a file."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if "signature" in lowered:
        return "not an HDF5 file"
    if "truncated" in lowered or "eof" in lowered:
        return f"truncated or corrupt HDF5 file ({text})"
    return f"unreadable ({type(exc).__name__}: {text})" if text else "unreadable"

"""Metrics in one HDF5 file per run (layout in DESIGN.md), written by rank 0.

Rows are buffered in memory and appended every ``flush_every`` steps. Each
flush appends the new rows to a hidden copy of the file and publishes that copy
under the file's name by an atomic rename (:class:`dsgd_mpi.atomic.TwoCopies`):
a job killed at any moment (even by SIGKILL, even mid-flush) leaves the file as
it was after the previous flush or the new one, a flush costs what it appends
(not a copy of the whole file), and readers such as ``dsgd_mpi.analyze`` can
open it while the job runs (file locking is off on both sides). Other ranks get
:class:`NullWriter`, so the training loop never asks who it is.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import Protocol

import h5py
import numpy as np

from dsgd_mpi import atomic

STEP_FIELDS = (
    "step", "epoch", "phase", "lr", "train_loss", "train_acc",
    "consensus_estimate", "consensus_measured", "consensus_exact", "consensus_bound",
    "gossip_rounds", "target", "bytes_sent", "time_compute", "time_gossip", "time_allreduce",
    # running totals since step 1: the whole run's communication cost
    "gossip_rounds_total", "bytes_sent_total", "time_compute_total", "time_gossip_total",
    "time_allreduce_total",
    # the largest value of every step since the previous row (a row ends each phase)
    "consensus_estimate_max", "consensus_measured_max",
)  # fmt: skip
EVAL_FIELDS = (
    "step", "epoch", "test_loss", "test_acc", "test_nll", "test_ece",
    "local_acc_mean", "local_acc_min", "local_acc_max",
    "ensemble_acc", "ensemble_nll", "ensemble_ece",
    "sharpness_lambda_max", "sharpness_lambda_residual", "sharpness_lambda_iters",
    "sharpness_trace", "sharpness_trace_se", "sharpness_trace_iters",
)  # fmt: skip
#: 2-D evaluation fields (row x bin): the reliability diagrams of x̄ and of the ensemble.
EVAL_ARRAYS = tuple(f"{who}_{what}" for who in ("test", "ensemble")
                    for what in ("bin_confidence", "bin_accuracy", "bin_count"))  # fmt: skip
_INT_FIELDS = {
    "step", "phase", "gossip_rounds", "bytes_sent", "gossip_rounds_total", "bytes_sent_total",
    "sharpness_lambda_iters", "sharpness_trace_iters",
}  # fmt: skip


class MetricsWriter(Protocol):
    def log_step(self, row: Mapping[str, float]) -> None: ...
    def log_eval(self, row: Mapping[str, float]) -> None: ...
    def flush(self) -> None: ...
    def close(self, finished: bool) -> None: ...


class NullWriter:
    """What every rank but 0 writes: nothing."""

    def log_step(self, row: Mapping[str, float]) -> None:
        pass

    def log_eval(self, row: Mapping[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, finished: bool) -> None:
        pass


class H5Writer:
    """Appends rows to ``/steps`` and ``/eval`` of one HDF5 file, crash-safely.

    Every change (creation, each flush, the ``finished`` mark) is made on a copy
    that then replaces the file (:mod:`dsgd_mpi.atomic`): a kill at any moment
    leaves the previous complete file or the new one. Creation and a relaunch
    write a whole new file; flushes and the ``finished`` mark change a hidden
    copy in place (:class:`~dsgd_mpi.atomic.TwoCopies`). Step rows are flushed
    once ``flush_every`` steps have passed since the last flush; evaluation rows
    at once.

    A resumed run (``resume_after_step``) keeps every row of the file and
    replaces the rows after its checkpoint as it recomputes them, flush by
    flush: a resumed run killed again has lost nothing that was ever on disk.
    """

    def __init__(
        self,
        path: str,
        attrs: Mapping[str, object],
        flush_every: int,
        resume_after_step: int | None = None,
        relaunch: Mapping[str, object] | None = None,
    ) -> None:
        self.path = path
        self.flush_every = flush_every
        self._rows: dict[str, list[dict]] = {"steps": [], "eval": []}
        start = resume_after_step or 0
        self._replaced = {"steps": start, "eval": start}  # rows up to here are this run's
        self._flushed_step = start
        self._file = atomic.TwoCopies(path, combine=_Change.__add__)
        atomic.remove_stale(path)
        if resume_after_step is not None and os.path.exists(path):
            with atomic.replacing(path, copy=True) as tmp, h5py.File(tmp, "a", locking=False) as f:
                f.attrs.pop("finished", None)
                _record_relaunch(f, resume_after_step, relaunch or {})
            return
        if os.path.exists(path):  # run.overwrite: the old run stays, under a numbered name
            self._file.forget()
            atomic.move_aside(path)
        with atomic.replacing(path) as tmp, h5py.File(tmp, "w", locking=False) as f:
            for key, value in attrs.items():
                # HDF5 string attributes refuse NUL bytes (Open MPI pads its version with them)
                f.attrs[key] = value if isinstance(value, (int, float)) else _text(value)
            for group, fields in (("steps", STEP_FIELDS), ("eval", EVAL_FIELDS)):
                g = f.create_group(group)
                for name in fields:
                    _dataset(g, name, 0)

    def log_step(self, row: Mapping[str, float]) -> None:
        self._rows["steps"].append(dict(row))
        if int(row["step"]) - self._flushed_step >= self.flush_every:
            self.flush()

    def log_eval(self, row: Mapping[str, float]) -> None:
        self._rows["eval"].append(dict(row))
        self.flush()  # evaluations are rare and precious

    def flush(self) -> None:
        if not any(self._rows.values()):
            return
        # The change is kept and replayed on the other copy at the next flush: it carries
        # its own rows and boundaries, not references to this writer's buffers.
        change = _Change({g: (list(rows), self._replaced[g])
                          for g, rows in self._rows.items() if rows})  # fmt: skip
        self._file.update(change)
        for group, (rows, _) in change.rows.items():
            self._replaced[group] = int(rows[-1]["step"])
        if self._rows["steps"]:
            self._flushed_step = int(self._rows["steps"][-1]["step"])
        for rows in self._rows.values():
            rows.clear()

    def close(self, finished: bool) -> None:
        self.flush()
        if finished:
            self._file.update(_Change(attrs={"finished": _now()}))
        self._file.forget()  # the file is complete: its hidden copies are only disk space


class _Change:
    """One open of the file: rows to add per group, each with the step up to which the
    file's rows are this launch's (see :func:`_write_rows`), and attributes to set.

    ``a + b`` is a then b in one open (for the hidden copy that missed ``a``): rows of a
    group concatenate, since a later flush's steps all come after an earlier one's.
    """

    def __init__(self, rows: Mapping[str, tuple[list[dict], int]] | None = None,
                 attrs: Mapping[str, object] | None = None) -> None:  # fmt: skip
        self.rows, self.attrs = dict(rows or {}), dict(attrs or {})

    def __add__(self, later: _Change) -> _Change:
        rows = dict(self.rows)
        for group, (new, replaced) in later.rows.items():
            rows[group] = (rows[group][0] + new, rows[group][1]) if group in rows else (
                new, replaced)  # fmt: skip
        return _Change(rows, {**self.attrs, **later.attrs})

    def __call__(self, path: str) -> None:
        with h5py.File(path, "a", locking=False) as f:
            for group, (rows, replaced) in self.rows.items():
                _write_rows(f[group], rows, replaced)
            for key, value in self.attrs.items():
                f.attrs[key] = value


def _text(value: object) -> str:
    return str(value).replace("\0", "")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _dataset(group: h5py.Group, name: str, rows: int, width: int | None = None) -> h5py.Dataset:
    """A resizable column (1-D, or rows x ``width``); rows already in the group are NaN
    (or -1 for integers)."""
    dtype = np.int64 if name in _INT_FIELDS else np.float64
    shape, maxshape, chunks = (rows,), (None,), (1024,)
    if width is not None:
        shape, maxshape, chunks = (rows, width), (None, width), (64, width)
    dset = group.create_dataset(name, shape=shape, maxshape=maxshape, chunks=chunks, dtype=dtype)
    if rows:
        dset[...] = -1 if dtype is np.int64 else np.nan
    return dset


def _write_rows(group: h5py.Group, rows: list[dict], replaced: int) -> None:
    """Add ``rows`` (steps ascending). Rows of the file after step ``replaced`` and up to
    the last new step are an earlier launch's, now recomputed: they give way to the new ones.

    A field the file does not have yet (a file of an older version) is added.
    Appending reads only the last step of the file: its cost does not grow with it.
    """
    count = group["step"].shape[0]
    last = int(rows[-1]["step"])
    tail = int(group["step"][count - 1]) if count else None
    appending = tail is None or (replaced >= tail and last >= tail)
    if not appending:  # a relaunch recomputing rows the file has: merge (rare, whole columns)
        old = group["step"][()]
        keep_before = int(np.searchsorted(old, replaced, side="right"))
        keep_after = int(np.searchsorted(old, last, side="right"))
    for name in dict.fromkeys(k for r in rows for k in r):
        if name not in group:
            value = next(r[name] for r in rows if name in r)
            width = len(value) if isinstance(value, np.ndarray) else None
            _dataset(group, name, count, width)
    for name, dset in group.items():
        missing = np.full(dset.shape[1:], -1 if dset.dtype.kind == "i" else np.nan)
        new = np.array([r.get(name, missing) for r in rows], dtype=dset.dtype)
        if appending:  # the usual case
            dset.resize((count + len(new), *dset.shape[1:]))
            dset[count:] = new
            continue
        values = dset[()]
        merged = np.concatenate([values[:keep_before], new, values[keep_after:]])
        dset.resize(merged.shape)
        dset[...] = merged


def _record_relaunch(f: h5py.File, step: int, changed: Mapping[str, object]) -> None:
    """Append this relaunch (time, resume step, keys changed since the last launch)."""
    history = json.loads(str(f.attrs.get("relaunches", "[]")))
    history.append({"time": _now(), "resumed_after_step": step, "changed": dict(changed)})
    f.attrs["relaunches"] = json.dumps(history)

"""Metrics in one HDF5 file per run (layout in DESIGN.md), written by rank 0.

Rows are buffered in memory and appended every ``flush_every`` rows. Each flush
opens the file, appends, and closes it again: a job killed between flushes
(even by SIGKILL) leaves a consistent file with every flushed row, and readers
such as ``dsgd_mpi.analyze`` can open it while the job runs (file locking is
off on both sides). Other ranks get :class:`NullWriter`, so the training loop
never asks who it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

import h5py
import numpy as np

STEP_FIELDS = (
    "step", "epoch", "phase", "lr", "train_loss", "train_acc",
    "consensus_estimate", "consensus_exact", "consensus_bound", "gossip_rounds", "target",
    "bytes_sent", "time_compute", "time_gossip", "time_allreduce",
)  # fmt: skip
EVAL_FIELDS = (
    "step", "epoch", "test_loss", "test_acc",
    "local_acc_mean", "local_acc_min", "local_acc_max",
)  # fmt: skip
_INT_FIELDS = {"step", "phase", "gossip_rounds", "bytes_sent"}


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
    """Appends rows to ``/steps`` and ``/eval`` of one HDF5 file."""

    def __init__(
        self,
        path: str,
        attrs: Mapping[str, object],
        flush_every: int,
        resume_after_step: int | None = None,
    ) -> None:
        self.path = path
        self.flush_every = flush_every
        self._rows: dict[str, list[dict]] = {"steps": [], "eval": []}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_after_step is not None and os.path.exists(path):
            self._truncate(resume_after_step)
            return
        with h5py.File(path, "w", locking=False) as f:
            for key, value in attrs.items():
                f.attrs[key] = value if isinstance(value, (int, float)) else str(value)
            for group, fields in (("steps", STEP_FIELDS), ("eval", EVAL_FIELDS)):
                g = f.create_group(group)
                for name in fields:
                    dtype = np.int64 if name in _INT_FIELDS else np.float64
                    g.create_dataset(
                        name, shape=(0,), maxshape=(None,), chunks=(1024,), dtype=dtype
                    )

    def log_step(self, row: Mapping[str, float]) -> None:
        self._rows["steps"].append(dict(row))
        if len(self._rows["steps"]) >= self.flush_every:
            self.flush()

    def log_eval(self, row: Mapping[str, float]) -> None:
        self._rows["eval"].append(dict(row))
        self.flush()  # evaluations are rare and precious

    def flush(self) -> None:
        if not any(self._rows.values()):
            return
        with h5py.File(self.path, "a", locking=False) as f:
            for group, rows in self._rows.items():
                if not rows:
                    continue
                for name, dset in f[group].items():
                    values = np.array([r.get(name, np.nan) for r in rows], dtype=dset.dtype)
                    start = dset.shape[0]
                    dset.resize((start + len(values),))
                    dset[start:] = values
                rows.clear()

    def close(self, finished: bool) -> None:
        self.flush()
        if finished:
            import datetime

            with h5py.File(self.path, "a", locking=False) as f:
                f.attrs["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat()

    def _truncate(self, last_step: int) -> None:
        """Drop rows logged after the checkpoint we resume from: they will be redone."""
        with h5py.File(self.path, "a", locking=False) as f:
            for group in ("steps", "eval"):
                steps = f[group]["step"][:]
                keep = int(np.searchsorted(steps, last_step, side="right"))
                for dset in f[group].values():
                    dset.resize((keep,))
            if "finished" in f.attrs:
                del f.attrs["finished"]

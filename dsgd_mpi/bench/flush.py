"""Flush cost against the length of the run file.

    python -m dsgd_mpi.bench flush --json
    python -m dsgd_mpi.bench flush --sizes 1000,100000 --flushes 40 --rows 1 --json

Two run files written by :class:`~dsgd_mpi.metrics.H5Writer`, one holding the
smaller number of step rows and one the larger (plus one evaluation row per
100 steps, reliability bins included), get the same flushes in alternation, in
one process: ``--rows`` step rows each (1: ``log_every`` = ``flush_every``).
Reported per size: the median seconds per flush and the file's size; and the
ratio large / small, whose aim is < 2 (a flush that does not grow with the
run). Beside it, interleaved the same way, the previous design: copy the whole
file, append, fsync, rename (``copy``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import h5py
import numpy as np

from dsgd_mpi import atomic
from dsgd_mpi.metrics import EVAL_ARRAYS, EVAL_FIELDS, STEP_FIELDS, H5Writer

BINS = 15


def _step_row(step: int, rng: np.random.Generator) -> dict:
    row = {name: float(rng.random()) for name in STEP_FIELDS}
    row.update(step=step, phase=0, gossip_rounds=1, bytes_sent=1, gossip_rounds_total=step,
               bytes_sent_total=step)  # fmt: skip
    return row


def _eval_row(step: int, rng: np.random.Generator) -> dict:
    row: dict = {name: float(rng.random()) for name in EVAL_FIELDS}
    row.update(step=step, sharpness_power_iters=1, sharpness_trace_iters=1)
    row.update({name: rng.random(BINS) for name in EVAL_ARRAYS})
    return row


def _prefilled(path: str, rows: int, rng: np.random.Generator) -> H5Writer:
    """A run file of ``rows`` step rows (and an evaluation every 100 steps), still open."""
    writer = H5Writer(path, {"config": "bench", "world_size": 16}, flush_every=rows + 1)
    for step in range(1, rows + 1):
        writer.log_step(_step_row(step, rng))
        if step % 100 == 0:
            writer.log_eval(_eval_row(step, rng))  # flushes the rows so far too
    writer.flush()
    return writer


def _copy_flush(path: str, rows: list[dict]) -> None:
    """The previous design's flush: a copy of the whole file gets the rows and replaces it."""
    with atomic.replacing(path, copy=True) as tmp, h5py.File(tmp, "a", locking=False) as f:
        group = f["steps"]
        for name, dset in group.items():
            count = dset.shape[0]
            dset.resize((count + len(rows),))
            dset[count:] = np.array([r[name] for r in rows], dtype=dset.dtype)


def run_flush(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    folder = tempfile.mkdtemp(prefix="dsgd-flush-", dir=args.dir)
    try:
        writers, copies, steps = {}, {}, {}
        for n in sizes:
            writers[n] = _prefilled(os.path.join(folder, f"run{n}.h5"), n, rng)
            writers[n].flush_every = args.rows
            copies[n] = os.path.join(folder, f"copy{n}.h5")
            shutil.copyfile(writers[n].path, copies[n])
            steps[n] = n
        times: dict[str, dict[int, list[float]]] = {"flush": {}, "copy": {}}
        for k in range(args.flushes):
            order = sizes if k % 2 == 0 else sizes[::-1]  # alternate who goes first
            for n in order:
                rows = [_step_row(steps[n] + i + 1, rng) for i in range(args.rows)]
                steps[n] += args.rows
                t0 = time.perf_counter()
                for row in rows:  # the last one reaches flush_every: it flushes
                    writers[n].log_step(row)
                times["flush"].setdefault(n, []).append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                _copy_flush(copies[n], rows)
                times["copy"].setdefault(n, []).append(time.perf_counter() - t0)
        medians = {kind: {n: statistics.median(v) for n, v in t.items()}
                   for kind, t in times.items()}  # fmt: skip
        small, large = min(sizes), max(sizes)
        # What was timed: the published files hold every row appended (read back, not counted).
        held = {}
        for n in sizes:
            with h5py.File(writers[n].path, "r", locking=False) as f:
                held[n] = int(f["steps"]["step"].shape[0])
        result = {
            "benchmark": "flush", "sizes": sizes, "rows_per_flush": args.rows,
            "flushes": args.flushes,
            "rows_in_file": held,
            "file_mb": {n: round(os.path.getsize(writers[n].path) / 2**20, 2) for n in sizes},
            "flush_ms": {n: round(1e3 * medians["flush"][n], 3) for n in sizes},
            "ratio": round(medians["flush"][large] / medians["flush"][small], 3),
            "copy_flush_ms": {n: round(1e3 * medians["copy"][n], 3) for n in sizes},
            "copy_ratio": round(medians["copy"][large] / medians["copy"][small], 3),
            "dir": folder,
        }  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for n in sizes:
            print(f"{n:>8} rows ({result['file_mb'][n]} MB): flush {result['flush_ms'][n]} ms, "
                  f"copy-the-file flush {result['copy_flush_ms'][n]} ms")  # fmt: skip
        print(f"large / small: {result['ratio']} (copy design: {result['copy_ratio']})")
    return 0

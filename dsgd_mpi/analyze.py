"""Tables and plots of finished or running runs.

    python -m dsgd_mpi.analyze RUN.h5 [RUN.h5 ...] [--out DIR]


Writes to ``--out`` (default ``analysis/``):

- ``summary.md`` / ``summary.csv``: one row per run (final and best test
  accuracy of the averaged model, gossip rounds, bytes, time);
- ``summary_grouped.md`` / ``.csv``: runs that differ only in ``run.seed``
  (and name / out_dir / checkpoint dir) as one row, accuracy mean ± std;
- ``consensus.png``, ``test_acc.png``, ``rounds.png``;
- ``control.png``: measured distance / target on every controlled step, by phase;
- ``sharpness.png``: lambda_max and trace of x̄ per evaluation;
- ``reliability.png``: x̄ against the ensemble of local models (last evaluation);
- ``phase_factor.md`` when the runs form a dec-phase-k x factor grid.

A file that cannot be read (corrupt, truncated, not HDF5, no ``/steps``) is
skipped with a one-line warning; the exit status is 2 only if no file could be
read. From a notebook::

    from dsgd_mpi.analyze import load_run, steps_frame, eval_frame
    run = load_run("runs/quickstart.h5")
    run.steps.plot(x="step", y="consensus_estimate", logy=True)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dsgd_mpi import atomic
from dsgd_mpi.analysis.load import LoadError, Run, eval_frame, load_run, steps_frame
from dsgd_mpi.analysis.plots import (
    plot_consensus,
    plot_control,
    plot_reliability,
    plot_rounds,
    plot_sharpness,
    plot_test_acc,
)
from dsgd_mpi.analysis.tables import (
    config_key,
    grouped_markdown,
    grouped_table,
    phase_factor_table,
    summary_markdown,
    summary_table,
)

__all__ = [
    "LoadError",
    "Run",
    "analyze",
    "config_key",
    "eval_frame",
    "grouped_table",
    "load_run",
    "main",
    "phase_factor_table",
    "read_runs",
    "steps_frame",
    "summary_table",
]


def read_runs(paths: Sequence[str], warn=None) -> list[Run]:
    """The readable runs among ``paths`` (each file once); an unreadable one gets a warning."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    runs = []
    seen: set[str] = set()
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:  # the same file twice (a symlink, an overlapping glob)
            continue
        seen.add(real)
        try:
            runs.append(load_run(path))
        except LoadError as exc:
            warn(f"warning: skipping {exc.path}: {exc.reason}")
    return runs


def analyze(runs: Sequence[Run], out: str) -> list[str]:
    """Write every table and plot of ``runs`` into ``out``; returns the paths written."""
    os.makedirs(out, exist_ok=True)
    written = []

    def text(name: str, content: str) -> None:
        path = os.path.join(out, name)
        atomic.write_text(path, content)
        written.append(path)

    summary = summary_table(runs)
    text("summary.md", summary_markdown(summary))
    text("summary.csv", summary.to_csv(index=False))
    grouped = grouped_table(runs)
    text("summary_grouped.md", grouped_markdown(grouped))
    text("summary_grouped.csv", grouped.to_csv(index=False))
    grid = phase_factor_table(runs)
    if grid is not None:
        title = (
            "Final test accuracy of the averaged model (%), by decentralized phase k x factor\n\n"
        )
        text("phase_factor.md", title + grid.to_markdown(index=False, disable_numparse=True) + "\n")
    written.append(plot_consensus(runs, os.path.join(out, "consensus.png")))
    written.append(plot_test_acc(runs, os.path.join(out, "test_acc.png")))
    written.append(plot_rounds(runs, os.path.join(out, "rounds.png")))
    written.append(plot_control(runs, os.path.join(out, "control.png")))
    written.append(plot_sharpness(runs, os.path.join(out, "sharpness.png")))
    written.append(plot_reliability(runs, os.path.join(out, "reliability.png")))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd_mpi.analyze",
        description="Summary tables and PNG plots of dsgd_mpi run files (HDF5).",
    )
    parser.add_argument("files", nargs="+", metavar="RUN.h5", help="run files to analyse")
    parser.add_argument("--out", default="analysis", help="output directory (default: analysis)")
    args = parser.parse_args(argv)

    runs = read_runs(args.files)
    if not runs:
        print("error: none of the files could be read", file=sys.stderr)
        return 2
    written = analyze(runs, args.out)
    print(grouped_markdown(grouped_table(runs)))
    skipped = len(args.files) - len(runs)
    note = f" ({skipped} skipped)" if skipped else ""
    print(f"analysed {len(runs)} run(s){note}; wrote to {os.path.abspath(args.out)}:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

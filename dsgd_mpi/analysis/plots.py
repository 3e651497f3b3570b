"""PNG plots of runs, drawn on matplotlib's Agg canvas.

Figures are built with :class:`matplotlib.figure.Figure` and
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg` rather than pyplot,
so importing this module neither needs a display nor changes the backend of a
notebook that uses it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dsgd_mpi import atomic
from dsgd_mpi.analysis.load import Run

MAX_SUBPLOTS = 6
"""Above this many runs, consensus.png overlays all runs on one axis."""
MAX_LEGEND = 12
"""Above this many runs a legend would cover the plot: it is left out and the title says so."""


def labels(runs: Sequence[Run]) -> list[str]:
    """Legend labels: run names, made unique with the file name where they repeat."""
    names = [r.name for r in runs]
    out = [
        n if names.count(n) == 1 else f"{n} ({os.path.basename(r.path)})"
        for n, r in zip(names, runs, strict=True)
    ]
    return [o if out.count(o) == 1 else f"{o} #{i}" for i, o in enumerate(out)]


def _figure(nplots: int, width: float = 5.0, height: float = 3.4) -> tuple[Figure, list]:
    cols = min(nplots, 3)
    rows = math.ceil(nplots / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[nplots:]:
        ax.set_visible(False)
    return fig, axes[:nplots]


def _legend(ax, runs: Sequence[Run], title: str, **kwargs) -> None:
    if len(runs) <= MAX_LEGEND:
        ax.set_title(title)
        ax.legend(**kwargs)
    else:
        ax.set_title(f"{title}: {len(runs)} runs (no legend; pass fewer files to label them)",
                     fontsize=9)  # fmt: skip


def _save(fig: Figure, path: str) -> str:
    """Write the PNG atomically: a reader (or a crash) never sees half a picture."""
    return atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def _col(run: Run, name: str) -> np.ndarray:
    return run.steps[name].to_numpy(dtype=float)


def _log_if_positive(ax, *arrays: np.ndarray) -> None:
    values = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    if np.any(values > 0):
        ax.set_yscale("log")


def _shade_phases(ax, run: Run) -> None:
    """Shade contiguous stretches of one phase, alternately, and label them."""
    steps, phase = _col(run, "step"), _col(run, "phase")
    if not len(steps):
        return
    starts = [0] + [i for i in range(1, len(phase)) if phase[i] != phase[i - 1]]
    bounds = starts + [len(phase)]
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        x0 = steps[a - 1] if a else steps[0]
        x1 = steps[b - 1]
        ax.axvspan(x0, x1, color=f"C{j % 2 + 7}", alpha=0.12, lw=0)
        if math.isfinite(phase[a]):
            ax.text(
                (x0 + x1) / 2, 0.98, f"phase {int(phase[a]) + 1}",
                transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7,
            )  # fmt: skip


def _consensus_lines(ax, run: Run, label: str = "", color: str | None = None) -> list:
    step = _col(run, "step")
    est, exact, target = (_col(run, c) for c in ("consensus_estimate", "consensus_exact", "target"))
    prefix = f"{label}: " if label else ""
    ax.plot(step, est, color=color, lw=1.2, label=f"{prefix}estimate e²")
    m = np.isfinite(exact)
    if m.any():
        ax.plot(step[m], exact[m], "o", color=color, ms=3, label=f"{prefix}exact Ξ²")
    shown = np.where(np.isfinite(target) & (target > 0), target, np.nan)
    if np.isfinite(shown).any():
        ax.plot(step, shown, "--", color=color or "k", lw=1, label=f"{prefix}target")
    return [est, exact, shown]


def plot_consensus(runs: Sequence[Run], path: str) -> str:
    """consensus_estimate and consensus_exact vs step (log y), targets, phases shaded."""
    names = labels(runs)
    if len(runs) > MAX_SUBPLOTS:
        fig, (ax,) = _figure(1, width=9, height=5.5)
        arrays = []
        for i, (run, name) in enumerate(zip(runs, names, strict=True)):
            arrays += _consensus_lines(ax, run, name, color=f"C{i % 10}")
        _log_if_positive(ax, *arrays)
        _legend(ax, runs, "consensus distance", fontsize=6, ncol=2)
        ax.set_xlabel("step")
        return _save(fig, path)
    fig, axes = _figure(len(runs))
    for ax, run, name in zip(axes, runs, names, strict=True):
        if not len(run.steps):
            ax.text(0.5, 0.5, "no logged steps yet", ha="center", transform=ax.transAxes)
        else:
            _shade_phases(ax, run)
            _log_if_positive(ax, *_consensus_lines(ax, run))
            ax.legend(fontsize=7, loc="lower left")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("consensus distance")
    return _save(fig, path)


def plot_test_acc(runs: Sequence[Run], path: str) -> str:
    """Test accuracy of the averaged model vs epoch, one line per run."""
    fig, (ax,) = _figure(1, width=7, height=4.5)
    for run, name in zip(runs, labels(runs), strict=True):
        ev = run.eval
        ax.plot(
            ev["epoch"].astype(float), 100 * ev["test_acc"].astype(float), "o-", ms=3, label=name
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy of x̄ (%)")
    ax.grid(alpha=0.3)
    _legend(ax, runs, "test accuracy", fontsize=7)
    return _save(fig, path)


def plot_rounds(runs: Sequence[Run], path: str) -> str:
    """Gossip rounds of each logged step vs step, one line per run."""
    fig, (ax,) = _figure(1, width=7, height=4.5)
    for run, name in zip(runs, labels(runs), strict=True):
        ax.step(_col(run, "step"), _col(run, "gossip_rounds"), where="post", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("gossip rounds (logged step)")
    ax.grid(alpha=0.3)
    _legend(ax, runs, "gossip rounds per step", fontsize=7)
    return _save(fig, path)

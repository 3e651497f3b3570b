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


def measure_of(run: Run) -> str:
    """The run's consensus.measure (estimate for files older than the key)."""
    consensus = run.config.get("consensus")
    return str(consensus.get("measure", "estimate")) if isinstance(consensus, dict) else "estimate"


def _consensus_lines(ax, run: Run, label: str = "", color: str | None = None) -> list:
    step = _col(run, "step")
    est, exact, target = (_col(run, c) for c in ("consensus_estimate", "consensus_exact", "target"))
    prefix = f"{label}: " if label else ""
    ax.plot(step, est, color=color, lw=1.2, label=f"{prefix}estimate e²")
    if measure_of(run) == "sketch":
        ax.plot(step, _col(run, "consensus_measured"), ":", color=color, lw=1.2,
                label=f"{prefix}sketched Ξ²")  # fmt: skip
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
        _legend(ax, runs, "squared consensus distance Ξ² (e² for the estimate)", fontsize=6,
                ncol=2)  # fmt: skip
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
        ax.set_ylabel("squared distance: Ξ², e² (target in the same unit)")
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


def plot_control(runs: Sequence[Run], path: str) -> str:
    """Measured consensus distance / target on every controlled logged step, by phase.

    At or below 1 the control held; above 1 the step spent its ``max_rounds``.
    Runs without a finite positive target are left out (nothing to hold).
    """
    fig, (ax,) = _figure(1, width=8, height=4.5)
    shown = 0
    for i, (run, name) in enumerate(zip(runs, labels(runs), strict=True)):
        step, target = _col(run, "step"), _col(run, "target")
        measured = _col(run, "consensus_measured")
        ok = np.isfinite(target) & (target > 0) & np.isfinite(measured)
        if not ok.any():
            continue
        shown += 1
        ratio = measured[ok] / target[ok]
        phase = _col(run, "phase")[ok]
        for k, p in enumerate(np.unique(phase)):
            sel = phase == p
            ax.plot(step[ok][sel], ratio[sel], ".", ms=3, color=f"C{i % 10}",
                    label=f"{name} ({measure_of(run)})" if k == 0 else None)  # fmt: skip
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("measured / target")
    if shown:
        _legend(ax, runs[:shown], "consensus control: measured distance over its target",
                fontsize=7)  # fmt: skip
    else:
        ax.set_title("no controlled phase in these runs")
    return _save(fig, path)


def plot_sharpness(runs: Sequence[Run], path: str) -> str:
    """lambda_max and the Hessian trace of x̄ at each evaluation that measured them."""
    fig, axes = _figure(2, width=5.5)
    for run, name in zip(runs, labels(runs), strict=True):
        ev = run.eval
        epoch = ev["epoch"].to_numpy(float)
        for ax, col in zip(axes, ("sharpness_lambda_max", "sharpness_trace"), strict=True):
            values = ev[col].to_numpy(float)
            m = np.isfinite(values)
            if m.any():
                ax.plot(epoch[m], values[m], "o-", ms=3, label=name)
    for ax, title in zip(axes, ("λ_max of x̄", "trace of the Hessian at x̄"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    if len(runs) <= MAX_LEGEND:
        axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_reliability(runs: Sequence[Run], path: str) -> str:
    """Reliability diagrams of the last evaluation: x̄ against the ensemble of local models."""
    with_bins = [r for r in runs if "test_bin_accuracy" in r.eval_arrays
                 and len(r.eval_arrays["test_bin_accuracy"])]  # fmt: skip
    shown = with_bins[:MAX_SUBPLOTS]
    fig, axes = _figure(max(1, len(shown)), width=4.2, height=4.0)
    for ax, run, name in zip(axes, shown, labels(shown), strict=False):
        edges = np.linspace(0, 1, run.eval_arrays["test_bin_accuracy"].shape[1] + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        ev = run.eval
        for who, label, color in (("test", "x̄", "C0"), ("ensemble", "ensemble", "C1")):
            acc = run.eval_arrays[f"{who}_bin_accuracy"][-1]
            m = np.isfinite(acc)
            ece = float(ev[f"{who}_ece"].iloc[-1]) if f"{who}_ece" in ev else math.nan
            ax.plot(centers[m], acc[m], "o-", ms=3, color=color, label=f"{label} (ECE {ece:.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    if not shown:
        axes[0].set_title("no reliability bins in these runs")
    return _save(fig, path)

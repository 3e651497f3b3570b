"""Summary tables of runs: one row per run, per seed group, and the Kong phase x factor grid.

The whole run's communication cost comes from the running totals of the last
logged row (``gossip_rounds_total``, ``bytes_sent_total``). Files written before
the totals existed only have the logged steps' own values; their sums are then
proxies that scale with ``1 / log_every`` (``rounds_per_logged_step`` is the
comparable figure across runs).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from dsgd_mpi.analysis.load import Run

IGNORED_KEYS = (("run", "seed"), ("run", "name"), ("run", "out_dir"), ("checkpoint", "dir"))
"""Config keys that do not make two runs different experiments (seeds of one group)."""


# ---------------------------------------------------------------- per run


def run_summary(run: Run) -> dict[str, Any]:
    """One row of ``summary.csv``; accuracies are fractions, times seconds."""
    steps, evals = run.steps, run.eval
    acc = pd.to_numeric(evals["test_acc"], errors="coerce").dropna()
    times = steps[["time_compute", "time_gossip", "time_allreduce"]].astype(float)
    seed = (
        run.config.get("run", {}).get("seed") if isinstance(run.config.get("run"), dict) else None
    )
    return {
        "run": run.name,
        "file": os.path.basename(run.path),
        "topology": run.topology,
        "n": run.world_size,
        "seed": seed,
        "steps": int(steps["step"].iloc[-1]) if len(steps) else 0,
        "epochs": float(steps["epoch"].iloc[-1]) if len(steps) else 0.0,
        "final_test_acc": float(acc.iloc[-1]) if len(acc) else math.nan,
        "best_test_acc": float(acc.max()) if len(acc) else math.nan,
        "gossip_rounds_total": _total(steps, "gossip_rounds"),
        "bytes_sent_total": _total(steps, "bytes_sent"),
        "gossip_rounds_sum": int(np.nansum(steps["gossip_rounds"])) if len(steps) else 0,
        "rounds_per_logged_step": float(steps["gossip_rounds"].mean()) if len(steps) else math.nan,
        "bytes_sent_sum": int(np.nansum(steps["bytes_sent"])) if len(steps) else 0,
        "time_logged_s": float(np.nansum(times.to_numpy())),
        "wall_s": _wall_seconds(run.attrs),
        "finished": run.finished,
        **_last(evals, ("test_nll", "test_ece", "ensemble_acc", "ensemble_nll", "ensemble_ece")),
        **_last(evals, ("sharpness_lambda_max", "sharpness_trace"), measured=True),
    }


def _total(steps: pd.DataFrame, name: str) -> float:
    """The whole run's total of a per-step count (NaN for files without totals)."""
    column = f"{name}_total"
    if not len(steps) or column not in steps:
        return math.nan
    value = float(pd.to_numeric(steps[column], errors="coerce").iloc[-1])
    return value if value >= 0 else math.nan


def _last(evals: pd.DataFrame, names: Sequence[str], measured: bool = False) -> dict:
    """The last evaluation's value of each field; ``measured``: the last one not NaN."""
    out = {}
    for name in names:
        values = pd.to_numeric(evals[name], errors="coerce") if name in evals else pd.Series([])
        if measured:
            values = values.dropna()
        out[f"final_{name}"] = float(values.iloc[-1]) if len(values) else math.nan
    return out


def summary_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run (see :func:`run_summary`)."""
    return pd.DataFrame([run_summary(r) for r in runs])


def _wall_seconds(attrs: dict[str, Any]) -> float:
    if "started" not in attrs or "finished" not in attrs:
        return math.nan
    try:
        delta = pd.Timestamp(str(attrs["finished"])) - pd.Timestamp(str(attrs["started"]))
    except (ValueError, TypeError):  # unparsable, or one with a time zone and one without
        return math.nan
    return float(delta.total_seconds())


# ------------------------------------------------------------- seed groups


def stripped_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the :data:`IGNORED_KEYS` (a deep copy)."""
    out = json.loads(json.dumps(config, default=str))
    for section, key in IGNORED_KEYS:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def config_key(run: Run) -> str:
    """Identity of the experiment: the stripped config plus the world size."""
    ident = {"config": stripped_config(run.config), "world_size": run.world_size}
    return json.dumps(ident, sort_keys=True, default=str)


def grouped_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per config key: accuracy mean/std over seeds, and the config keys that vary."""
    rows = summary_table(runs)
    keys = [config_key(r) for r in runs]
    order = list(dict.fromkeys(keys))
    flat = {k: _flatten(json.loads(k)["config"]) for k in order}
    paths = dict.fromkeys(p for f in flat.values() for p in f)
    varying = [p for p in paths if len({repr(f.get(p)) for f in flat.values()}) > 1]
    out = []
    for k in order:
        members = [i for i, key in enumerate(keys) if key == k]
        sub = rows.iloc[members]
        row: dict[str, Any] = {
            "group": _group_name(list(sub["run"])),
            "topology": sub["topology"].iloc[0],
            "n": sub["n"].iloc[0],
            "seeds": len(members),
            "seed_list": " ".join(str(s) for s in sub["seed"]),
        }
        row.update({p: _cell(flat[k].get(p)) for p in varying})
        for col in ("final_test_acc", "best_test_acc", "rounds_per_logged_step"):
            values = sub[col].astype(float)
            row[f"{col}_mean"] = float(values.mean())
            row[f"{col}_std"] = float(values.std(ddof=1)) if values.count() > 1 else math.nan
        row["runs"] = " ".join(sub["run"])
        out.append(row)
    return pd.DataFrame(out)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths of the leaves; consensus.phases stays one leaf, in short form."""
    if prefix == "consensus.phases" and isinstance(value, list):
        return {prefix: " | ".join(_phase_text(p) for p in value)}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, v in items:
        out.update(_flatten(v, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _phase_text(phase: Any) -> str:
    """``target[ factor unit][ ref=..][ max=..][ ema=..][ <=until]`` of one phase."""
    if not isinstance(phase, dict):
        return str(phase)
    target = phase.get("target", "none")
    text = str(target)
    if target in ("constant", "adaptive"):
        text += f" {factor_text(phase)}"
        ref = phase.get("reference") or phase.get("reference_run")
        text += f" ref={ref}" if ref is not None and target == "constant" else ""
        text += f" ema={phase.get('ema')}" if target == "adaptive" else ""
        text += f" max={phase.get('max_rounds', 1)}"
    until = phase.get("until_epoch")
    return text + (f" <={until:g}" if isinstance(until, (int, float)) else "")


def factor_unit(phase: dict) -> str:
    """What a phase's factor multiplies, from a run file's config: ``distance`` (Kong's
    unit) or ``squared``. Files written before the key existed meant squared."""
    if phase.get("target") != "constant" or "factor_unit" not in phase:
        return "squared"
    return phase.get("factor_unit") or "distance"


def factor_text(phase: dict) -> str:
    """A controlled phase's factor with its unit: ``0.25 Ξmax``, ``0.5 Ξ²max``, ``1 lr²g²``."""
    factor = float(phase.get("factor", 1.0))
    if phase.get("target") == "adaptive":
        return f"{factor:g} lr²g²"
    return f"{factor:g} Ξmax" if factor_unit(phase) == "distance" else f"{factor:g} Ξ²max"


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _group_name(names: list[str]) -> str:
    if len(set(names)) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    prefix = re.sub(r"(?:[_\-.]*seed|[_\-.]+s)?[_\-.]*$", "", prefix)
    return prefix or names[0] + "+"


# ------------------------------------------------------------ formatting


def pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± std`` (std left out when it is NaN, e.g. for one seed)."""
    if not math.isfinite(mean):
        return "–"
    text = f"{scale * mean:.{digits}f}"
    return text if not math.isfinite(std) else f"{text} ± {scale * std:.{digits}f}"


def summary_markdown(table: pd.DataFrame) -> str:
    """``summary.md``: accuracies in %, bytes in MB."""
    shown = pd.DataFrame(
        {
            "run": table["run"],
            "topology": table["topology"],
            "n": table["n"],
            "seed": table["seed"],
            "steps": table["steps"],
            "final acc %": 100 * table["final_test_acc"],
            "best acc %": 100 * table["best_test_acc"],
            "rounds": table["gossip_rounds_total"],
            "rounds / logged step": table["rounds_per_logged_step"],
            "MB sent": table["bytes_sent_total"] / 1e6,
            "ECE x̄": table["final_test_ece"],
            "ensemble acc %": 100 * table["final_ensemble_acc"],
            "ECE ens.": table["final_ensemble_ece"],
            "λ_max": table["final_sharpness_lambda_max"],
            "trace": table["final_sharpness_trace"],
            "time logged s": table["time_logged_s"],
            "wall s": table["wall_s"],
            "finished": table["finished"],
        }
    )
    return shown.to_markdown(index=False, floatfmt=".2f") + "\n"


def grouped_markdown(table: pd.DataFrame) -> str:
    """``summary_grouped.md``: accuracy ``mean ± std`` (%) over seeds."""
    fixed = {"group", "topology", "n", "seeds", "seed_list", "runs"}
    varying = [c for c in table.columns if c not in fixed and not c.endswith(("_mean", "_std"))]
    shown = table[["group", "topology", "n", *varying, "seeds"]].copy()
    for col, title in (("final_test_acc", "final acc %"), ("best_test_acc", "best acc %")):
        shown[title] = [
            pm(m, s) for m, s in zip(table[f"{col}_mean"], table[f"{col}_std"], strict=True)
        ]
    shown["rounds / logged step"] = [
        pm(m, s, scale=1.0)
        for m, s in zip(
            table["rounds_per_logged_step_mean"], table["rounds_per_logged_step_std"], strict=True
        )
    ]
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


# ---------------------------------------------------- Kong phase x factor


def kong_cell(run: Run) -> tuple[str, str, float, tuple] | None:
    """(phase label, factor label, row sort key, column sort key) of a dec-phase-k run, or None.

    A dec-phase-k run has exactly one phase whose target is not ``exact``: k is
    its 1-based position, the factor label is ``none`` for an uncontrolled
    phase and ``<target> <factor> <unit>`` otherwise; there must be other phases.
    A run that is ``exact``
    everywhere (C-SGD) is the ``all exact`` row, for reference.
    """
    consensus = run.config.get("consensus")
    phases = consensus.get("phases") if isinstance(consensus, dict) else None
    if not isinstance(phases, list) or not phases or not all(isinstance(p, dict) for p in phases):
        return None
    free = [(k, p) for k, p in enumerate(phases, start=1) if p.get("target", "none") != "exact"]
    if not free:
        return "all exact", "exact", math.inf, (2, "", 0.0)
    if len(free) != 1 or len(phases) < 2:  # one phase alone: plain D-SGD, not dec-phase-k
        return None
    k, phase = free[0]
    target = str(phase.get("target", "none"))
    if target == "none":
        return str(k), "none", float(k), (0, "", 0.0)
    factor = float(phase.get("factor", 1.0))
    squared = factor**2 if factor_unit(phase) == "distance" else factor  # one order for both
    return str(k), f"{target} {factor_text(phase)}", float(k), (1, target, squared)


def phase_factor_table(runs: Sequence[Run]) -> pd.DataFrame | None:
    """Final accuracy (%, mean ± std over seeds) by decentralized phase k x factor.

    None unless the runs form a grid: at least two dec-phase-k runs in at least
    two different cells. Runs of other shapes are left out.
    """
    cells: dict[tuple, list[float]] = {}
    row_keys: dict[tuple, tuple] = {}
    col_keys: dict[str, tuple] = {}
    for run in runs:
        cell = kong_cell(run)
        if cell is None:
            continue
        phase, factor, row_key, col_key = cell
        row = (run.topology or "", run.world_size, phase)
        row_keys[row] = (row[0], row[1] or 0, row_key)
        col_keys[factor] = col_key
        cells.setdefault((row, factor), []).append(run_summary(run)["final_test_acc"])
    decentral = {k: v for k, v in cells.items() if k[0][2] != "all exact"}
    if len(decentral) < 2 or sum(len(v) for v in decentral.values()) < 2:
        return None
    cols = sorted(col_keys, key=col_keys.__getitem__)
    out = []
    for row in sorted(row_keys, key=row_keys.__getitem__):
        record: dict[str, Any] = {"topology": row[0], "n": row[1], "phase k": row[2]}
        for col in cols:
            accs = pd.Series(cells.get((row, col), []), dtype=float)
            std = float(accs.std(ddof=1)) if accs.count() > 1 else math.nan
            record[col] = f"{pm(float(accs.mean()), std)} (n={len(accs)})" if len(accs) else ""
        out.append(record)
    return pd.DataFrame(out)

"""Verdicts on the consensus-control claims (issue 6) from the study's run files.

    python -m dsgd_mpi.analysis.claims runs/study/fmnist/*.h5 --out docs

Writes ``OUT/RESULTS.md`` and its plots into ``OUT/study/``. A run's cell is its
``run.name`` without the ``_sS`` seed suffix (configs/study/generate.py).
Accuracy is the averaged model's final test accuracy. Rules, in percentage
points (pp): for two cells a and b, ``d = mean(a) - mean(b)`` and
``se = sqrt(sd_a^2/n_a + sd_b^2/n_b)`` (floored at 0.05 pp, NaN with one seed);
a is *clearly above* b when ``d > 2 se``, *clearly below* when ``d < -2 se``,
else *within noise*. Gossip rounds and bytes are whole-run totals (exact when
``metrics.log_every`` is 1, else scaled by it and marked ~).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dsgd_mpi.analysis.load import Run
from dsgd_mpi.analysis.plots import plot_rounds, plot_test_acc
from dsgd_mpi.analysis.tables import pm
from dsgd_mpi.topology import Topology

SE_FLOOR = 0.05
"""pp: two cells closer than 2 x this are never told apart."""
CHANCE = 0.15
"""A final accuracy at or below this (10 classes) counts as diverged."""


@dataclass(frozen=True)
class Verdict:
    claim: str
    verdict: str  # reproduced | not reproduced | inconclusive
    reason: str


def cell_of(run: Run) -> str:
    return re.sub(r"_s\d+$", "", run.name)


def run_stats(run: Run) -> dict:
    """One row per run: accuracy, whole-run rounds and bytes, consensus diagnostics."""
    s, ev = run.steps, run.eval
    every = int(run.config.get("metrics", {}).get("log_every", 1))
    acc = pd.to_numeric(ev["test_acc"], errors="coerce").dropna()
    exact, bound = s["consensus_exact"].to_numpy(float), s["consensus_bound"].to_numpy(float)
    checked = np.isfinite(exact) & np.isfinite(bound)
    comm = s["gossip_rounds"].to_numpy(float) > 0
    est, target = s["consensus_estimate"].to_numpy(float), s["target"].to_numpy(float)
    return {
        "run": run.name, "cell": cell_of(run), "seed": run.config.get("run", {}).get("seed"),
        "n": run.world_size, "topology": run.topology, "finished": run.finished,
        "acc": float(acc.iloc[-1]) if len(acc) else math.nan,
        "rounds": float(s["gossip_rounds"].sum()) * every,
        "bytes": float(s["bytes_sent"].sum()) * every, "exact_totals": every == 1,
        "rounds_per_step": float(s["gossip_rounds"][comm].mean()) if comm.any() else math.nan,
        "met": float(np.mean(est[comm] <= target[comm])) if comm.any() else math.nan,
        "mean_exact": float(np.nanmean(exact)) if np.isfinite(exact).any() else math.nan,
        "bound_checked": int(checked.sum()),
        "bound_violations": int(np.sum(exact[checked] > bound[checked] * (1 + 1e-6) + 1e-12)),
    }  # fmt: skip


def cell_table(stats: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof 1) over seeds per cell; accuracy in %."""
    g = stats.assign(acc=100 * stats["acc"]).groupby("cell", sort=False)
    out = g.agg(seeds=("acc", "size"), acc_mean=("acc", "mean"), acc_std=("acc", "std"),
                rounds=("rounds", "mean"), bytes=("bytes", "mean"),
                rounds_per_step=("rounds_per_step", "mean"), met=("met", "mean"),
                mean_exact=("mean_exact", "mean"),
                exact_totals=("exact_totals", "all"))  # fmt: skip
    return out


def compare(t: pd.DataFrame, a: str, b: str) -> tuple[float, float]:
    """(d, se) in pp of cell a minus cell b; NaN when a cell is missing or has one seed."""
    if a not in t.index or b not in t.index:
        return math.nan, math.nan
    x, y = t.loc[a], t.loc[b]
    se = math.sqrt(x.acc_std**2 / x.seeds + y.acc_std**2 / y.seeds)
    return float(x.acc_mean - y.acc_mean), max(se, SE_FLOOR) if math.isfinite(se) else math.nan


def relation(d: float, se: float) -> str:
    if not (math.isfinite(d) and math.isfinite(se)):
        return "unknown"
    return "above" if d > 2 * se else "below" if d < -2 * se else "noise"


def _fmt(d: float, se: float) -> str:
    return f"{d:+.2f} pp (2se {2 * se:.2f})"


def _sizes(t: pd.DataFrame) -> list[int]:
    found = {int(m.group(1)) for c in t.index if (m := re.fullmatch(r"ring_n(\d+)", c))}
    return sorted(n for n in found if f"complete_n{n}" in t.index)


def claim1(t: pd.DataFrame) -> Verdict:
    ns = _sizes(t)
    name = "1: ring below C-SGD, gap grows with n"
    if len(ns) < 2:
        return Verdict(name, "inconclusive", "needs ring and complete at two world sizes")
    gaps = {n: compare(t, f"complete_n{n}", f"ring_n{n}") for n in ns}
    lo, hi = gaps[ns[0]], gaps[ns[-1]]
    grow = (hi[0] - lo[0], math.sqrt(hi[1] ** 2 + lo[1] ** 2))
    text = "; ".join(f"gap n={n}: {_fmt(*g)}" for n, g in gaps.items())
    text += f"; growth n={ns[0]}->{ns[-1]}: {_fmt(*grow)}"
    below, grows = relation(*hi), relation(*grow)
    if below == "above" and grows == "above":
        return Verdict(name, "reproduced", text)
    if below == "below" or grows == "below":
        return Verdict(name, "not reproduced", text + " (ring clearly not below or gap shrinks)")
    return Verdict(name, "inconclusive", text + " (a part is within noise)")


def claim2(t: pd.DataFrame, n: int) -> Verdict:
    name = "2: controlling phase 1 to 1/2, 1/4 closes most of the gap; tighter adds little"
    gap = compare(t, f"complete_n{n}", f"dec-phase-1_none_n{n}")
    text = f"gap C-SGD - dec-phase-1 uncontrolled: {_fmt(*gap)}"
    if relation(*gap) != "above":
        return Verdict(name, "inconclusive", text + "; no clear gap to close")
    closed = {}
    for f in ("0.5", "0.25"):
        d = compare(t, f"dec-phase-1_f{f}_n{n}", f"dec-phase-1_none_n{n}")[0]
        closed[f] = d / gap[0]
        text += f"; f{f} closes {100 * closed[f]:.0f}%"
    tighter = compare(t, f"complete_n{n}", f"dec-phase-1_f0.25_n{n}")
    text += f"; exact (f=0) - f0.25: {_fmt(*tighter)}"
    if min(closed.values()) >= 0.5 and relation(*tighter) != "above":
        return Verdict(name, "reproduced", text + " (both close >= 50%, exact adds no clear gain)")
    if max(closed.values()) < 0.5 and relation(*tighter) == "above":
        return Verdict(name, "not reproduced", text + " (neither closes 50%, exact clearly better)")
    return Verdict(name, "inconclusive", text + " (rule: both close >= 50% and exact no better)")


def _resolves(t: pd.DataFrame, n: int, se: float) -> tuple[bool, str]:
    """Whether 2 se is below the ring's gap to C-SGD: a hurt that size would be seen."""
    gap = compare(t, f"complete_n{n}", f"ring_n{n}")[0]
    ok = math.isfinite(se) and math.isfinite(gap) and gap > 2 * se
    return ok, f"resolution 2se {2 * se:.2f} vs ring gap {gap:.2f} pp"


def claim3(t: pd.DataFrame, n: int) -> Verdict:
    name = "3: consensus distance in phase 2 does not hurt (dec-phase-2 >= C-SGD)"
    cells = [c for c in (f"dec-phase-2_none_n{n}", f"dec-phase-2_f0.5_n{n}") if c in t.index]
    if not cells:
        return Verdict(name, "inconclusive", "no dec-phase-2 runs")
    rels = {c: compare(t, c, f"complete_n{n}") for c in cells}
    text = "; ".join(f"{c} - C-SGD: {_fmt(*r)}" for c, r in rels.items())
    if any(relation(*r) == "below" for r in rels.values()):
        return Verdict(name, "not reproduced", text + " (clearly below C-SGD)")
    ok, res = _resolves(t, n, max(r[1] for r in rels.values()))
    if not ok:
        return Verdict(name, "inconclusive", f"{text}; {res}: too coarse to see a hurt")
    helps = any(relation(*r) == "above" for r in rels.values())
    return Verdict(name, "reproduced", f"{text}; {res}" + (" (and helps)" if helps else ""))


def claim4(t: pd.DataFrame, n: int) -> Verdict:
    name = "4: controlling phase 1 only recovers C-SGD with far fewer rounds than all phases"
    g, w = f"guideline_f0.25_n{n}", f"whole_f0.25_n{n}"
    if g not in t.index or w not in t.index:
        return Verdict(name, "inconclusive", "guideline or whole-run runs missing")
    rel = compare(t, g, f"complete_n{n}")
    ratio = t.loc[g, "rounds"] / t.loc[w, "rounds"]
    text = f"guideline - C-SGD: {_fmt(*rel)}; rounds guideline / whole = {ratio:.2f}"
    if relation(*rel) == "below" or ratio > 0.5:
        return Verdict(name, "not reproduced", text + " (rule: not below C-SGD, ratio <= 0.5)")
    ok, res = _resolves(t, n, rel[1])
    if not ok:
        return Verdict(name, "inconclusive", f"{text}; {res}")
    return Verdict(name, "reproduced", f"{text}; {res}")


def claim5(t: pd.DataFrame, n: int) -> Verdict:
    name = "5: at a large batch D-SGD beats C-SGD; at a small batch they are close"
    small = (f"sb_ring_n{n}", f"sb_complete_n{n}")
    if small[0] not in t.index:
        small = (f"ring_n{n}", f"complete_n{n}")
    lb, sb = compare(t, f"lb_ring_n{n}", f"lb_complete_n{n}"), compare(t, *small)
    text = f"large: ring - C-SGD {_fmt(*lb)}; small: ring - C-SGD {_fmt(*sb)}"
    diverged = [c for c in ("ring", "complete") if f"lb_{c}_n{n}" in t.index
                and t.loc[f"lb_{c}_n{n}", "acc_mean"] <= 100 * CHANCE]  # fmt: skip
    if "complete" in diverged:  # the claim is about generalization: both must train
        what = "both large-batch cells" if len(diverged) == 2 else "C-SGD at large batch"
        return Verdict(name, "inconclusive", f"{text} ({what} diverged: stability, not "
                       "generalization)")  # fmt: skip
    if relation(*lb) == "above" and abs(sb[0]) < lb[0]:
        return Verdict(name, "reproduced", text)
    if relation(*lb) == "below":
        return Verdict(name, "not reproduced", text + " (C-SGD clearly better at large batch)")
    return Verdict(name, "inconclusive", text + " (rule: large clearly above, |small| < large)")


def claim6(stats: pd.DataFrame, t: pd.DataFrame, n: int) -> list[Verdict]:
    checked, bad = int(stats["bound_checked"].sum()), int(stats["bound_violations"].sum())
    text = f"{checked} logged (exact, bound) pairs on static graphs, {bad} with exact > bound"
    a = Verdict(
        "6a: the estimate's bound holds through training",
        "inconclusive" if not checked else "not reproduced" if bad else "reproduced",
        text,
    )
    name = "6b: one-peer exponential reaches a target in far fewer rounds than the ring"
    r, o = f"adaptive_ring_n{n}", f"adaptive_onepeer_n{n}"
    if r not in t.index or o not in t.index:
        return [a, Verdict(name, "inconclusive", "adaptive ring / one-peer runs missing")]
    ro, rr = t.loc[o, "rounds_per_step"], t.loc[r, "rounds_per_step"]
    eo, er = t.loc[o, "mean_exact"], t.loc[r, "mean_exact"]
    text = (f"same adaptive target on the estimate: rounds/step one-peer {ro:.2f} vs ring "
            f"{rr:.2f}, target met {100 * t.loc[o, 'met']:.0f}% vs {100 * t.loc[r, 'met']:.0f}% "
            f"of steps, mean exact distance {eo:.3g} vs {er:.3g}; rounds for a 100x smaller "
            f"worst-case distance: one-peer {contraction_rounds('one_peer_exponential', n)}, "
            f"ring {contraction_rounds('ring', n)}")  # fmt: skip
    if ro <= rr and eo <= 0.1 * er:
        return [a, Verdict(name, "reproduced", text + " (no more rounds, >= 10x closer)")]
    if ro > rr and eo >= er:
        return [a, Verdict(name, "not reproduced", text + " (more rounds, no closer)")]
    return [a, Verdict(name, "inconclusive", text + " (rule: rounds <= ring's, exact <= 1/10)")]


def contraction_rounds(name: str, n: int, factor: float = 0.01, limit: int = 10_000) -> int | None:
    """Gossip rounds t until ||W(t-1)...W(0) - J||^2 <= factor: any start, that much closer."""
    topo = Topology(name, n)
    j = np.full((n, n), 1.0 / n)
    prod = np.eye(n)
    for t in range(limit):
        prod = topo.matrix(t) @ prod
        if np.linalg.norm(prod - j, 2) ** 2 <= factor:
            return t + 1
    return None


# ------------------------------------------------------------------- output


def _plots(runs: Sequence[Run], out: str) -> dict[str, str]:
    """PNG per claim from seed-0 runs; returns claim -> markdown image lines."""
    os.makedirs(out, exist_ok=True)
    first = {cell_of(r): r for r in runs if r.config.get("run", {}).get("seed") == 0}
    pick = lambda pattern: [r for c, r in first.items() if re.fullmatch(pattern, c)]  # noqa: E731
    groups = {
        "1": ("claim1_acc", plot_test_acc, r"(ring|complete)_n\d+"),
        "2": ("claim2_acc", plot_test_acc, r"(complete|dec-phase-1_.*)_n\d+"),
        "3": ("claim3_acc", plot_test_acc, r"(complete|ring|dec-phase-2_.*)_n\d+"),
        "4": ("claim4_rounds", plot_rounds, r"(guideline|whole)_.*"),
        "5": ("claim5_acc", plot_test_acc, r"(lb|sb)_.*"),
        "6b": ("claim6_rounds", plot_rounds, r"adaptive_.*"),
    }
    md: dict[str, str] = {}
    for claim, (stem, plot, pattern) in groups.items():
        if chosen := pick(pattern):
            plot(chosen, os.path.join(out, f"{stem}.png"))
            md[claim] = f"![{stem}](study/{stem}.png)\n"
    refs = pick(r"ring_n\d+")
    if refs:
        ring = max(refs, key=lambda r: r.world_size or 0)
        fig = Figure(figsize=(7, 4.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        s = ring.steps
        ax.plot(s["step"], s["consensus_bound"], lw=1, label="bound e²/(1-λ₂)²")
        ax.plot(s["step"], s["consensus_estimate"], lw=1, label="estimate e²")
        m = np.isfinite(s["consensus_exact"].to_numpy(float))
        ax.plot(s["step"][m], s["consensus_exact"][m], "o", ms=3, label="exact Ξ²")
        ax.set(yscale="log", xlabel="step", title=f"{ring.name}: consensus distance")
        ax.legend(fontsize=8)
        fig.savefig(os.path.join(out, "claim6_bound.png"), dpi=100)
        md["6a"] = "![claim6_bound](study/claim6_bound.png)\n"
    return md


def _cells_md(t: pd.DataFrame, cells: Sequence[str]) -> str:
    rows = [c for c in cells if c in t.index]
    if not rows:
        return ""
    shown = pd.DataFrame({
        "cell": rows, "seeds": [int(t.loc[c, "seeds"]) for c in rows],
        "final acc %": [pm(t.loc[c, "acc_mean"], t.loc[c, "acc_std"], scale=1) for c in rows],
        "gossip rounds": [("" if t.loc[c, "exact_totals"] else "~") + f"{t.loc[c, 'rounds']:,.0f}"
                          for c in rows],
        "MB sent (rank 0)": [f"{t.loc[c, 'bytes'] / 1e6:,.1f}" for c in rows],
        "rounds/step": [f"{t.loc[c, 'rounds_per_step']:.2f}" for c in rows],
    })  # fmt: skip
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def results(runs: Sequence[Run], out: str, note: str = "") -> str:
    """Write OUT/RESULTS.md (and OUT/study/*.png); returns the markdown."""
    stats = pd.DataFrame([run_stats(r) for r in runs])
    t = cell_table(stats)
    n = max(_sizes(t) or [int(stats["n"].max())])
    verdicts = [claim1(t), claim2(t, n), claim3(t, n), claim4(t, n), claim5(t, n),
                *claim6(stats, t, n)]  # fmt: skip
    cells = {
        "1": [f"{k}_n{m}" for m in _sizes(t) for k in ("ring", "complete")],
        "2": [
            f"{c}_n{n}"
            for c in ("complete", "dec-phase-1_none", "dec-phase-1_f0.5", "dec-phase-1_f0.25")
        ],  # fmt: skip
        "3": [f"{c}_n{n}" for c in ("complete", "ring", "dec-phase-2_none", "dec-phase-2_f0.5")],
        "4": [f"{c}_n{n}" for c in ("complete", "guideline_f0.25", "whole_f0.25")],
        "5": [f"{c}_n{n}" for c in ("sb_ring", "sb_complete", "lb_ring", "lb_complete")],
        "6b": [f"adaptive_{c}_n{n}" for c in ("ring", "onepeer")],
    }
    images = _plots(runs, os.path.join(out, "study"))
    md = ["# Consensus-control study: results\n", __doc__.split("\n\n", 2)[2].strip() + "\n"]
    md += [note + "\n"] if note else []
    md += ["| claim | verdict |", "|---|---|"]
    md += [f"| {v.claim} | **{v.verdict}** |" for v in verdicts]
    for v in verdicts:
        key = v.claim.split(":")[0]
        md += [f"\n## Claim {v.claim}\n", _cells_md(t, cells.get(key, [])), images.get(key, "")]
        md += [f"**Verdict: {v.verdict}.** {v.reason}\n"]
    per_run = stats[["run", "n", "topology", "acc", "rounds", "bytes", "finished"]].assign(
        acc=100 * stats["acc"], bytes=stats["bytes"] / 1e6
    )
    md += ["\n## Every run\n", "Final accuracy %, whole-run gossip rounds, MB sent by rank 0.\n",
           per_run.to_markdown(index=False, floatfmt=".2f")]  # fmt: skip
    text = "\n".join(md) + "\n"
    with open(os.path.join(out, "RESULTS.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    stats.to_csv(os.path.join(out, "study", "runs.csv"), index=False)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    from dsgd_mpi.analyze import read_runs

    parser = argparse.ArgumentParser(prog="python -m dsgd_mpi.analysis.claims")
    parser.add_argument("files", nargs="+", metavar="RUN.h5")
    parser.add_argument("--out", default="docs", help="directory of RESULTS.md (default docs)")
    parser.add_argument("--note", default="", help="a line for the top (e.g. the wall time)")
    args = parser.parse_args(argv)
    runs = read_runs(args.files)
    if not runs:
        print("error: none of the files could be read", file=sys.stderr)
        return 2
    results(runs, args.out, args.note)
    print(f"wrote {os.path.join(args.out, 'RESULTS.md')} from {len(runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Verdicts on the consensus-control claims (issue 6) from the study's run files.

A run's cell is its ``run.name`` without the ``_sS`` seed suffix
(configs/study/generate.py). Accuracy is the averaged model's final test
accuracy. Rules, in percentage points (pp): for two cells a and b,
``d = mean(a) - mean(b)`` and ``se = sqrt(sd_a^2/n_a + sd_b^2/n_b)`` over seeds
(floored at 0.05 pp, NaN with one seed); a is *clearly above* b when
``d > 2 se``, *clearly below* when ``d < -2 se``, else *within noise*; a
difference within noise counts as *absent* when the test could have seen 0.5 pp
(``2 se < 0.5``). Gossip rounds and bytes are whole-run totals (exact when
``metrics.log_every`` is 1, else scaled by it, ~). Each verdict names its rule.

Pure numbers to verdicts; ``dsgd_mpi.analysis.report`` writes docs/RESULTS.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dsgd_mpi.analysis.load import Run
from dsgd_mpi.topology import Topology

SE_FLOOR = 0.05
"""pp: two cells closer than 2 x this are never told apart."""
MIN_EFFECT = 0.5
"""pp: a difference within noise is absent (not just unseen) when 2 se is below this."""
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
    checked = np.isfinite(bound) & (np.nan_to_num(exact) > 0)  # exact phases: 0 <= anything
    comm = s["gossip_rounds"].to_numpy(float) > 0
    est, target = s["consensus_estimate"].to_numpy(float), s["target"].to_numpy(float)
    # lr stages (between the decays), the same for every cell whatever its consensus phases
    epochs, ms = run.config.get("run", {}).get("epochs", 1), run.config.get("optim", {})
    bounds = [m * epochs + 1e-9 for m in ms.get("milestones", [])]
    stage = np.searchsorted(bounds, s["epoch"].to_numpy(float), side="left")
    return {
        "run": run.name, "cell": cell_of(run), "seed": run.config.get("run", {}).get("seed"),
        "n": run.world_size, "topology": run.topology, "finished": run.finished,
        "acc": float(acc.iloc[-1]) if len(acc) else math.nan,
        "rounds": float(s["gossip_rounds"].sum()) * every,
        "bytes": float(s["bytes_sent"].sum()) * every, "exact_totals": every == 1,
        "rounds_per_step": float(s["gossip_rounds"][comm].mean()) if comm.any() else math.nan,
        "met": float(np.mean(est[comm] <= target[comm])) if comm.any() else math.nan,
        "mean_exact": _mean(exact),
        **{f"exact_p{k + 1}": _mean(exact[stage == k]) for k in range(3)},
        "bound_checked": int(checked.sum()),
        "bound_violations": int(np.sum(exact[checked] > bound[checked] * (1 + 1e-6) + 1e-12)),
    }  # fmt: skip


def _mean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def cell_table(stats: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (ddof 1) over seeds per cell; accuracy in %."""
    g = stats.assign(acc=100 * stats["acc"]).groupby("cell", sort=False)
    out = g.agg(seeds=("acc", "size"), acc_mean=("acc", "mean"), acc_std=("acc", "std"),
                rounds=("rounds", "mean"), bytes=("bytes", "mean"),
                rounds_per_step=("rounds_per_step", "mean"), met=("met", "mean"),
                mean_exact=("mean_exact", "mean"), exact_p1=("exact_p1", "mean"),
                exact_p2=("exact_p2", "mean"), exact_p3=("exact_p3", "mean"),
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
    """above / below / absent (within noise, resolution < MIN_EFFECT) / noise / unknown."""
    if not (math.isfinite(d) and math.isfinite(se)):
        return "unknown"
    if abs(d) <= 2 * se:
        return "absent" if 2 * se < MIN_EFFECT else "noise"
    return "above" if d > 0 else "below"


def _fmt(d: float, se: float) -> str:
    return f"{d:+.2f} pp (2se {2 * se:.2f})"


def sizes(t: pd.DataFrame) -> list[int]:
    found = {int(m.group(1)) for c in t.index if (m := re.fullmatch(r"ring_n(\d+)", c))}
    return sorted(n for n in found if f"complete_n{n}" in t.index)


def claim1(t: pd.DataFrame) -> Verdict:
    ns = sizes(t)
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
    if below in ("below", "absent") or grows in ("below", "absent"):
        return Verdict(name, "not reproduced", text + " (no gap, or it does not grow)")
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
    if not all(map(math.isfinite, closed.values())) or relation(*tighter) == "unknown":
        return Verdict(name, "inconclusive", text + " (controlled runs missing)")
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
    if relation(*lb) in ("below", "absent"):
        return Verdict(name, "not reproduced", text + " (D-SGD not better at large batch)")
    return Verdict(name, "inconclusive", text + " (rule: large clearly above, |small| < large)")


def claim6(stats: pd.DataFrame, t: pd.DataFrame, n: int) -> list[Verdict]:
    checked, bad = int(stats["bound_checked"].sum()), int(stats["bound_violations"].sum())
    text = f"{checked} logged pairs (exact > 0, bound) on static graphs, {bad} with exact > bound"
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

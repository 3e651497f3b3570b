"""Verdicts on the consensus-distance claims (issue 16) from the study's run files.

A run's cell is its ``run.name`` without the ``_sS`` seed suffix
(studies/consensus/generate.py). Accuracy is the averaged model's final test
accuracy in %. For two cells a and b and a quantity q, ``d = mean(a) - mean(b)``
and ``se = sqrt(sd_a^2/n_a + sd_b^2/n_b)`` over seeds (NaN with fewer than two
seeds; for accuracy floored at 0.05 pp); a is *clearly above* b when
``d > 2 se``, *clearly below* when ``d < -2 se``, else *within noise*; a
difference within noise counts as *absent* when the test could have seen a
difference that matters (``2 se`` below 0.5 pp for accuracy, below 10 % of b's
mean for the other quantities). Gossip rounds and bytes are whole-run totals.
Each claim's rule (``RULES`` in studies/consensus/claims.py) was written before any run.

Pure numbers to verdicts; ``studies.consensus.report`` writes docs/RESULTS.md.
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
"""pp: two accuracy cells closer than 2 x this are never told apart."""
MIN_EFFECT = 0.5
"""pp: an accuracy difference within noise is absent (not just unseen) when 2 se is below this."""
REL_EFFECT = 0.10
"""Other quantities: a difference within noise is absent when 2 se < this x the reference mean."""
CHANCE = 15.0
"""%: a final accuracy at or below this (10 classes) counts as diverged."""
CLOSES = 0.5
"""Claim 2: 'most of the gap' is at least this fraction of it."""
FAR_FEWER = 0.5
"""Claims 4 and 5: 'far fewer' rounds is at most this fraction of the other's."""
HELD = 0.9
"""A control held when the measured distance met its target on at least this share of steps."""
PHASES = 3

RULES = {
    "1": "Sizes n with ring and C-SGD on the simulator. Reproduced when C-SGD is clearly above "
         "the ring at the largest n **and** the gap at the largest n is clearly above the gap at "
         "the smallest (the growth's se combines both gaps'). Not reproduced when either is "
         "clearly below or absent; otherwise inconclusive. Beside it, the MPI check: each MPI "
         "cell *agrees* with the simulator cell of the same recipe when their difference is "
         "within noise (|d| <= 2 se), else they *differ*; an MPI cell of one seed takes the "
         "simulator cell's spread (se = sd x sqrt(1 + 1/k) over its k seeds).",
    "2": f"gap = C-SGD - dec-phase-1_none. Inconclusive unless the gap is clearly above 0, or if "
         f"a controlled cell held its target on fewer than {HELD:.0%} of its controlled steps. "
         f"Reproduced when f0.5 and f0.25 each close at least {CLOSES:.0%} of the gap "
         f"((f - none) / gap) **and** f0.125 is not clearly above f0.25 (1/8 adds little). Not "
         f"reproduced when f0.25 closes less than {CLOSES:.0%} while C-SGD stays clearly above "
         f"it, or when f0.125 is clearly above f0.25.",
    "3": "dec-phase-2 (uncontrolled, and held at 1/2 of dec-phase-2_none's maximum) against "
         "C-SGD. Not reproduced when either is clearly below C-SGD. Inconclusive when the "
         "resolution (2 se) is not below the ring's gap to C-SGD at the same n (a hurt that "
         "size would go unseen) or the control did not hold. Otherwise reproduced ('and helps' "
         "when one is clearly above).",
    "4": f"guideline_f0.25 (phase 1 held at 1/4, later phases free) against C-SGD, and its "
         f"whole-run gossip rounds against whole_f0.25 (every phase held at 1/4 of its "
         f"dec-phase-k_none maximum). Not reproduced when the guideline is clearly below C-SGD "
         f"or needs more than {FAR_FEWER:g}x the rounds of whole_f0.25; inconclusive when the "
         f"resolution is not below the ring's gap or a control did not hold; else reproduced.",
    "5": f"(a) Every logged step of a static graph with a positive exact distance measured "
         f"right after the round (gossip order local_first) satisfies Xi^2 <= e2 / "
         f"(1 - lambda_2)^2 (reproduced when none violates it). (b) The same "
         f"exact-distance rule (Xi^2 <= lr^2 EMA(|g|^2), gossip until met or 60 rounds) on the "
         f"ring and on the one-peer exponential graph: reproduced when one-peer met it on at "
         f"least {HELD:.0%} of steps with at most {FAR_FEWER:g}x the ring's rounds per step; not "
         f"reproduced when the ring met it as often and one-peer needed more than that.",
    "6": "Zhu's recipe, steps fixed. Reproduced when D-SGD (ring) is clearly above C-SGD at the "
         "large batch **and** the small-batch difference is smaller in size than the large-batch "
         "one. Not reproduced when D-SGD is clearly below or absent at the large batch; "
         "inconclusive otherwise, and when C-SGD diverged at the large batch (a stability "
         "question, not generalization).",
    "7": "At the large batch, D-SGD's averaged model against C-SGD's: reproduced when both "
         "lambda_max and the Hessian trace are clearly below; not reproduced when either is "
         "clearly above or absent; otherwise inconclusive.",
    "8": "In the large-batch D-SGD runs, per seed the ensemble's value minus the averaged "
         "model's (paired over seeds): reproduced when both ECE and NLL are clearly lower for "
         "the ensemble; not reproduced when either is clearly higher or absent (2 se below 10 % "
         "of the averaged model's value); otherwise inconclusive.",
    "9": "For accuracy and for lambda_max: gap = D-SGD - C-SGD must be clear (else that part is "
         "inconclusive); avg-SAM moves C-SGD towards D-SGD when avg-SAM - C-SGD is clearly of "
         "the gap's sign **and** |avg-SAM - D-SGD| < |gap|. Reproduced when it does for both; "
         "not reproduced when for either avg-SAM moves clearly away, or its move is absent, or "
         "it overshoots beyond D-SGD by more than the gap.",
}  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    key: str
    """Claim number ('1'..'9', '1-mpi', '5a', '5b')."""
    claim: str
    verdict: str  # reproduced | not reproduced | inconclusive (agree | differ for 1-mpi)
    reason: str


def cell_of(run: Run) -> str:
    return re.sub(r"_s\d+$", "", run.name)


# ----------------------------------------------------------------- per run


def _col(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame:
        return np.full(len(frame), math.nan)
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(float)


def _last(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else math.nan


def _mean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def _total(steps: pd.DataFrame, name: str, every: int) -> float:
    """Whole-run total: the running total of the last row, else the logged rows x log_every."""
    running = _last(_col(steps, f"{name}_total"))
    return running if math.isfinite(running) else float(np.nansum(_col(steps, name))) * every


def _stages(run: Run, steps: np.ndarray) -> np.ndarray:
    """Each row's lr stage (0-based, between the decays); the consensus phase when it has three."""
    phases = run.config.get("consensus", {}).get("phases") or [{}]
    if len(phases) == PHASES:
        return _col(run.steps, "phase")
    total = steps.max() if len(steps) else 1.0
    milestones = run.config.get("optim", {}).get("milestones", [])
    return np.searchsorted(np.asarray(milestones) * total, steps - 0.5, side="right")


def run_stats(run: Run) -> dict:
    """One row per run: final evaluation, whole-run communication, distances per stage."""
    s, ev = run.steps, run.eval
    every = int(run.config.get("metrics", {}).get("log_every", 1))
    step, rounds = _col(s, "step"), _col(s, "gossip_rounds")
    exact, measured, target = (_col(s, c) for c in
                               ("consensus_exact", "consensus_measured", "target"))  # fmt: skip
    bound = _col(s, "consensus_bound")
    controlled = np.isfinite(target) & (target > 0)
    met = measured <= target * (1 + 1e-9)
    stage = _stages(run, step)
    # The bound is on the distance right after a round: gossip_first applies the gradient after
    # the round, so its logged distance is not the one bounded. Exact phases: 0 <= anything.
    after_round = run.config.get("gossip", {}).get("order", "local_first") == "local_first"
    checked = np.isfinite(bound) & (np.nan_to_num(exact) > 0) & after_round
    row = {
        "run": run.name, "cell": cell_of(run), "seed": run.config.get("run", {}).get("seed"),
        "n": run.world_size, "topology": run.topology, "backend": run.attrs.get("backend", "mpi"),
        "finished": run.finished, "steps": _last(step),
        "acc": 100 * _last(_col(ev, "test_acc")), "nll": _last(_col(ev, "test_nll")),
        "ece": _last(_col(ev, "test_ece")), "ens_acc": 100 * _last(_col(ev, "ensemble_acc")),
        "ens_nll": _last(_col(ev, "ensemble_nll")), "ens_ece": _last(_col(ev, "ensemble_ece")),
        "lambda_max": _last(_col(ev, "sharpness_lambda_max")),
        "trace": _last(_col(ev, "sharpness_trace")),
        "rounds": _total(s, "gossip_rounds", every), "bytes": _total(s, "bytes_sent", every),
        "rounds_per_step": _mean(np.where(rounds > 0, rounds, np.nan)),
        "held": float(np.mean(met[controlled])) if controlled.any() else math.nan,
        "mean_exact": _mean(exact),
        "bound_checked": int(checked.sum()),
        "bound_violations": int(np.sum(exact[checked] > bound[checked] * (1 + 1e-6) + 1e-12)),
    }  # fmt: skip
    for k in range(PHASES):
        here = stage == k
        ctl = here & controlled
        row[f"exact_p{k + 1}"] = _mean(np.where(here, exact, np.nan))
        row[f"max_p{k + 1}"] = float(np.nanmax(exact[here])) if np.isfinite(exact[here]).any() \
            else math.nan  # fmt: skip
        row[f"target_p{k + 1}"] = float(np.median(target[ctl])) if ctl.any() else math.nan
        row[f"held_p{k + 1}"] = float(np.mean(met[ctl])) if ctl.any() else math.nan
        row[f"rps_p{k + 1}"] = _mean(np.where(here & (rounds > 0), rounds, np.nan))
    return row


# ----------------------------------------------------------------- per cell


class Cells:
    """The runs' rows grouped by cell: values over seeds, means, and comparisons."""

    def __init__(self, stats: pd.DataFrame) -> None:
        self.stats = stats
        self.names = list(dict.fromkeys(stats["cell"])) if len(stats) else []

    def __contains__(self, cell: str) -> bool:
        return cell in self.names

    def values(self, cell: str, col: str) -> np.ndarray:
        if cell not in self:
            return np.array([])
        v = self.stats.loc[self.stats["cell"] == cell, col].to_numpy(float)
        return v[np.isfinite(v)]

    def mean(self, cell: str, col: str) -> float:
        v = self.values(cell, col)
        return float(v.mean()) if len(v) else math.nan

    def std(self, cell: str, col: str) -> float:
        v = self.values(cell, col)
        return float(v.std(ddof=1)) if len(v) > 1 else math.nan

    def seeds(self, cell: str) -> int:
        return int((self.stats["cell"] == cell).sum()) if cell in self else 0

    def compare(self, a: str, b: str, col: str = "acc") -> tuple[float, float]:
        """(d, se) of cell a minus cell b over seeds; NaN unless one cell has two seeds and the
        other at least one. A cell of one run is given the other cell's spread."""
        x, y = self.values(a, col), self.values(b, col)
        if min(len(x), len(y)) < 1 or max(len(x), len(y)) < 2:
            return math.nan, math.nan
        vx = x.var(ddof=1) if len(x) > 1 else y.var(ddof=1)
        vy = y.var(ddof=1) if len(y) > 1 else x.var(ddof=1)
        se = math.sqrt(vx / len(x) + vy / len(y))
        return float(x.mean() - y.mean()), max(se, SE_FLOOR) if col == "acc" else se

    def paired(self, cell: str, a: str, b: str) -> tuple[float, float]:
        """(d, se) of column a minus column b within each run of a cell, over its seeds."""
        rows = self.stats[self.stats["cell"] == cell]
        diff = (rows[a] - rows[b]).to_numpy(float)
        diff = diff[np.isfinite(diff)]
        if len(diff) < 2:
            return math.nan, math.nan
        return float(diff.mean()), float(diff.std(ddof=1) / math.sqrt(len(diff)))


def relation(d: float, se: float, min_effect: float = MIN_EFFECT) -> str:
    """above / below / absent (within noise, resolution < min_effect) / noise / unknown."""
    if not (math.isfinite(d) and math.isfinite(se)):
        return "unknown"
    if abs(d) <= 2 * se:
        return "absent" if 2 * se < min_effect else "noise"
    return "above" if d > 0 else "below"


def _fmt(d: float, se: float, unit: str = " pp", digits: int = 2) -> str:
    return f"{d:+.{digits}f}{unit} (2se {2 * se:.{digits}f})"


def _gfmt(d: float, se: float) -> str:
    return f"{d:+.3g} (2se {2 * se:.2g})"


def sizes(c: Cells) -> list[int]:
    """World sizes with both ring and C-SGD cells on the simulator (claim 1)."""
    found = {int(m.group(1)) for name in c.names if (m := re.fullmatch(r"ring_n(\d+)", name))}
    return sorted(n for n in found if f"complete_n{n}" in c)


def main_size(c: Cells) -> int:
    """The world size of claims 2-9 (generate.py's "big"): the most common among their cells."""
    found = [int(m.group(1)) for name in c.names
             if (m := re.fullmatch(r"(?:dec-phase|guideline|whole|target|zhu)_.*_n(\d+)", name))]
    if found:
        return max(set(found), key=found.count)
    return max(sizes(c) or [int(c.stats["n"].max())])


def _unheld(c: Cells, cells: list[str]) -> str:
    """The controlled cells among ``cells`` whose control held on < HELD of its steps, as text."""
    weak = [f"{x} held {100 * c.mean(x, 'held'):.0f}%" for x in cells
            if x in c and c.mean(x, "held") < HELD]  # fmt: skip
    return "; ".join(weak)


# ------------------------------------------------------------------- claims


def claim1(c: Cells) -> Verdict:
    ns = sizes(c)
    name = "ring below C-SGD, gap grows with n"
    if len(ns) < 2:
        return Verdict("1", name, "inconclusive", "needs ring and C-SGD at two world sizes")
    gaps = {n: c.compare(f"complete_n{n}", f"ring_n{n}") for n in ns}
    lo, hi = gaps[ns[0]], gaps[ns[-1]]
    grow = (hi[0] - lo[0], math.sqrt(hi[1] ** 2 + lo[1] ** 2))
    text = "; ".join(f"gap n={n}: {_fmt(*g)}" for n, g in gaps.items())
    text += f"; growth n={ns[0]}->{ns[-1]}: {_fmt(*grow)}"
    below, grows = relation(*hi), relation(*grow)
    if below == "above" and grows == "above":
        return Verdict("1", name, "reproduced", text)
    if below in ("below", "absent") or grows in ("below", "absent"):
        return Verdict("1", name, "not reproduced", text + " (no gap, or it does not grow)")
    return Verdict("1", name, "inconclusive", text + " (a part is within noise)")


def mpi_check(c: Cells) -> Verdict:
    name = "the MPI runs agree with the simulator"
    pairs = [(m.removesuffix("_mpi"), m) for m in c.names if m.endswith("_mpi")]
    pairs = [(s, m) for s, m in pairs if s in c]
    if not pairs:
        return Verdict("1-mpi", name, "inconclusive", "no cell ran on both backends")
    rel = {m: c.compare(m, s) for s, m in pairs}
    text = "; ".join(f"{m} - simulator: {_fmt(*r)}" for m, r in rel.items())
    kinds = {relation(*r) for r in rel.values()}
    if kinds & {"above", "below"}:
        return Verdict("1-mpi", name, "differ", text)
    if "unknown" in kinds:
        return Verdict("1-mpi", name, "inconclusive", text + " (too few seeds)")
    return Verdict("1-mpi", name, "agree", text)


def _resolves(c: Cells, n: int, se: float) -> tuple[bool, str]:
    """Whether 2 se is below the ring's gap to C-SGD: a hurt that size would be seen."""
    gap = c.compare(f"complete_n{n}", f"ring_n{n}")[0]
    ok = math.isfinite(se) and math.isfinite(gap) and gap > 2 * se
    return ok, f"resolution 2se {2 * se:.2f} vs ring gap {gap:.2f} pp"


def claim2(c: Cells, n: int) -> Verdict:
    name = "Xi^2 held in phase 1 at 1/2, 1/4 of its maximum closes most of the gap; 1/8 adds little"
    none = f"dec-phase-1_none_n{n}"
    gap = c.compare(f"complete_n{n}", none)
    text = f"gap C-SGD - dec-phase-1_none: {_fmt(*gap)}"
    if relation(*gap) != "above":
        return Verdict("2", name, "inconclusive", text + "; no clear gap to close")
    closed = {}
    for f in ("0.5", "0.25"):
        closed[f] = c.compare(f"dec-phase-1_f{f}_n{n}", none)[0] / gap[0]
        text += f"; f{f} closes {100 * closed[f]:.0f}%"
    adds = c.compare(f"dec-phase-1_f0.125_n{n}", f"dec-phase-1_f0.25_n{n}")
    still = c.compare(f"complete_n{n}", f"dec-phase-1_f0.25_n{n}")
    text += f"; f0.125 - f0.25: {_fmt(*adds)}; C-SGD - f0.25: {_fmt(*still)}"
    if not all(map(math.isfinite, closed.values())) or relation(*adds) == "unknown":
        return Verdict("2", name, "inconclusive", text + " (controlled runs missing)")
    if weak := _unheld(c, [f"dec-phase-1_f{f}_n{n}" for f in ("0.5", "0.25", "0.125")]):
        return Verdict("2", name, "inconclusive", f"{text}; control did not hold: {weak}")
    if min(closed.values()) >= CLOSES and relation(*adds) != "above":
        return Verdict("2", name, "reproduced", text)
    if (closed["0.25"] < CLOSES and relation(*still) == "above") or relation(*adds) == "above":
        return Verdict("2", name, "not reproduced", text)
    return Verdict("2", name, "inconclusive", text)


def claim3(c: Cells, n: int) -> Verdict:
    name = "distance in phase 2 does not hurt (dec-phase-2 >= C-SGD)"
    cells = [x for x in (f"dec-phase-2_none_n{n}", f"dec-phase-2_f0.5_n{n}") if x in c]
    if not cells:
        return Verdict("3", name, "inconclusive", "no dec-phase-2 runs")
    rels = {x: c.compare(x, f"complete_n{n}") for x in cells}
    text = "; ".join(f"{x} - C-SGD: {_fmt(*r)}" for x, r in rels.items())
    if any(relation(*r) == "below" for r in rels.values()):
        return Verdict("3", name, "not reproduced", text + " (clearly below C-SGD)")
    ok, res = _resolves(c, n, max(r[1] for r in rels.values()))
    if not ok:
        return Verdict("3", name, "inconclusive", f"{text}; {res}: too coarse to see a hurt")
    if weak := _unheld(c, cells):
        return Verdict("3", name, "inconclusive", f"{text}; control did not hold: {weak}")
    helps = any(relation(*r) == "above" for r in rels.values())
    return Verdict("3", name, "reproduced", f"{text}; {res}" + (" (and helps)" if helps else ""))


def claim4(c: Cells, n: int) -> Verdict:
    name = "controlling phase 1 only recovers C-SGD with far fewer rounds than every phase"
    g, w = f"guideline_f0.25_n{n}", f"whole_f0.25_n{n}"
    if g not in c or w not in c:
        return Verdict("4", name, "inconclusive", "guideline or whole-run cells missing")
    rel = c.compare(g, f"complete_n{n}")
    ratio = c.mean(g, "rounds") / c.mean(w, "rounds")
    by = c.mean(g, "bytes") / c.mean(w, "bytes")
    text = f"guideline - C-SGD: {_fmt(*rel)}; guideline / whole: rounds {ratio:.2f}, bytes {by:.2f}"
    if relation(*rel) == "below" or ratio > FAR_FEWER:
        return Verdict("4", name, "not reproduced", text)
    ok, res = _resolves(c, n, rel[1])
    if not ok:
        return Verdict("4", name, "inconclusive", f"{text}; {res}")
    if weak := _unheld(c, [g, w]):
        return Verdict("4", name, "inconclusive", f"{text}; control did not hold: {weak}")
    return Verdict("4", name, "reproduced", f"{text}; {res}")


def claim5(c: Cells, n: int) -> list[Verdict]:
    stats = c.stats
    checked, bad = int(stats["bound_checked"].sum()), int(stats["bound_violations"].sum())
    text = f"{checked} logged steps (exact > 0, bound) on static graphs, {bad} with exact > bound"
    a = Verdict("5a", "the estimate bounds the exact distance",
                "inconclusive" if not checked else "not reproduced" if bad else "reproduced",
                text)  # fmt: skip
    name = "one-peer exponential meets an exact-distance target in far fewer rounds than the ring"
    r, o = f"target_ring_n{n}", f"target_onepeer_n{n}"
    if r not in c or o not in c:
        return [a, Verdict("5b", name, "inconclusive", "target_ring / target_onepeer missing")]
    ro, rr = c.mean(o, "rounds_per_step"), c.mean(r, "rounds_per_step")
    ho, hr = c.mean(o, "held"), c.mean(r, "held")
    text = (f"rounds/step one-peer {ro:.2f} vs ring {rr:.2f} (ratio {ro / rr:.2f}); target met "
            f"on {100 * ho:.0f}% vs {100 * hr:.0f}% of steps; mean exact distance "
            f"{c.mean(o, 'mean_exact'):.3g} vs {c.mean(r, 'mean_exact'):.3g}; worst-case rounds "
            f"to shrink any distance 100x: one-peer {contraction_rounds('one_peer_exponential', n)}"
            f", ring {contraction_rounds('ring', n)}")  # fmt: skip
    if ho >= HELD and ro <= FAR_FEWER * rr:
        return [a, Verdict("5b", name, "reproduced", text)]
    if hr >= HELD and ro > FAR_FEWER * rr:
        return [a, Verdict("5b", name, "not reproduced", text)]
    return [a, Verdict("5b", name, "inconclusive", text)]


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


def claim6(c: Cells, n: int) -> Verdict:
    name = "steps fixed, lr scaled: D-SGD beats C-SGD at a large batch, close at a small one"
    lb = c.compare(f"zhu_lb_ring_n{n}", f"zhu_lb_csgd_n{n}")
    sb = c.compare(f"zhu_sb_ring_n{n}", f"zhu_sb_csgd_n{n}")
    text = f"large: D-SGD - C-SGD {_fmt(*lb)}; small: D-SGD - C-SGD {_fmt(*sb)}"
    diverged = [x for x in ("ring", "csgd") if c.mean(f"zhu_lb_{x}_n{n}", "acc") <= CHANCE]
    if "csgd" in diverged:
        return Verdict("6", name, "inconclusive",
                       f"{text} (C-SGD diverged at the large batch: stability, not "
                       "generalization)")  # fmt: skip
    if relation(*lb) == "above" and abs(sb[0]) < lb[0]:
        return Verdict("6", name, "reproduced", text)
    if relation(*lb) in ("below", "absent"):
        return Verdict("6", name, "not reproduced", text)
    return Verdict("6", name, "inconclusive", text)


def _rel(c: Cells, a: str, b: str, col: str) -> tuple[tuple[float, float], str]:
    """(d, se) of a - b in ``col`` and its relation, 'absent' judged against b's mean."""
    d = c.compare(a, b, col)
    floor = MIN_EFFECT if col == "acc" else REL_EFFECT * abs(c.mean(b, col))
    return d, relation(*d, min_effect=floor)


def _all_below(key: str, name: str, kinds: list[str], text: str) -> Verdict:
    """Reproduced when every part is clearly below; not when one is above or absent."""
    if all(k == "below" for k in kinds):
        return Verdict(key, name, "reproduced", text)
    if any(k in ("above", "absent") for k in kinds):
        return Verdict(key, name, "not reproduced", text)
    return Verdict(key, name, "inconclusive", text)


def claim7(c: Cells, n: int) -> Verdict:
    name = "at a large batch D-SGD's averaged model is flatter than C-SGD's"
    parts = {col: _rel(c, f"zhu_lb_ring_n{n}", f"zhu_lb_csgd_n{n}", col)
             for col in ("lambda_max", "trace")}  # fmt: skip
    text = "; ".join(f"{col} D-SGD - C-SGD: {_gfmt(*d)} ({c.mean(f'zhu_lb_csgd_n{n}', col):.3g} "
                     f"for C-SGD)" for col, (d, _) in parts.items())  # fmt: skip
    return _all_below("7", name, [kind for _, kind in parts.values()], text)


def claim8(c: Cells, n: int) -> Verdict:
    name = "the ensemble of D-SGD's local models is better calibrated than its averaged model"
    cell = f"zhu_lb_ring_n{n}"
    parts = {}
    for ens, avg in (("ens_ece", "ece"), ("ens_nll", "nll")):
        d = c.paired(cell, ens, avg)
        parts[avg] = (d, relation(*d, min_effect=REL_EFFECT * abs(c.mean(cell, avg))))
    text = "; ".join(f"{k.upper()} ensemble - averaged: {_gfmt(*d)} (averaged "
                     f"{c.mean(cell, k):.3g})" for k, (d, _) in parts.items())  # fmt: skip
    return _all_below("8", name, [kind for _, kind in parts.values()], text)


def claim9(c: Cells, n: int) -> Verdict:
    name = "C-SGD with avg-SAM at D-SGD's distance lands closer to D-SGD than plain C-SGD"
    ring, csgd, sam = (f"zhu_lb_{x}_n{n}" for x in ("ring", "csgd", "avgsam"))
    status, texts = [], []
    for col in ("acc", "lambda_max"):
        gap, gk = _rel(c, ring, csgd, col)
        move, mk = _rel(c, sam, csgd, col)
        left = c.mean(sam, col) - c.mean(ring, col)
        show = _fmt if col == "acc" else _gfmt
        texts.append(f"{col}: D-SGD - C-SGD {show(*gap)}, avg-SAM - C-SGD {show(*move)}, "
                     f"avg-SAM - D-SGD {left:+.3g}")  # fmt: skip
        if gk not in ("above", "below") or mk == "unknown":
            status.append("unclear")
        elif mk == gk:  # towards D-SGD: closer, or beyond it by at least the gap
            status.append("ok" if abs(left) < abs(gap[0]) else "fail")
        elif mk in ("above", "below", "absent"):  # clearly away, or no move it could have seen
            status.append("fail")
        else:
            status.append("unclear")
    text = "; ".join(texts)
    if all(s == "ok" for s in status):
        return Verdict("9", name, "reproduced", text)
    if "fail" in status:
        return Verdict("9", name, "not reproduced", text)
    return Verdict("9", name, "inconclusive", text)


def verdicts(c: Cells, n: int) -> list[Verdict]:
    """Every claim's verdict, in the report's order."""
    return [claim1(c), mpi_check(c), claim2(c, n), claim3(c, n), claim4(c, n), *claim5(c, n),
            claim6(c, n), claim7(c, n), claim8(c, n), claim9(c, n)]  # fmt: skip

"""Verdicts on the consensus-distance claims (third edition, issue 26) from run files.

A run's cell is its ``run.name`` without the ``_sS`` seed suffix
(studies/consensus/generate.py); runs of one seed share the initialization,
data order, sharpness samples and probe vectors, so cells are compared **paired
by seed**: for a contrast between cells (a difference ``a - b``, or any fixed
combination such as ``f - (C + none) / 2``) each seed present in every cell
gives one value, and the interval is ``mean ± t(0.975, k-1) sd / sqrt(k)`` over
those k seeds. An interval is *above* 0 when its lower end is > 0, *below* when
its upper end is < 0; *absent* when it contains 0 and lies within ± a margin that
matters (0.5 pp for accuracy, 10 % of the baseline's mean otherwise), else
*within* (an effect of either sign remains possible). Accuracy is the averaged
model's final test accuracy in %; gossip rounds and bytes are whole-run totals.

Each claim states a **precondition**: the regime in which its effect can exist
(e.g. a gap to close). When it fails the verdict is *regime not reached*, with
the number that shows it, never *inconclusive* or *not reproduced*. Claims 1, 5a
and 5b carry the second edition's runs forward (``e2/`` cells, read from
``SECOND_EDITION``). Each claim's rule (``RULES``) was committed with the grid,
before any run of this edition.

Pure numbers to verdicts; ``studies.consensus.report`` writes docs/RESULTS.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dsgd_mpi.analysis.load import Run
from dsgd_mpi.topology import Topology

SECOND_EDITION = Path(__file__).with_name("second_edition_runs.csv")
"""The second edition's per-run numbers (docs/study/runs.csv of its `make study`, 2026-11-29)."""
CARRIED = "e2/"
"""Prefix of the cells carried forward from the second edition."""
MIN_EFFECT = 0.5
"""pp: an accuracy interval within ± this that contains 0 is an absent effect."""
REL_EFFECT = 0.10
"""Other quantities: the margin of 'absent' is this x the baseline cell's mean."""
CHANCE = 15.0
"""%: a final accuracy at or below this (10 classes) counts as diverged."""
CLOSES = 0.5
"""Claims 2 and 4: 'most of the gap' is at least this fraction of it."""
LITTLE = 0.25
"""Claim 2: 1/8 Xi_max 'adds little' beyond 1/4 when it adds less than this x the gap."""
HURT = 0.25
"""Claim 3: a hurt this x phase 1's gap would have been seen."""
FAR_FEWER = 0.5
"""Claim 5b: 'far fewer' rounds is at most this fraction of the other's."""
HELD = 0.9
"""A control held when the measured distance met its target on at least this share of steps."""
INTERPOLATED = 99.0
"""Claims 7-8: training accuracy (%) at the end of the run (mean over its last 5 % of steps):
'trained to interpolation' (the pilot at 1500 steps: C-SGD 99.9 %, D-SGD 99.3 %; README.md)."""
XI2_FLOOR = 1e-3
"""Claim 8: the replicas' Xi^2 at a scoring step at least this (below it the local models and
their average give the same predictions to within a test sample or two: the pilots)."""
RTOL = 1e-6
"""1-mpi: reduced values of an MPI run and its reference simulation agree to this (README)..."""
ATOL = 1e-6
"""... or to this x the field's largest value in the run: a distance that fell 1e6-fold is a
difference of nearly equal numbers, whose rounding is float32's of the run's scale."""
PHASES = 3
EXACT_FIELDS = ("step", "phase", "lr", "train_loss", "train_acc", "gossip_rounds", "bytes_sent")
"""Step fields that the simulator's reference mode reproduces bit for bit on a D-SGD run."""
REDUCED_FIELDS = ("consensus_estimate", "consensus_measured", "consensus_exact")
EVAL_FIELDS = ("test_acc", "test_loss", "test_nll", "test_ece", "local_acc_min",
               "local_acc_max", "ensemble_acc", "ensemble_nll", "ensemble_ece")  # fmt: skip

_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
"""t(0.975, df), df = 1..30 (Student's t quantiles, to 3 decimals)."""

RULES = {
    "1": "Carried forward from the second edition (ring and C-SGD at n = 4 and 16, simulator, "
         "3 seeds). Precondition: C-SGD above chance at every n. gap_n = C-SGD - ring per seed; "
         "growth = gap_16 - gap_4 per seed. Reproduced when gap at the largest n and growth are "
         "both above 0; not reproduced when either is below 0 or absent; else inconclusive.",
    "1-mpi": f"Each MPI run (`*_mpi_sS`) against the simulator's `--mode reference` run of the "
             f"same config and seed (`*_ref_sS`): *agree* when both logged the same rows, the "
             f"fields the README promises bit for bit on a D-SGD run ({', '.join(EXACT_FIELDS)})"
             f" are equal, and the reduced ones (consensus measures, every evaluation field) "
             f"agree to rtol {RTOL:g} or {ATOL:g} x the field's largest value in the run; else "
             f"*differ*, naming the first field and step. The "
             f"fast-mode cell of the same config is an independent sample: the MPI run's "
             f"accuracy minus the fast seeds' mean, with the prediction interval mean ± t sd "
             f"sqrt(1 + 1/k), is printed beside it and decides nothing.",
    "2": f"n = 16, the exact distance Xi held in phase 1 at f Xi_max (Kong's unit) of the "
         f"uncontrolled dec-phase-1 run (f = 1 is that run). Precondition: gap = C-SGD - "
         f"dec-phase-1_none above 0, and every controlled phase met its target on >= {HELD:.0%} "
         f"of its steps. closes(f) = (f - none) - {CLOSES:g} gap per seed (above 0: f closes "
         f"more than {CLOSES:.0%}); adds = (f1/8 - f1/4) - {LITTLE:g} gap (below 0: 1/8 adds "
         f"less than {LITTLE:.0%} of the gap). Reproduced when closes(1/4) is above 0 and adds "
         f"is below 0; not reproduced when closes(1/4) is below 0 or adds is above 0; else "
         f"inconclusive. closes(1/2) is reported.",
    "3": f"dec-phase-2_none and dec-phase-2_f0.5 (phase 2 at 1/2 Xi_max of dec-phase-2_none), "
         f"C-SGD elsewhere, against C-SGD. Precondition as claim 2 (a phase-1 gap above 0, so "
         f"distance can hurt in this recipe; controls held). Not reproduced when either cell - "
         f"C-SGD is below 0; reproduced when, for both, (cell - C-SGD) + {HURT:g} gap is above 0 "
         f"(a hurt of {HURT:.0%} of phase 1's gap would have been seen), 'and helps' when one is "
         f"above 0; else inconclusive.",
    "4": f"guideline_f0.25 (phase 1 at 1/4 Xi_max, later phases free) against C-SGD, with "
         f"whole_f0.25 (every phase at 1/4 of its dec-phase-k_none maximum) for the "
         f"communication. Precondition as claim 2. Reproduced when the guideline closes more "
         f"than {CLOSES:.0%} of the gap (closes(guideline) above 0) **and** its whole-run gossip "
         f"rounds minus whole_f0.25's are below 0; not reproduced when closes(guideline) is "
         f"below 0 or the rounds difference's interval lies at or above 0; else inconclusive. "
         f"Whole-run "
         f"rounds and bytes of C-SGD, the guideline and whole_f0.25 are reported.",
    "5a": "Carried forward, with this edition's runs added: every logged step of a static "
          "graph with a positive exact distance measured right after the round (local_first) "
          "satisfies Xi^2 <= e2 / (1 - lambda_2)^2; reproduced when none violates it.",
    "5b": f"Carried forward: the same exact-distance rule (Xi^2 <= lr^2 EMA(|g|^2), at most 60 "
          f"rounds) on the ring and on the one-peer exponential graph, n = 16: reproduced when "
          f"one-peer met it on >= {HELD:.0%} of steps with at most {FAR_FEWER:g}x the ring's "
          f"rounds per step; not reproduced when the ring met it as often and one-peer needed "
          f"more than that; else inconclusive.",
    "6": "Zhu's recipe at fixed steps on a training subset (zhu_sb_*: total batch 1024, lr 0.1; "
         "zhu_lb_*: 8192, lr 0.8). Precondition: C-SGD has a large-batch penalty: lb_csgd - "
         "sb_csgd below 0 (and lb_csgd above chance). Reproduced when D-SGD beats C-SGD at the "
         "large batch on the ring **and** the exponential graph (lb_ring - lb_csgd and lb_exp - "
         "lb_csgd above 0) and the ring's advantage is larger at the large batch ((lb_ring - "
         "lb_csgd) - (sb_ring - sb_csgd) above 0); not reproduced when a large-batch advantage "
         "is below 0 or absent; else inconclusive.",
    "7": f"Interpolation regime (zhu_ip_*). Precondition: the D-SGD and C-SGD runs end with "
         f"training accuracy >= {INTERPOLATED:g} % (mean over the last 5 % of steps). "
         f"ring - csgd for lambda_max and the Hessian trace of x̄ at the end: reproduced when "
         f"both are below 0; not reproduced when either is above 0 or absent; else inconclusive.",
    "8": f"zhu_ip_ring, scored at the end of the first lr stage and at the end. Precondition "
         f"at a scoring step: the run ends with training accuracy >= {INTERPOLATED:g} % and the "
         f"replicas' Xi^2 there is >= {XI2_FLOOR:g} (else the ensemble is x̄). At each scoring "
         f"step that meets it, ensemble - x̄ per seed for ECE and NLL: reproduced when both are "
         f"below 0 at every such step; not reproduced when one is above 0 or absent; else "
         f"inconclusive. No step meets it: regime not reached.",
    "9": "Interpolation regime: avg-SAM (zhu_ip_avgsam, Zhu's average direction from D-SGD "
         "replicas carried beside) against C-SGD and D-SGD (ring), for accuracy and lambda_max. "
         "Precondition per quantity: gap = ring - csgd above or below 0 (a quantity without a "
         "clear gap is left out; none clear: regime not reached). s = the gap's sign; avg-SAM "
         "moves towards D-SGD when s (avgsam - csgd) is above 0 and the point estimate "
         "|avgsam - ring| < |gap|. Reproduced when it does for every quantity kept; not "
         "reproduced when for one s (avgsam - csgd) is below 0 or absent, or it overshoots; "
         "else inconclusive. Isotropic smoothing of the same Xi^2 (zhu_ip_gauss) is reported "
         "beside it by the same test.",
}  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    key: str
    """Claim ('1', '1-mpi', '2', '3', '4', '5a', '5b', '6'..'9')."""
    claim: str
    verdict: str  # reproduced | not reproduced | inconclusive | regime not reached | agree | differ
    reason: str
    """The precondition's numbers, each comparison's interval, and what decided."""
    carried: bool = False
    """Decided (in part) on the second edition's runs."""


@dataclass(frozen=True)
class Interval:
    """A paired contrast over k seeds: its mean and 95 % t-interval [lo, hi]."""

    mean: float
    lo: float
    hi: float
    k: int

    def text(self, unit: str = " pp", digits: int = 2) -> str:
        if not math.isfinite(self.mean):
            return f"n/a (k={self.k})"
        if unit == " pp":
            return (f"{self.mean:+.{digits}f}{unit} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"
                    f" (k={self.k})")  # fmt: skip
        return f"{self.mean:+.3g} [{self.lo:+.3g}, {self.hi:+.3g}] (k={self.k})"


def t975(df: int) -> float:
    """Student's t quantile t(0.975, df); df > 30 takes df = 30's (slightly conservative)."""
    if df < 1:
        raise ValueError(f"t(0.975, df) needs df >= 1, got {df}")
    return _T975[min(df, len(_T975)) - 1]


def interval(values: np.ndarray) -> Interval:
    """Mean ± t(0.975, k-1) sd / sqrt(k) of per-seed values (NaN bounds with k < 2)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    k = len(v)
    if k < 2:
        m = float(v.mean()) if k else math.nan
        return Interval(m, math.nan, math.nan, k)
    half = t975(k - 1) * float(v.std(ddof=1)) / math.sqrt(k)
    m = float(v.mean())
    return Interval(m, m - half, m + half, k)


def relation(iv: Interval, margin: float = MIN_EFFECT) -> str:
    """above / below (the interval excludes 0), absent (contains 0, within ± margin),
    within (contains 0, wider), unknown (fewer than 2 seeds)."""
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return "unknown"
    if iv.lo > 0:
        return "above"
    if iv.hi < 0:
        return "below"
    return "absent" if -margin < iv.lo and iv.hi < margin else "within"


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


def stage1_end(run: Run) -> float:
    """The step that ends the first lr stage: the last step of phase/stage 0 in the rows."""
    step = _col(run.steps, "step")
    first = step[_stages(run, step) == 0]
    return float(first.max()) if len(first) else math.nan


def _eval_at(ev: pd.DataFrame, step: float, name: str) -> float:
    """An evaluation field at ``step`` (NaN if no evaluation was made there)."""
    at = _col(ev, "step") == step
    return float(_col(ev, name)[at][-1]) if at.any() else math.nan


def run_stats(run: Run) -> dict:
    """One row per run: final and stage-1 evaluation, communication, distances per stage."""
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
    train = _col(s, "train_acc")
    tail = train[-max(1, len(train) // 20):] if len(train) else train
    s1 = stage1_end(run)
    row = {
        "run": run.name, "cell": cell_of(run), "seed": run.config.get("run", {}).get("seed"),
        "n": run.world_size, "topology": run.topology, "backend": run.attrs.get("backend", "mpi"),
        "mode": run.attrs.get("sim_mode", ""), "finished": run.finished, "steps": _last(step),
        "acc": 100 * _last(_col(ev, "test_acc")), "nll": _last(_col(ev, "test_nll")),
        "ece": _last(_col(ev, "test_ece")), "ens_acc": 100 * _last(_col(ev, "ensemble_acc")),
        "ens_nll": _last(_col(ev, "ensemble_nll")), "ens_ece": _last(_col(ev, "ensemble_ece")),
        "lambda_max": _last(_col(ev, "sharpness_lambda_max")),
        "lambda_residual": _last(_col(ev, "sharpness_lambda_residual")),
        "trace": _last(_col(ev, "sharpness_trace")),
        "train_acc_end": 100 * _mean(tail),
        "xi2_end": _last(exact),
        "stage1_step": s1,
        "xi2_s1": float(exact[step == s1][-1]) if (step == s1).any() else math.nan,
        "rounds": _total(s, "gossip_rounds", every), "bytes": _total(s, "bytes_sent", every),
        "rounds_per_step": _mean(np.where(rounds > 0, rounds, np.nan)),
        "held": float(np.mean(met[controlled])) if controlled.any() else math.nan,
        "mean_exact": _mean(exact),
        "bound_checked": int(checked.sum()),
        "bound_violations": int(np.sum(exact[checked] > bound[checked] * (1 + 1e-6) + 1e-12)),
    }  # fmt: skip
    for name, col in (("acc", "test_acc"), ("nll", "test_nll"), ("ece", "test_ece"),
                      ("ens_acc", "ensemble_acc"), ("ens_nll", "ensemble_nll"),
                      ("ens_ece", "ensemble_ece")):  # fmt: skip
        value = _eval_at(ev, s1, col)
        row[f"{name}_s1"] = 100 * value if name.endswith("acc") else value
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


def carried(path: str | Path = SECOND_EDITION) -> pd.DataFrame:
    """The second edition's per-run rows, their cells renamed ``e2/CELL``."""
    frame = pd.read_csv(path)
    frame["cell"] = CARRIED + frame["cell"].astype(str)
    frame["run"] = CARRIED + frame["run"].astype(str)
    return frame


# ----------------------------------------------------------------- per cell


class Cells:
    """The runs' rows grouped by cell: values per seed, means, and paired contrasts."""

    def __init__(self, stats: pd.DataFrame) -> None:
        self.stats = stats
        self.names = list(dict.fromkeys(stats["cell"])) if len(stats) else []

    def __contains__(self, cell: str) -> bool:
        return cell in self.names

    def by_seed(self, cell: str, col: str) -> dict[int, float]:
        if cell not in self or col not in self.stats:
            return {}
        rows = self.stats[self.stats["cell"] == cell]
        out = {}
        for seed, value in zip(rows["seed"], pd.to_numeric(rows[col], errors="coerce"),
                               strict=True):  # fmt: skip
            if math.isfinite(value):
                out[int(seed)] = float(value)
        return out

    def values(self, cell: str, col: str) -> np.ndarray:
        return np.array(list(self.by_seed(cell, col).values()))

    def mean(self, cell: str, col: str) -> float:
        v = self.values(cell, col)
        return float(v.mean()) if len(v) else math.nan

    def std(self, cell: str, col: str) -> float:
        v = self.values(cell, col)
        return float(v.std(ddof=1)) if len(v) > 1 else math.nan

    def seeds(self, cell: str) -> int:
        return int((self.stats["cell"] == cell).sum()) if cell in self else 0

    def contrast(self, weights: dict[str, float], col: str = "acc") -> Interval:
        """sum_cell w_cell x value per seed present in every cell, and its interval."""
        per = [self.by_seed(cell, col) for cell in weights]
        common = sorted(set.intersection(*(set(p) for p in per))) if per else []
        values = [sum(w * p[seed] for w, p in zip(weights.values(), per, strict=True))
                  for seed in common]  # fmt: skip
        return interval(np.array(values))

    def diff(self, a: str, b: str, col: str = "acc") -> Interval:
        """a - b, paired by seed."""
        return self.contrast({a: 1.0, b: -1.0}, col)

    def within(self, cell: str, a: str, b: str) -> Interval:
        """Column a - column b within each run of a cell, over its seeds."""
        x, y = self.by_seed(cell, a), self.by_seed(cell, b)
        return interval(np.array([x[s] - y[s] for s in sorted(set(x) & set(y))]))


def _margin(c: Cells, cell: str, col: str) -> float:
    return MIN_EFFECT if col.startswith("acc") else REL_EFFECT * abs(c.mean(cell, col))


def _unheld(c: Cells, cells: list[str]) -> str:
    """The controlled cells among ``cells`` whose control held on < HELD of its steps, as text."""
    weak = [f"{x} held its target on {100 * c.mean(x, 'held'):.0f}% of its controlled steps"
            for x in cells if x in c and c.mean(x, "held") < HELD]  # fmt: skip
    return "; ".join(weak)


def _missing(c: Cells, cells: list[str]) -> str:
    gone = [x for x in cells if c.seeds(x) < 2]
    return f"needs at least 2 seeds of {', '.join(gone)}" if gone else ""


# ------------------------------------------------------------------- claims


def claim1(c: Cells) -> Verdict:
    name = "ring below C-SGD, gap grows with n"
    p = CARRIED
    ns = sorted({int(m.group(1)) for x in c.names if (m := re.fullmatch(rf"{p}ring_n(\d+)", x))
                 and f"{p}complete_n{m.group(1)}" in c})  # fmt: skip
    if len(ns) < 2:
        return Verdict("1", name, "inconclusive", "needs ring and C-SGD at two world sizes", True)
    low = [n for n in ns if c.mean(f"{p}complete_n{n}", "acc") <= CHANCE]
    if low:
        return Verdict("1", name, "regime not reached", f"C-SGD at chance at n={low[0]}", True)
    gaps = {n: c.diff(f"{p}complete_n{n}", f"{p}ring_n{n}") for n in ns}
    lo, hi = ns[0], ns[-1]
    grow = c.contrast({f"{p}complete_n{hi}": 1, f"{p}ring_n{hi}": -1,
                       f"{p}complete_n{lo}": -1, f"{p}ring_n{lo}": 1})  # fmt: skip
    text = "; ".join(f"gap n={n}: {g.text()}" for n, g in gaps.items())
    text += f"; growth n={lo}->{hi}: {grow.text()}"
    kinds = relation(gaps[hi]), relation(grow)
    if kinds == ("above", "above"):
        return Verdict("1", name, "reproduced", text, True)
    if {"below", "absent"} & set(kinds):
        return Verdict("1", name, "not reproduced", text, True)
    return Verdict("1", name, "inconclusive", text, True)


def cross_check(runs: list[Run]) -> list[dict]:
    """Each MPI run ``X_mpi_sS`` beside the reference simulation ``X_ref_sS``: what differs."""
    by_name = {r.name: r for r in runs}
    out = []
    for run in runs:
        m = re.fullmatch(r"(.+)_mpi_s(\d+)", run.name)
        if not m:
            continue
        ref = by_name.get(f"{m.group(1)}_ref_s{m.group(2)}")
        row = {"cell": m.group(1), "seed": int(m.group(2)), "mpi": run.name,
               "acc": 100 * _last(_col(run.eval, "test_acc")), "ref": None, "differs": ""}
        if ref is None:
            out.append(row)
            continue
        row["ref"] = ref.name
        row["differs"] = _first_difference(run, ref)
        row["rows"] = len(run.steps)
        out.append(row)
    return out


def _first_difference(a: Run, b: Run) -> str:
    """'' when the two runs' rows agree as the README promises, else the first difference."""
    if len(a.steps) != len(b.steps) or len(a.eval) != len(b.eval):
        return f"row counts differ: {len(a.steps)}/{len(a.eval)} vs {len(b.steps)}/{len(b.eval)}"
    step = _col(a.steps, "step")
    checks = [(a.steps, b.steps, f, 0.0) for f in EXACT_FIELDS]
    checks += [(a.steps, b.steps, f, RTOL) for f in REDUCED_FIELDS]
    checks += [(a.eval, b.eval, f, RTOL) for f in EVAL_FIELDS]
    for x, y, field, rtol in checks:
        u, v = _col(x, field), _col(y, field)
        same = (u == v) | (np.isnan(u) & np.isnan(v))
        if rtol:
            scale = float(np.nanmax(np.abs(v))) if np.isfinite(v).any() else 0.0
            same |= np.abs(u - v) <= rtol * np.abs(v) + ATOL * scale
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            where = f"step {step[i]:.0f}" if x is a.steps else f"evaluation {i}"
            how = "bit for bit" if not rtol else f"to rtol {rtol:g} (atol {ATOL:g} x its largest)"
            return f"{field} at {where}: {u[i]:.9g} vs {v[i]:.9g} (promised {how})"
    return ""


def mpi_check(c: Cells, checks: list[dict]) -> Verdict:
    name = "an MPI run equals the simulator's reference mode (same config and seed)"
    if not checks:
        return Verdict("1-mpi", name, "inconclusive", "no MPI run")
    texts, differ, missing = [], [], []
    for row in checks:
        fast = c.values(row["cell"], "acc")
        beside = ""
        if len(fast) > 1:
            half = t975(len(fast) - 1) * fast.std(ddof=1) * math.sqrt(1 + 1 / len(fast))
            d = row["acc"] - fast.mean()
            beside = (f"; beside it, MPI - fast mode's {len(fast)} seeds: {d:+.2f} pp "
                      f"(prediction interval ±{half:.2f})")  # fmt: skip
        if row["ref"] is None:
            missing.append(row["mpi"])
            texts.append(f"{row['mpi']}: no reference run{beside}")
        elif row["differs"]:
            differ.append(row["mpi"])
            texts.append(f"{row['mpi']} vs {row['ref']}: {row['differs']}{beside}")
        else:
            texts.append(f"{row['mpi']} = {row['ref']} on all {row['rows']} step rows "
                         f"(bit for bit where promised, to float tolerance elsewhere){beside}")
    text = "; ".join(texts)
    if differ:
        return Verdict("1-mpi", name, "differ", text)
    if missing:
        return Verdict("1-mpi", name, "inconclusive", text)
    return Verdict("1-mpi", name, "agree", text)


def kong_regime(c: Cells, n: int, controlled: list[str]) -> tuple[Interval, str]:
    """Claims 2-4's precondition: the phase-1 gap (C-SGD - dec-phase-1_none) and held controls;
    returns the gap and '' when met, else the number that shows it is not."""
    gap = c.diff(f"complete_n{n}", f"dec-phase-1_none_n{n}")
    if relation(gap) in ("unknown",):
        return gap, ""
    if relation(gap) != "above":
        return gap, "the gap is not above 0: nothing for a control to close"
    return gap, _unheld(c, controlled)


def _closes(c: Cells, cell: str, n: int) -> Interval:
    """(cell - none) - CLOSES x (C-SGD - none), per seed: above 0 when it closes more."""
    none, full = f"dec-phase-1_none_n{n}", f"complete_n{n}"
    return c.contrast({cell: 1.0, none: -(1 - CLOSES), full: -CLOSES})


def _share(c: Cells, cell: str, n: int) -> str:
    none, gap = f"dec-phase-1_none_n{n}", c.diff(f"complete_n{n}", f"dec-phase-1_none_n{n}")
    got = c.diff(cell, none)
    return f"{100 * got.mean / gap.mean:.0f}%" if gap.mean else "n/a"


def claim2(c: Cells, n: int) -> Verdict:
    name = "Xi held in phase 1 at 1/4 Xi_max closes most of the gap to C-SGD; 1/8 adds little"
    f = {x: f"dec-phase-1_f{x}_n{n}" for x in ("0.5", "0.25", "0.125")}
    cells = [f"complete_n{n}", f"dec-phase-1_none_n{n}", *f.values()]
    if gone := _missing(c, cells):
        return Verdict("2", name, "inconclusive", gone)
    gap, problem = kong_regime(c, n, list(f.values()))
    text = f"gap C-SGD - dec-phase-1_none: {gap.text()}"
    if problem:
        return Verdict("2", name, "regime not reached", f"{text}; {problem}")
    closes = {x: _closes(c, cell, n) for x, cell in f.items()}
    adds = c.contrast({f["0.125"]: 1.0, f["0.25"]: -1.0, f"complete_n{n}": -LITTLE,
                       f"dec-phase-1_none_n{n}": LITTLE})  # fmt: skip
    text += "; " + "; ".join(f"f{x} closes {_share(c, f[x], n)} (closes - {CLOSES:g} gap: "
                             f"{iv.text()})" for x, iv in closes.items())  # fmt: skip
    text += (f"; f0.125 - f0.25: {c.diff(f['0.125'], f['0.25']).text()} "
             f"(minus {LITTLE:g} gap: {adds.text()})")  # fmt: skip
    main, more = relation(closes["0.25"]), relation(adds)
    if main == "above" and more == "below":
        return Verdict("2", name, "reproduced", text)
    if main == "below" or more == "above":
        return Verdict("2", name, "not reproduced", text)
    return Verdict("2", name, "inconclusive", text)


def claim3(c: Cells, n: int) -> Verdict:
    name = "distance in phase 2 does not hurt (dec-phase-2 >= C-SGD)"
    cells = [f"dec-phase-2_none_n{n}", f"dec-phase-2_f0.5_n{n}"]
    if gone := _missing(c, [f"complete_n{n}", f"dec-phase-1_none_n{n}", *cells]):
        return Verdict("3", name, "inconclusive", gone)
    gap, problem = kong_regime(c, n, cells)
    text = f"phase-1 gap C-SGD - dec-phase-1_none: {gap.text()}"
    if problem:
        return Verdict("3", name, "regime not reached", f"{text}; {problem}")
    full, none = f"complete_n{n}", f"dec-phase-1_none_n{n}"
    kinds = []
    for x in cells:
        d = c.diff(x, full)
        seen = c.contrast({x: 1.0, full: -1.0 + HURT, none: -HURT})
        text += f"; {x} - C-SGD: {d.text()} (+ {HURT:g} gap: {seen.text()})"
        kinds.append((relation(d), relation(seen)))
    if any(d == "below" for d, _ in kinds):
        return Verdict("3", name, "not reproduced", text)
    if all(s == "above" for _, s in kinds):
        helps = " (and helps)" if any(d == "above" for d, _ in kinds) else ""
        return Verdict("3", name, "reproduced", text + helps)
    return Verdict("3", name, "inconclusive", text)


def claim4(c: Cells, n: int) -> Verdict:
    name = "the guideline (phase 1 at 1/4 Xi_max, later free) recovers C-SGD, communicating less"
    g, w, full = f"guideline_f0.25_n{n}", f"whole_f0.25_n{n}", f"complete_n{n}"
    if gone := _missing(c, [full, f"dec-phase-1_none_n{n}", g, w]):
        return Verdict("4", name, "inconclusive", gone)
    gap, problem = kong_regime(c, n, [g, w])
    text = f"gap C-SGD - dec-phase-1_none: {gap.text()}"
    if problem:
        return Verdict("4", name, "regime not reached", f"{text}; {problem}")
    closes = _closes(c, g, n)
    fewer = c.diff(g, w, "rounds")
    text += (f"; guideline closes {_share(c, g, n)} (closes - {CLOSES:g} gap: {closes.text()}); "
             f"guideline - C-SGD: {c.diff(g, full).text()}; rounds guideline - whole: "
             f"{fewer.text('')}; whole-run rounds C-SGD / guideline / whole "
             + " / ".join(f"{c.mean(x, 'rounds'):,.0f}" for x in (full, g, w))
             + "; MB sent per worker "
             + " / ".join(f"{c.mean(x, 'bytes') / 1e6:,.1f}" for x in (full, g, w)))  # fmt: skip
    acc, comm = relation(closes), relation(fewer, margin=0.0)
    if acc == "below" or (math.isfinite(fewer.lo) and fewer.lo >= 0):
        return Verdict("4", name, "not reproduced", text)
    if acc == "above" and comm == "below":
        return Verdict("4", name, "reproduced", text)
    return Verdict("4", name, "inconclusive", text)


def claim5(c: Cells, n: int) -> list[Verdict]:
    stats = c.stats
    old = stats["cell"].astype(str).str.startswith(CARRIED)
    checked, bad = int(stats["bound_checked"].sum()), int(stats["bound_violations"].sum())
    text = (f"{checked} logged steps (exact > 0, bound) on static graphs "
            f"({int(stats.loc[old, 'bound_checked'].sum())} from the second edition's runs), "
            f"{bad} with exact > bound")  # fmt: skip
    a = Verdict("5a", "the estimate bounds the exact distance",
                "inconclusive" if not checked else "not reproduced" if bad else "reproduced",
                text, True)  # fmt: skip
    name = "one-peer exponential meets an exact-distance target in far fewer rounds than the ring"
    n = next((int(m.group(1)) for x in c.names
              if (m := re.fullmatch(rf"{CARRIED}target_ring_n(\d+)", x))), n)  # fmt: skip
    r, o = f"{CARRIED}target_ring_n{n}", f"{CARRIED}target_onepeer_n{n}"
    if r not in c or o not in c:
        return [a, Verdict("5b", name, "inconclusive", "target_ring / target_onepeer missing",
                           True)]  # fmt: skip
    ro, rr = c.mean(o, "rounds_per_step"), c.mean(r, "rounds_per_step")
    ho, hr = c.mean(o, "held"), c.mean(r, "held")
    ratio = c.contrast({o: 1.0, r: -FAR_FEWER}, "rounds_per_step")
    text = (f"rounds/step one-peer {ro:.2f} vs ring {rr:.2f} (ratio {ro / rr:.2f}; one-peer - "
            f"{FAR_FEWER:g} ring: {ratio.text('')}); target met on {100 * ho:.0f}% vs "
            f"{100 * hr:.0f}% of steps; worst-case rounds to shrink any distance 100x: one-peer "
            f"{contraction_rounds('one_peer_exponential', n)}, ring "
            f"{contraction_rounds('ring', n)}")  # fmt: skip
    if ho >= HELD and ro <= FAR_FEWER * rr:
        return [a, Verdict("5b", name, "reproduced", text, True)]
    if hr >= HELD and ro > FAR_FEWER * rr:
        return [a, Verdict("5b", name, "not reproduced", text, True)]
    return [a, Verdict("5b", name, "inconclusive", text, True)]


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
    name = "steps fixed: D-SGD beats C-SGD at a large batch, where C-SGD pays a penalty"
    z = {x: f"zhu_{x}_n{n}" for x in ("sb_csgd", "sb_ring", "lb_csgd", "lb_ring", "lb_exp")}
    if gone := _missing(c, list(z.values())):
        return Verdict("6", name, "inconclusive", gone)
    penalty = c.diff(z["lb_csgd"], z["sb_csgd"])
    text = f"C-SGD large - small batch: {penalty.text()}"
    if c.mean(z["lb_csgd"], "acc") <= CHANCE:
        return Verdict("6", name, "regime not reached", f"{text}; C-SGD diverged at the large "
                       f"batch ({c.mean(z['lb_csgd'], 'acc'):.1f}%)")  # fmt: skip
    if relation(penalty) != "below":
        return Verdict("6", name, "regime not reached", f"{text}: no large-batch penalty")
    ring, exp = c.diff(z["lb_ring"], z["lb_csgd"]), c.diff(z["lb_exp"], z["lb_csgd"])
    grows = c.contrast({z["lb_ring"]: 1, z["lb_csgd"]: -1, z["sb_ring"]: -1, z["sb_csgd"]: 1})
    text += (f"; large batch: ring - C-SGD {ring.text()}, exponential - C-SGD {exp.text()}; "
             f"small batch: ring - C-SGD {c.diff(z['sb_ring'], z['sb_csgd']).text()}; "
             f"ring's advantage large - small: {grows.text()}")  # fmt: skip
    kinds = [relation(ring), relation(exp)]
    if all(k == "above" for k in kinds) and relation(grows) == "above":
        return Verdict("6", name, "reproduced", text)
    if {"below", "absent"} & set(kinds):
        return Verdict("6", name, "not reproduced", text)
    return Verdict("6", name, "inconclusive", text)


def _interpolated(c: Cells, cells: list[str]) -> str:
    """'' when every cell ends at INTERPOLATED % training accuracy or more, else the numbers."""
    low = [f"{x} {c.mean(x, 'train_acc_end'):.2f}%" for x in cells
           if not c.mean(x, "train_acc_end") >= INTERPOLATED]  # fmt: skip
    return f"training accuracy at the end below {INTERPOLATED:g}%: {', '.join(low)}" if low else ""


def claim7(c: Cells, n: int) -> Verdict:
    name = "at a large lr and batch D-SGD's averaged model is flatter than C-SGD's"
    ring, csgd = f"zhu_ip_ring_n{n}", f"zhu_ip_csgd_n{n}"
    if gone := _missing(c, [ring, csgd]):
        return Verdict("7", name, "inconclusive", gone)
    train = ", ".join(f"{x} {c.mean(x, 'train_acc_end'):.2f}%" for x in (ring, csgd))
    if problem := _interpolated(c, [ring, csgd]):
        return Verdict("7", name, "regime not reached", problem)
    parts = {col: c.diff(ring, csgd, col) for col in ("lambda_max", "trace")}
    kinds = [relation(iv, _margin(c, csgd, col)) for col, iv in parts.items()]
    text = f"training accuracy at the end {train}; " + "; ".join(
        f"{col} ring - C-SGD: {iv.text('')} (C-SGD {c.mean(csgd, col):.3g})"
        for col, iv in parts.items())  # fmt: skip
    if all(k == "below" for k in kinds):
        return Verdict("7", name, "reproduced", text)
    if {"above", "absent"} & set(kinds):
        return Verdict("7", name, "not reproduced", text)
    return Verdict("7", name, "inconclusive", text)


def claim8(c: Cells, n: int) -> Verdict:
    name = "the ensemble of D-SGD's local models is better calibrated than its averaged model"
    cell = f"zhu_ip_ring_n{n}"
    if gone := _missing(c, [cell]):
        return Verdict("8", name, "inconclusive", gone)
    if problem := _interpolated(c, [cell]):
        return Verdict("8", name, "regime not reached", problem)
    texts, kinds = [], []
    for label, suffix, xi in (("end of lr stage 1", "_s1", "xi2_s1"), ("end", "", "xi2_end")):
        xi2 = c.values(cell, xi)
        low = float(xi2.min()) if len(xi2) else math.nan
        if not low >= XI2_FLOOR:
            texts.append(f"{label}: Xi^2 {low:.3g} (smallest over seeds) below the floor "
                         f"{XI2_FLOOR:g}: not scored")  # fmt: skip
            continue
        for ens, avg in (("ens_ece", "ece"), ("ens_nll", "nll")):
            iv = c.within(cell, ens + suffix, avg + suffix)
            kinds.append(relation(iv, REL_EFFECT * abs(c.mean(cell, avg + suffix))))
            texts.append(f"{label} (Xi^2 >= {low:.3g}): {avg.upper()} ensemble - x̄ {iv.text('')}"
                         f" (x̄ {c.mean(cell, avg + suffix):.3g})")  # fmt: skip
    text = "; ".join(texts)
    if not kinds:
        return Verdict("8", name, "regime not reached", text)
    if all(k == "below" for k in kinds):
        return Verdict("8", name, "reproduced", text)
    if {"above", "absent"} & set(kinds):
        return Verdict("8", name, "not reproduced", text)
    return Verdict("8", name, "inconclusive", text)


def _towards(c: Cells, cell: str, ring: str, csgd: str, col: str, gap: Interval) -> tuple[str, str]:
    """Whether ``cell`` moved C-SGD towards D-SGD in ``col`` (claim 9's test): ok, fail or
    unclear, and its text."""
    sign = 1.0 if gap.mean > 0 else -1.0
    move = c.contrast({cell: sign, csgd: -sign}, col)
    left = c.mean(cell, col) - c.mean(ring, col)
    kind = relation(move, _margin(c, csgd, col))
    text = (f"{cell.split('_')[2]} - C-SGD {c.diff(cell, csgd, col).text(_unit(col))}, "
            f"{cell.split('_')[2]} - D-SGD {left:+.3g}")  # fmt: skip
    if kind == "above":
        return ("ok" if abs(left) < abs(gap.mean) else "fail"), text
    if kind in ("below", "absent"):
        return "fail", text
    return "unclear", text


def _unit(col: str) -> str:
    return " pp" if col == "acc" else ""


def claim9(c: Cells, n: int) -> Verdict:
    name = "C-SGD with average-direction SAM lands closer to D-SGD than plain C-SGD"
    ring, csgd, sam, iso = (f"zhu_ip_{x}_n{n}" for x in ("ring", "csgd", "avgsam", "gauss"))
    if gone := _missing(c, [ring, csgd, sam]):
        return Verdict("9", name, "inconclusive", gone)
    status, texts, left_out = [], [], []
    for col in ("acc", "lambda_max"):
        gap = c.diff(ring, csgd, col)
        if relation(gap, 0.0) not in ("above", "below"):
            left_out.append(f"{col}: D-SGD - C-SGD {gap.text(_unit(col))}")
            continue
        got, text = _towards(c, sam, ring, csgd, col, gap)
        status.append(got)
        line = f"{col}: D-SGD - C-SGD {gap.text(_unit(col))}, {text}"
        if iso in c and c.seeds(iso) > 1:
            line += f" (isotropic: {_towards(c, iso, ring, csgd, col, gap)[1]})"
        texts.append(line)
    text = "; ".join(texts + [f"left out (no clear gap): {x}" for x in left_out])
    if not status:
        return Verdict("9", name, "regime not reached", text)
    if all(s == "ok" for s in status):
        return Verdict("9", name, "reproduced", text)
    if "fail" in status:
        return Verdict("9", name, "not reproduced", text)
    return Verdict("9", name, "inconclusive", text)


def main_size(stats: pd.DataFrame) -> int:
    """The world size of claims 2-9 (generate.py's "big"): that of the C-SGD cell."""
    found = stats.loc[stats["cell"].astype(str).str.fullmatch(r"complete_n\d+"), "n"]
    return int(found.iloc[0]) if len(found) else 16


def rederive(folder: str | Path) -> list[Verdict]:
    """The verdicts from what the report committed beside docs/RESULTS.md: every run's
    numbers (``runs.csv``, the second edition's carried rows included) and the MPI
    cross-check (``mpi_check.json``), so any clone can check them without the run files."""
    import json

    stats = pd.read_csv(Path(folder) / "runs.csv")
    checks = json.loads((Path(folder) / "mpi_check.json").read_text())
    return verdicts(Cells(stats), main_size(stats), checks)


def verdicts(c: Cells, n: int, checks: list[dict] | None = None) -> list[Verdict]:
    """Every claim's verdict, in the report's order."""
    return [claim1(c), mpi_check(c, checks or []), claim2(c, n), claim3(c, n), claim4(c, n),
            *claim5(c, n), claim6(c, n), claim7(c, n), claim8(c, n), claim9(c, n)]  # fmt: skip

"""The study (third edition, issue 26): the paired statistics, each claim's rule and
precondition on hand-made run files, the report and its verdicts re-derived from the run
files, the generated plans, plans run by the simulator (fast and reference modes) in one
process and by one MPI job."""

from __future__ import annotations

import atexit
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from dsgd_mpi.analysis.load import load_run
from dsgd_mpi.config import check_world, load_config, to_yaml
from dsgd_mpi.metrics import H5Writer
from dsgd_mpi.plan import read_plan
from studies.consensus import claims, generate, report
from tests.mpi_util import run_ranks

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "configs" / "study"
PLANS = sorted(STUDY.glob("*/plan_*_n*.txt"))
TINY = {  # a synthetic run of a few seconds
    "run": {"epochs": 1, "seed": 3},
    "data": {"name": "synthetic", "synthetic_size": 256, "batch_size": 16},
    "model": {"name": "mlp"},
    "optim": {"lr": 0.05, "base_batch": 64},
    "metrics": {"log_every": 1, "exact_every": 2, "eval_every": 1, "flush_every": 3},
}


def write_run(folder: Path, cell: str, seed: int, acc: float, *, topology: str = "ring",
              n: int | None = None, rounds: int = 1, exact: float | list = 0.5, bound: float = 1.0,
              target: float = math.inf, measured: float | None = None, backend: str = "sim",
              order: str = "local_first", train_acc: float = 0.9, loss: float = 1.0,
              evals: dict[int, dict] | None = None, attrs: dict | None = None,
              **final: float) -> str:  # fmt: skip
    """A finished run file of 10 logged steps, as the trainer writes it.

    ``final`` sets fields of the evaluation at step 10 (test_nll, ensemble_ece,
    sharpness_lambda_max, ...); ``evals`` adds evaluations at other steps (step -> fields);
    ``exact`` is the exact distance of every step, or a list of the 10 steps'.
    The lr decays after step 5 (milestones 0.5, 0.75): step 5 ends the first lr stage.
    """
    name = f"{cell}_s{seed}"
    path = str(folder / f"{name}.h5")
    key = repr((cell, seed, acc, topology, n, rounds, exact, bound, target, measured, backend,
                order, train_acc, loss, evals, attrs, sorted(final.items())))  # fmt: skip
    if key in _WRITTEN:  # the same run again (the claims' variants share most cells): a copy
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_WRITTEN[key], path)
        return path
    n = n or int(cell.split("_n")[-1].split("_")[0])
    cfg = load_config(None, [f"run.name={name}", f"run.seed={seed}", "metrics.log_every=1",
                             f"topology.name={topology}", f"gossip.order={order}"])  # fmt: skip
    head = {"config": to_yaml(cfg), "world_size": n, "topology": topology, "backend": backend,
            "started": "2026-01-01T00:00:00+00:00", **(attrs or {})}  # fmt: skip
    w = H5Writer(path, head, flush_every=100)  # one write at close: the tests write hundreds
    xi2 = exact if isinstance(exact, list) else [exact] * 10
    seen = xi2 if measured is None else [measured] * 10
    for step, exact, measured in zip(range(1, 11), xi2, seen, strict=True):
        w.log_step(dict(step=step, epoch=step / 10, phase=0, lr=0.1, train_loss=loss,
                        train_acc=train_acc, consensus_estimate=0.1, consensus_exact=exact,
                        consensus_measured=measured,
                        consensus_bound=bound, gossip_rounds=rounds, target=target,
                        bytes_sent=1000 * rounds, time_compute=0.0, time_gossip=0.0,
                        time_allreduce=0.0, gossip_rounds_total=step * rounds,
                        bytes_sent_total=step * 1000 * rounds))  # fmt: skip
    for step, fields in sorted({**(evals or {}), 10: {"test_acc": acc, **final}}.items()):
        w.log_eval(dict(step=step, epoch=step / 10, test_loss=1.0, local_acc_mean=acc,
                        local_acc_min=acc, local_acc_max=acc, **fields))  # fmt: skip
    w.close(finished=True)
    _WRITTEN[key] = shutil.copy(path, _CACHE / f"{len(_WRITTEN)}.h5")  # tests may rewrite `path`
    return path


_WRITTEN: dict[str, str] = {}
_CACHE = Path(tempfile.mkdtemp(prefix="study-runs-"))
atexit.register(shutil.rmtree, _CACHE, True)


def cells(folder: Path, accs: dict[str, tuple[float, ...]], **kw) -> claims.Cells:
    """Seeds 0, 1, ... of each cell with these accuracies (fractions)."""
    for cell, values in accs.items():
        for s, a in enumerate(values):
            write_run(folder, cell, s, a, **kw)
    return cells_in(folder)


def stats_in(folder: Path) -> pd.DataFrame:
    return pd.DataFrame([claims.run_stats(load_run(p)) for p in sorted(folder.glob("*.h5"))])


def cells_in(folder: Path, carried: str | None = None) -> claims.Cells:
    stats = stats_in(folder)
    if carried:
        stats = pd.concat([stats, claims.carried(carried)], ignore_index=True)
    return claims.Cells(stats)


def carried_csv(folder: Path, accs: dict[str, tuple[float, ...]], **kw) -> str:
    """A second-edition runs.csv (what its report wrote) of hand-made runs."""
    runs = folder / "e2"
    runs.mkdir()
    cells(runs, accs, **kw)
    path = folder / "e2.csv"
    stats_in(runs).to_csv(path, index=False)
    return str(path)


@pytest.fixture(autouse=True)
def _folders(tmp_path):
    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()


# ---------------------------------------------------------------- statistics


def test_t_quantiles_match_the_t_distribution():
    """t(0.975, df) from the table against the t density integrated numerically."""
    for df in (1, 2, 4, 9, 30):
        t = claims.t975(df)
        x = np.linspace(-t, t, 400_001)
        dens = np.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
        dens = dens * (1 + x**2 / df) ** (-(df + 1) / 2)
        mass = float(np.sum((dens[1:] + dens[:-1]) / 2 * np.diff(x)))
        assert mass == pytest.approx(0.95, abs=2e-4), df
    with pytest.raises(ValueError):
        claims.t975(0)


def test_paired_interval_sees_what_unpaired_noise_hides(tmp_path):
    """Seeds move both cells together (same init, same data): the paired difference is
    clear although the cells' spreads overlap."""
    c = cells(tmp_path, {"a_n4": (0.80, 0.85, 0.90), "b_n4": (0.79, 0.84, 0.89)})
    iv = c.diff("a_n4", "b_n4")
    assert iv.k == 3 and iv.mean == pytest.approx(1.0) and iv.lo == pytest.approx(1.0)
    assert claims.relation(iv) == "above"
    spread = c.contrast({"a_n4": 1.0}, "acc")  # one cell alone: mean ± t sd / sqrt(k)
    assert spread.lo == pytest.approx(85 - 4.303 * 5 / math.sqrt(3), abs=1e-3)
    assert claims.relation(claims.Interval(0.1, -0.2, 0.4, 3)) == "absent"
    assert claims.relation(claims.Interval(0.1, -0.9, 1.1, 3)) == "within"
    assert claims.relation(claims.interval(np.array([1.0]))) == "unknown"
    only = cells(tmp_path / "a", {"a_n4": (0.8, 0.9), "b_n4": (0.7,)})  # seed 1 of b missing
    assert only.diff("a_n4", "b_n4").k == 1


# ------------------------------------------------------------------- claim 1


def test_claim1_on_the_second_editions_runs(tmp_path):
    path = carried_csv(tmp_path / "a", {
        "ring_n4": (0.880, 0.882, 0.881), "complete_n4": (0.881, 0.883, 0.882),
        "ring_n16": (0.850, 0.852, 0.851), "complete_n16": (0.885, 0.886, 0.886)})  # fmt: skip
    v = claims.claim1(cells_in(tmp_path / "b", path))
    assert v.verdict == "reproduced" and v.carried, v.reason
    assert "gap n=16: +3.47 pp [" in v.reason and "growth n=4->16: +3.37 pp" in v.reason
    path = carried_csv(tmp_path / "c", {
        "ring_n4": (0.880, 0.882, 0.881), "complete_n4": (0.881, 0.883, 0.882),
        "ring_n16": (0.881, 0.883, 0.882), "complete_n16": (0.881, 0.883, 0.882)})  # fmt: skip
    assert claims.claim1(cells_in(tmp_path / "b", path)).verdict == "not reproduced"  # absent


# ---------------------------------------------------------- the MPI cross-check


def test_an_mpi_run_equals_its_reference_simulation_or_differs(tmp_path):
    for s, a in enumerate((0.80, 0.81, 0.79)):
        write_run(tmp_path, "zhu_sb_ring_n16", s, a)
    write_run(tmp_path, "zhu_sb_ring_n16_mpi", 0, 0.8, backend="mpi")
    write_run(tmp_path, "zhu_sb_ring_n16_ref", 0, 0.8, attrs={"sim_mode": "reference"})
    runs = [load_run(p) for p in sorted(tmp_path.glob("*.h5"))]
    v = claims.mpi_check(claims.Cells(stats_in(tmp_path)), claims.cross_check(runs))
    assert v.verdict == "agree", v.reason
    # 3 fast seeds 80, 81, 79 %: sd 1, so ± t(0.975, 2) x 1 x sqrt(1 + 1/3) = 4.97
    assert "MPI - fast mode's 3 seeds: +0.00 pp (prediction interval ±4.97)" in v.reason
    # a float32 rounding of the loss is not bit for bit
    write_run(tmp_path / "a", "zhu_sb_ring_n16_mpi", 0, 0.8, backend="mpi",
              loss=float(np.nextafter(np.float32(1.0), np.float32(2.0))))  # fmt: skip
    write_run(tmp_path / "a", "zhu_sb_ring_n16_ref", 0, 0.8)
    runs = [load_run(p) for p in sorted((tmp_path / "a").glob("*.h5"))]
    v = claims.mpi_check(claims.Cells(stats_in(tmp_path)), claims.cross_check(runs))
    assert v.verdict == "differ" and "train_loss at step 1" in v.reason
    # reduced values: float tolerance, relative to the field's scale in the run
    write_run(tmp_path / "b", "zhu_sb_ring_n16_mpi", 0, 0.8, exact=0.5 * (1 + 1e-7))
    write_run(tmp_path / "b", "zhu_sb_ring_n16_ref", 0, 0.8, exact=0.5)
    runs = [load_run(p) for p in sorted((tmp_path / "b").glob("*.h5"))]
    assert not claims.cross_check(runs)[0]["differs"]
    write_run(tmp_path / "b", "zhu_sb_ring_n16_mpi", 0, 0.8, exact=0.5 * (1 + 1e-4))
    runs = [load_run(p) for p in sorted((tmp_path / "b").glob("*.h5"))]
    assert claims.cross_check(runs)[0]["differs"].startswith("consensus_measured at step 1")
    (tmp_path / "zhu_sb_ring_n16_ref_s0.h5").unlink()
    runs = [load_run(p) for p in sorted(tmp_path.glob("*.h5"))]
    v = claims.mpi_check(claims.Cells(stats_in(tmp_path)), claims.cross_check(runs))
    assert v.verdict == "inconclusive" and "no reference run" in v.reason


# -------------------------------------------------------------- claims 2-4

KONG = {  # C-SGD 88 %, the uncontrolled ring 84 %: a 4 pp gap to close
    "complete_n16": (0.880, 0.882, 0.881),
    "dec-phase-1_none_n16": (0.840, 0.842, 0.841),
    "dec-phase-1_f0.5_n16": (0.860, 0.862, 0.861),
    "dec-phase-1_f0.25_n16": (0.875, 0.877, 0.876),
    "dec-phase-1_f0.125_n16": (0.876, 0.878, 0.877),
    "dec-phase-2_none_n16": (0.880, 0.883, 0.881),
    "dec-phase-2_f0.5_n16": (0.881, 0.882, 0.882),
    "guideline_f0.25_n16": (0.874, 0.876, 0.875),
    "whole_f0.25_n16": (0.875, 0.877, 0.876),
}
HELD = dict(target=1.0, exact=0.9)  # the measured distance met its target on every step


def test_critical_consensus_distance(tmp_path):
    v = claims.claim2(cells(tmp_path / "a", KONG, **HELD), 16)
    assert v.verdict == "reproduced", v.reason
    assert "f0.25 closes 88%" in v.reason and "gap C-SGD - dec-phase-1_none: +4.00 pp" in v.reason
    weak = {**KONG, "dec-phase-1_f0.25_n16": (0.850, 0.852, 0.851)}  # 1/4 closes a quarter
    v = claims.claim2(cells(tmp_path / "b", weak, **HELD), 16)
    assert v.verdict == "not reproduced" and "f0.25 closes 25%" in v.reason
    more = {**KONG, "dec-phase-1_f0.125_n16": (0.888, 0.890, 0.889)}  # 1/8 adds 1.3 pp > 1 pp
    assert claims.claim2(cells(tmp_path / "c", more, **HELD), 16).verdict == "not reproduced"


def test_no_gap_or_a_control_that_did_not_hold_is_a_regime_not_reached(tmp_path):
    flat = {**KONG, "dec-phase-1_none_n16": (0.881, 0.880, 0.882)}
    v = claims.claim2(cells(tmp_path / "a", flat, **HELD), 16)
    assert v.verdict == "regime not reached"
    assert v.reason.startswith("gap C-SGD - dec-phase-1_none: +0.00 pp [")
    assert "the gap is not above 0" in v.reason
    for claim in (claims.claim3, claims.claim4):
        assert claim(cells_in(tmp_path / "a"), 16).verdict == "regime not reached"
    c = cells(tmp_path / "b", KONG, target=1.0, exact=2.0)  # measured above target every step
    v = claims.claim2(c, 16)
    assert v.verdict == "regime not reached"
    assert "dec-phase-1_f0.5_n16 held its target on 0% of its controlled steps" in v.reason
    row = c.stats.set_index("run").loc["dec-phase-1_f0.5_n16_s0"]
    assert row["target_p1"] == 1.0 and row["exact_p1"] == 2.0 and row["held_p1"] == 0.0


def test_distance_in_phase_two_that_hurts_is_not_reproduced(tmp_path):
    v = claims.claim3(cells(tmp_path / "a", KONG, **HELD), 16)
    assert v.verdict == "reproduced", v.reason
    hurt = {**KONG, "dec-phase-2_none_n16": (0.860, 0.862, 0.861)}
    assert claims.claim3(cells(tmp_path / "b", hurt, **HELD), 16).verdict == "not reproduced"


def test_guideline_recovers_c_sgd_with_fewer_rounds_than_controlling_every_phase(tmp_path):
    for cell, accs in KONG.items():
        rounds = {"guideline_f0.25_n16": 2, "whole_f0.25_n16": 3}.get(cell, 1)
        for s, a in enumerate(accs):
            write_run(tmp_path / "a", cell, s, a, rounds=rounds, **HELD)
    c = cells_in(tmp_path / "a")
    v = claims.claim4(c, 16)
    assert v.verdict == "reproduced", v.reason
    assert c.mean("guideline_f0.25_n16", "rounds") == 20  # the running total of the last row
    assert "whole-run rounds C-SGD / guideline / whole 10 / 20 / 30" in v.reason
    assert "rounds guideline - whole: -10 [-10, -10] (k=3)" in v.reason
    for s, a in enumerate(KONG["whole_f0.25_n16"]):  # whole-run control as cheap as phase 1's
        write_run(tmp_path / "a", "whole_f0.25_n16", s, a, rounds=2, **HELD)
    assert claims.claim4(cells_in(tmp_path / "a"), 16).verdict == "not reproduced"


# ------------------------------------------------------------------- claim 5


def test_bound_and_rounds_to_a_target_are_carried_forward(tmp_path):
    e2 = tmp_path / "a"
    write_run(e2, "target_ring_n16", 0, 0.5, rounds=8, target=0.1, exact=0.09)
    write_run(e2, "target_onepeer_n16", 0, 0.5, rounds=2, topology="one_peer_exponential",
              target=0.1, exact=0.01, bound=math.nan)  # fmt: skip
    stats_in(e2).to_csv(tmp_path / "e2.csv", index=False)
    write_run(tmp_path / "b", "zhu_lb_ring_n16", 0, 0.5, exact=2.0, bound=1.0,
              order="gossip_first")  # measured after the gradient: not bounded
    a, b = claims.claim5(cells_in(tmp_path / "b", str(tmp_path / "e2.csv")), 16)
    assert a.verdict == "reproduced" and a.carried
    assert a.reason.startswith("10 logged steps") and "(10 from the second edition" in a.reason
    assert b.verdict == "reproduced" and "ratio 0.25" in b.reason and b.carried
    assert "one-peer 4, ring 45" in b.reason  # rounds to shrink the distance 100x, from W(t)
    write_run(tmp_path / "b", "dec-phase-1_none_n16", 0, 0.5, exact=2.0, bound=1.0)
    a, _ = claims.claim5(cells_in(tmp_path / "b", str(tmp_path / "e2.csv")), 16)
    assert a.verdict == "not reproduced" and "10 with exact > bound" in a.reason


# -------------------------------------------------------------- claims 6-9


def zhu_runs(folder: Path, seeds: int = 3, **cells_final: tuple[float, dict]) -> claims.Cells:
    """Seeds of each Zhu cell: (accuracy, run fields), the seeds spread by 0.001 in accuracy
    and 1 % in the evaluation fields (the same for every cell: seeds move cells together)."""
    topo = {"ring": "ring", "csgd": "complete", "avgsam": "complete", "gauss": "complete",
            "exp": "exponential"}  # fmt: skip
    for cell, (acc, final) in cells_final.items():
        for s in range(seeds):
            kw = {k: v * (1 + 0.01 * s) if k not in ("exact", "train_acc") else v
                  for k, v in final.items()}  # fmt: skip
            write_run(folder, f"zhu_{cell}_n16", s, acc + s / 1000,
                      topology=topo[cell.split("_")[1]], **kw)  # fmt: skip
    return cells_in(folder)


def test_claim6_needs_a_large_batch_penalty_then_judges_d_sgd(tmp_path):
    c = zhu_runs(tmp_path / "a", 5, sb_csgd=(0.82, {}), sb_ring=(0.82, {}), lb_csgd=(0.78, {}),
                 lb_ring=(0.81, {}), lb_exp=(0.80, {}))  # fmt: skip
    v = claims.claim6(c, 16)
    assert v.verdict == "reproduced", v.reason
    assert "C-SGD large - small batch: -4.00 pp [-4.00, -4.00] (k=5)" in v.reason
    c = zhu_runs(tmp_path / "b", 5, sb_csgd=(0.78, {}), sb_ring=(0.78, {}), lb_csgd=(0.80, {}),
                 lb_ring=(0.83, {}), lb_exp=(0.83, {}))  # fmt: skip
    v = claims.claim6(c, 16)
    assert v.verdict == "regime not reached" and "+2.00 pp" in v.reason and "penalty" in v.reason
    c = zhu_runs(tmp_path / "c", 5, sb_csgd=(0.82, {}), sb_ring=(0.82, {}), lb_csgd=(0.78, {}),
                 lb_ring=(0.76, {}), lb_exp=(0.80, {}))  # fmt: skip
    assert claims.claim6(c, 16).verdict == "not reproduced"


def test_claim6_with_a_diverged_large_batch_c_sgd_is_a_regime_not_reached(tmp_path):
    c = zhu_runs(tmp_path, 3, sb_csgd=(0.80, {}), sb_ring=(0.80, {}), lb_csgd=(0.10, {}),
                 lb_ring=(0.85, {}), lb_exp=(0.85, {}))  # fmt: skip
    v = claims.claim6(c, 16)
    assert v.verdict == "regime not reached" and "diverged" in v.reason


FLAT = {"sharpness_lambda_max": 10.0, "sharpness_trace": 100.0, "train_acc": 0.99}
SHARP = {"sharpness_lambda_max": 40.0, "sharpness_trace": 400.0, "train_acc": 0.995}


def test_claim7_flatness_after_interpolation(tmp_path):
    c = zhu_runs(tmp_path / "a", ip_ring=(0.85, FLAT), ip_csgd=(0.82, SHARP))
    assert c.mean("zhu_ip_ring_n16", "lambda_max") == pytest.approx(10.1)
    v = claims.claim7(c, 16)
    assert v.verdict == "reproduced", v.reason
    c = zhu_runs(tmp_path / "b", ip_ring=(0.85, {**FLAT, "train_acc": 0.93}),
                 ip_csgd=(0.82, SHARP))  # fmt: skip
    v = claims.claim7(c, 16)
    assert v.verdict == "regime not reached" and "zhu_ip_ring_n16 93.00%" in v.reason
    c = zhu_runs(tmp_path / "c", ip_ring=(0.85, {**SHARP, "sharpness_lambda_max": 10.0}),
                 ip_csgd=(0.82, SHARP))  # fmt: skip
    assert claims.claim7(c, 16).verdict == "not reproduced"  # the trace: absent


def _stage1(ens_ece: float, ens_nll: float) -> dict:
    return {5: {"test_acc": 0.8, "test_ece": 0.05, "test_nll": 0.5, "ensemble_acc": 0.8,
                "ensemble_ece": ens_ece, "ensemble_nll": ens_nll}}  # fmt: skip


def test_claim8_scores_where_the_replicas_differ(tmp_path):
    end = {"test_ece": 0.04, "test_nll": 0.45, "ensemble_ece": 0.04, "ensemble_nll": 0.45}
    apart = [0.05] * 5 + [1e-6] * 5  # the replicas differ in lr stage 1, meet after it
    for s in range(3):
        write_run(tmp_path / "a", "zhu_ip_ring_n16", s, 0.8, exact=apart, train_acc=0.99,
                  evals=_stage1(0.02 + s / 1000, 0.40 + s / 1000), **end)  # fmt: skip
    v = claims.claim8(cells_in(tmp_path / "a"), 16)
    assert v.verdict == "reproduced", v.reason
    assert "end of lr stage 1 (Xi^2 >= 0.05): ECE ensemble - x̄ -0.029" in v.reason
    assert "end: Xi^2 1e-06 (smallest over seeds) below the floor 0.001: not scored" in v.reason
    for s in range(3):  # replicas that agree: the ensemble is x̄, nothing to score
        write_run(tmp_path / "b", "zhu_ip_ring_n16", s, 0.8, exact=1e-5, train_acc=0.99,
                  evals=_stage1(0.02, 0.40), **end)  # fmt: skip
    v = claims.claim8(cells_in(tmp_path / "b"), 16)
    assert v.verdict == "regime not reached" and "Xi^2 1e-05 (smallest over seeds)" in v.reason
    for s in range(3):  # scored, and worse
        write_run(tmp_path / "c", "zhu_ip_ring_n16", s, 0.8, exact=0.05, train_acc=0.99,
                  evals=_stage1(0.08 + s / 1000, 0.60 + s / 1000), **end)  # fmt: skip
    assert claims.claim8(cells_in(tmp_path / "c"), 16).verdict == "not reproduced"


def test_claim9_avg_sam_towards_d_sgd(tmp_path):
    c = zhu_runs(tmp_path / "a", ip_ring=(0.85, FLAT), ip_csgd=(0.82, SHARP),
                 ip_avgsam=(0.845, {"sharpness_lambda_max": 12.0}),
                 ip_gauss=(0.82, {"sharpness_lambda_max": 40.0}))  # fmt: skip
    v = claims.claim9(c, 16)
    assert v.verdict == "reproduced", v.reason
    assert "(isotropic: gauss - C-SGD +0.00 pp" in v.reason
    c = zhu_runs(tmp_path / "b", ip_ring=(0.85, FLAT), ip_csgd=(0.82, SHARP),
                 ip_avgsam=(0.80, {"sharpness_lambda_max": 60.0}))  # fmt: skip
    assert claims.claim9(c, 16).verdict == "not reproduced"  # moved away
    c = zhu_runs(tmp_path / "c", ip_ring=(0.82, SHARP), ip_csgd=(0.82, SHARP),
                 ip_avgsam=(0.85, FLAT))  # fmt: skip
    v = claims.claim9(c, 16)
    assert v.verdict == "regime not reached" and "left out (no clear gap): acc" in v.reason


# ------------------------------------------------------------------ report


def every_cell(folder: Path) -> None:
    """A hand-made run of every cell of the grid, 3 seeds, and the MPI pair."""
    for cell, accs in KONG.items():
        for s, a in enumerate(accs):
            write_run(folder, cell, s, a, **HELD)
    zhu_runs(folder, 3, sb_csgd=(0.82, {}), sb_ring=(0.82, {}), lb_csgd=(0.78, {}),
             lb_ring=(0.81, {}), lb_exp=(0.80, {}), ip_ring=(0.85, FLAT),
             ip_csgd=(0.82, SHARP), ip_avgsam=(0.845, {"sharpness_lambda_max": 12.0}),
             ip_gauss=(0.82, {"sharpness_lambda_max": 40.0}))  # fmt: skip
    write_run(folder, "zhu_sb_ring_n16_mpi", 0, 0.82, backend="mpi")
    write_run(folder, "zhu_sb_ring_n16_ref", 0, 0.82, attrs={"sim_mode": "reference"})


def verdict_table(text: str) -> dict[str, str]:
    rows = re.findall(r"^\| ([0-9a-z-]+): .*? \| \*\*(.+?)\*\* \|", text, flags=re.M)
    return dict(rows)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A report of a hand-made run of every cell: tmp/runs/*.h5 -> tmp/docs/RESULTS.md."""
    root = tmp_path_factory.mktemp("report")
    (root / "runs").mkdir()
    every_cell(root / "runs")
    files = [str(p) for p in sorted((root / "runs").glob("*.h5"))]
    assert report.main([*files, "--out", str(root / "docs"), "--note", "took 1 min"]) == 0
    return root


def test_results_markdown_states_each_rule_before_its_numbers(written):
    text = (written / "docs" / "RESULTS.md").read_text()
    for key in ("1", "1-mpi", "2", "3", "4", "5a", "5b", "6", "7", "8", "9"):
        section = text.split(f"\n## Claim {key}:")[1].split("\n## ")[0]
        assert "**Verdict:" in section
        assert section.index("**Rule") < section.index("**Verdict")
        assert "|" not in section.split("**Rule")[0]  # no table before the rule
        assert ("*Carried forward" in section) == (key in ("1", "5a", "5b")), key
    claim2 = text.split("\n## Claim 2:")[1].split("\n## ")[0]
    assert re.search(r"closes - 0.5 gap: \+1\.\d\d pp \[\+1\.\d\d, \+1\.\d\d\] \(k=3\)",
                     claim2)  # each comparison's interval is printed
    claim4 = text.split("\n## Claim 4:")[1].split("\n## ")[0]
    # phase 1 of the guideline: its target (1) beside the exact distance it got (0.9)
    assert re.search(r"\| guideline_f0.25_n16 +\| 1 +\| 1 +\| 0.9 +\| 0.9 +\| 100 ", claim4)
    assert "took 1 min" in text and "![claim1](study/claim1.png)" in text
    assert "## Previous edition" in text
    papers = text[text.index("## Compared with the papers"):text.index("## Previous edition")]
    assert "−5.71 pp" in papers and "| 6 |" in papers and "Raiden-Zhu" in papers
    assert verdict_table(text)["1-mpi"] == "agree"
    assert (written / "docs" / "study" / "claim6.png").stat().st_size > 1000
    assert (written / "docs" / "study" / "claim5a_bound.png").exists()


def test_the_report_rederives_every_verdict_from_the_run_files(written):
    """The verdict table of RESULTS.md is what claims.py's rules give on the run files."""
    files = sorted((written / "runs").glob("*.h5"))
    text = (written / "docs" / "RESULTS.md").read_text()
    runs = [load_run(p) for p in files]
    stats = pd.concat([stats_in(written / "runs"), claims.carried()], ignore_index=True)
    derived = {v.key: v.verdict for v in claims.verdicts(claims.Cells(stats), 16,
                                                         claims.cross_check(runs))}  # fmt: skip
    assert verdict_table(text) == derived and len(derived) == 11
    # ... and from the numbers the report commits beside RESULTS.md, without the run files
    assert {v.key: v.verdict for v in claims.rederive(written / "docs" / "study")} == derived
    assert derived["2"] == "reproduced" and derived["6"] == "reproduced"
    assert derived["1"] == "reproduced"  # the second edition's runs, carried forward


def test_committed_results_follow_from_the_committed_numbers_and_the_run_files():
    """docs/RESULTS.md's verdicts re-derived by the committed rules from the numbers committed
    beside it (docs/study/runs.csv, mpi_check.json); where `make study` left its run files
    (runs/study/fmnist), those numbers re-derived from the files too."""
    text = (ROOT / "docs" / "RESULTS.md").read_text()
    if "third edition" not in text:
        pytest.skip("docs/RESULTS.md is not the third edition's yet (make study writes it)")
    derived = {v.key: v.verdict for v in claims.rederive(ROOT / "docs" / "study")}
    assert verdict_table(text) == derived and len(derived) == 11
    files = sorted((ROOT / "runs" / "study" / "fmnist").glob("*.h5"))
    if files:
        runs = [load_run(p) for p in files]
        fresh = pd.concat([pd.DataFrame([claims.run_stats(r) for r in runs]), claims.carried()],
                          ignore_index=True)  # fmt: skip
        committed = pd.read_csv(ROOT / "docs" / "study" / "runs.csv")
        assert sorted(fresh["run"]) == sorted(committed["run"])
        assert {v.key: v.verdict for v in claims.verdicts(
            claims.Cells(fresh), 16, claims.cross_check(runs))} == derived  # fmt: skip


# ------------------------------------------------------------------ the plans


def test_generator_reproduces_the_committed_files():
    files = [*STUDY.glob("*/*"), *(ROOT / "jobs" / "sweeps").glob("study_*.txt")]
    before = {p: p.read_text() for p in sorted(files) if p.suffix in (".yaml", ".txt")}
    subprocess.run([sys.executable, "-m", "studies.consensus.generate"], check=True, cwd=ROOT)
    files = [*STUDY.glob("*/*"), *(ROOT / "jobs" / "sweeps").glob("study_*.txt")]
    after = {p: p.read_text() for p in sorted(files) if p.suffix in (".yaml", ".txt")}
    assert after == before, "configs/study differ from the generator's output"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_plan_runs_validate_and_references_come_first(plan, tmp_path, monkeypatch):
    n = int(re.fullmatch(r"plan_[a-z]+_n(\d+)(_s\d+)?(_[a-z]+)?", plan.stem).group(1))
    monkeypatch.chdir(tmp_path)  # reference_run paths are relative: placeholders here
    (tmp_path / "data").mkdir()
    entries = read_plan(str(plan))
    assert entries and len({e.overrides for e in entries}) == len(entries)
    written: set[str] = set()
    for entry in entries:
        refs = [o.split("=", 1)[1] for o in entry.overrides if "reference_run=" in o]
        assert all(r in written for r in refs), f"{entry}: reference not run before"
        for ref in refs:
            Path(ref).touch()  # config validation only checks that the file exists
        cfg = load_config(str(ROOT / entry.config), [*entry.overrides, "data.root=data"])
        check_world(cfg, n)
        seeds = {o for o in entry.overrides if o.startswith("run.seed=")}
        assert len(seeds) == 1 and cfg.run.name.endswith(f"_s{cfg.run.seed}")
        assert ("_mpi_s" in cfg.run.name) == ("plan_mpi" in plan.name and "fmnist" in str(plan))
        assert ("_ref_s" in cfg.run.name) == ("plan_ref" in plan.name)
        path = f"{cfg.run.out_dir}/{cfg.run.name}.h5"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        written.add(path)


def test_the_fmnist_grid_meets_the_issue():
    """Unique run names; seeds; Kong's unit; Zhu's lrs per total batch; the MPI pair."""
    plans = sorted((STUDY / "fmnist").glob("plan_*.txt"))
    entries = [e for p in plans for e in read_plan(str(p))]
    names = [o.split("=", 1)[1] for e in entries for o in e.overrides if o.startswith("run.name=")]
    assert len(names) == len(set(names))
    s = generate.FMNIST
    assert len(s["kong_seeds"]) >= 3 and len(s["ip_seeds"]) >= 3 and len(s["zhu_seeds"]) >= 5

    def cfg(name: str):
        return load_config(str(STUDY / "fmnist" / f"{name}.yaml"), ["data.root=."])

    for f in (0.5, 0.25, 0.125):  # Kong's 1/2, 1/4, 1/8 of Xi_max: factors of the distance
        phase = cfg(f"dec-phase-1_f{f}_n16").consensus.phases[0]
        assert (phase.factor, phase.factor_unit) == (f, "distance")
    peak = {}
    for name in ("zhu_sb_csgd_n16", "zhu_lb_csgd_n16", "zhu_lb_ring_n16", "zhu_ip_ring_n16"):
        c = cfg(name)
        total = 16 * c.data.batch_size
        peak[total] = c.optim.lr * total / c.optim.base_batch
        assert c.optim.momentum == 0 and c.optim.weight_decay == 0
        assert c.gossip.order == "gossip_first" and c.data.train_size >= total
    assert peak[1024] == pytest.approx(0.1) and peak[8192] == pytest.approx(0.8)  # Zhu's
    assert cfg("zhu_sb_ring_n16").data.train_size == cfg("zhu_lb_ring_n16").data.train_size
    for path in (STUDY / "fmnist").glob("*.yaml"):  # controlled phases compare Xi^2 itself
        body = yaml.safe_load(path.read_text())
        targets = {p["target"] for p in body["consensus"]["phases"]}
        if targets & {"constant", "adaptive"}:
            assert body["consensus"]["measure"] == "exact", path.name
    mpi = read_plan(str(STUDY / "fmnist" / "plan_mpi_n16.txt"))
    ref = read_plan(str(STUDY / "fmnist" / "plan_ref_n16.txt"))
    assert [(e.config, e.overrides[0]) for e in mpi] == [(e.config, e.overrides[0]) for e in ref]
    order = [ln for ln in (STUDY / "fmnist" / "plans.txt").read_text().splitlines()
             if not ln.startswith("#")]  # fmt: skip
    assert sorted(Path(p).name for p in order) == sorted(p.name for p in plans)
    assert order[-1].endswith("plan_mpi_n16.txt")
    assert generate.budget(generate.FMNIST)["wall (ideal packing)"] <= 50  # README's budget


def test_cifar10_sweeps_run_references_in_the_first_array_job():
    sweeps = ROOT / "jobs" / "sweeps"
    first = read_plan(str(sweeps / "study_cifar10_1.txt"))
    then = read_plan(str(sweeps / "study_cifar10_2.txt"))
    produced = {
        f"runs/study/cifar10/{o.split('=', 1)[1]}.h5"
        for e in first
        for o in e.overrides
        if o.startswith("run.name=")
    }
    needed = {o.split("=", 1)[1] for e in then for o in e.overrides if "reference_run=" in o}
    assert needed and needed <= produced
    plan = read_plan(str(STUDY / "cifar10" / "plan_mpi_n16.txt"))
    assert sorted(map(str, plan)) == sorted(map(str, first + then))  # the same runs


# ------------------------------------------------- plans run: simulator, MPI


def tiny_plan(tmp_path: Path, bad_middle: bool = False) -> Path:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        yaml.safe_dump({**TINY, "run": {**TINY["run"], "out_dir": str(tmp_path / "runs")}})
    )
    ref = tmp_path / "runs" / "ref_s0.h5"
    control = (
        f"consensus.measure=exact consensus.phases.0.target=constant "
        f"consensus.phases.0.factor=0.5 consensus.phases.0.reference_run={ref} "
        f"consensus.phases.0.max_rounds=4"
    )
    middle = f"{cfg} run.name=bad_s0 optim.lr=-1\n" if bad_middle else ""
    plan = tmp_path / "plan.txt"
    plan.write_text(f"# two runs\n{cfg} run.name=ref_s0 metrics.exact_every=1\n\n{middle}"
                    f"{cfg} run.name=ctl_s0 {control}\n")  # fmt: skip
    return plan


def test_sim_plan_runs_in_one_process_without_mpi_and_skips_finished_runs(tmp_path):
    plan = tiny_plan(tmp_path)
    code = ("import sys; from dsgd_mpi.study import main; rc = main(sys.argv[1:]); "
            "print('mpi4py imported:', 'mpi4py' in sys.modules); sys.exit(rc)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, "--sim", "4", str(plan)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[1/2]" in done.stdout and "plan done: 2 runs" in done.stdout
    assert "mpi4py imported: False" in done.stdout
    with h5py.File(tmp_path / "runs" / "ctl_s0.h5", "r", locking=False) as f:
        assert f.attrs["backend"] == "sim" and f.attrs["world_size"] == 4
        assert yaml.safe_load(f.attrs["config"])["consensus"]["phases"][0]["factor"] == 0.5
        assert f["steps"]["gossip_rounds"][:].max() > 1  # the exact-distance target bound
    assert "done: averaged model" in (tmp_path / "runs" / "ctl_s0.log").read_text()
    again = subprocess.run([sys.executable, "-m", "dsgd_mpi.study", str(plan), "--sim", "4"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0 and again.stdout.count("skip (finished, same config)") == 2


def test_a_plan_runs_in_the_simulators_reference_mode(tmp_path):
    plan = tiny_plan(tmp_path)
    done = subprocess.run([sys.executable, "-m", "dsgd_mpi.study", "--sim", "3", "--mode",
                           "reference", str(plan)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with h5py.File(tmp_path / "runs" / "ctl_s0.h5", "r", locking=False) as f:
        assert f.attrs["sim_mode"] == "reference" and f.attrs["world_size"] == 3


def test_a_failed_run_stops_the_sim_plan(tmp_path):
    plan = tiny_plan(tmp_path, bad_middle=True)
    done = subprocess.run([sys.executable, "-m", "dsgd_mpi.study", str(plan), "--sim", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "[2/3] FAILED (status 2)" in done.stdout and "optim.lr" in done.stderr
    assert not (tmp_path / "runs" / "ctl_s0.h5").exists()  # the plan stopped there


@pytest.mark.mpi
def test_study_runs_a_plan_in_one_mpi_job_and_skips_finished_runs(tmp_path):
    plan = tiny_plan(tmp_path)
    done = run_ranks(2, ["-m", "dsgd_mpi.study", str(plan)], timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "[1/2]" in out and "[2/2]" in out and "plan done: 2 runs" in out
    for name in ("ref_s0", "ctl_s0"):
        with h5py.File(tmp_path / "runs" / f"{name}.h5", "r", locking=False) as f:
            assert "finished" in f.attrs and f.attrs["backend"] == "mpi"
        assert "done: averaged model" in (tmp_path / "runs" / f"{name}.log").read_text()
    again = run_ranks(2, ["-m", "dsgd_mpi.study", str(plan)], timeout=120)
    assert again.returncode == 0 and again.stdout.count("skip (finished, same config)") == 2

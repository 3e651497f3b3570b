"""The study (issue 16): claim verdicts on hand-made run files, the report, the generated
plans, plans run by the simulator in one process and by one MPI job."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import h5py
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
              n: int | None = None, rounds: int = 1, exact: float = 0.5, bound: float = 1.0,
              target: float = math.inf, measured: float | None = None, backend: str = "sim",
              order: str = "local_first", **final: float) -> str:  # fmt: skip
    """A finished run file of 10 logged steps and one evaluation, as the trainer writes it.

    ``final`` sets evaluation fields (test_nll, ensemble_ece, sharpness_lambda_max, ...).
    """
    name = f"{cell}_s{seed}"
    n = n or int(cell.split("_n")[-1].split("_")[0])
    cfg = load_config(None, [f"run.name={name}", f"run.seed={seed}", "metrics.log_every=1",
                             f"topology.name={topology}", f"gossip.order={order}"])  # fmt: skip
    path = str(folder / f"{name}.h5")
    attrs = {"config": to_yaml(cfg), "world_size": n, "topology": topology, "backend": backend,
             "started": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    w = H5Writer(path, attrs, flush_every=4)
    for step in range(1, 11):
        w.log_step(dict(step=step, epoch=step / 10, phase=0, lr=0.1, train_loss=1.0,
                        train_acc=acc, consensus_estimate=0.1, consensus_exact=exact,
                        consensus_measured=exact if measured is None else measured,
                        consensus_bound=bound, gossip_rounds=rounds, target=target,
                        bytes_sent=1000 * rounds, time_compute=0.0, time_gossip=0.0,
                        time_allreduce=0.0, gossip_rounds_total=step * rounds,
                        bytes_sent_total=step * 1000 * rounds))  # fmt: skip
    w.log_eval(dict(step=10, epoch=1.0, test_loss=1.0, test_acc=acc, local_acc_mean=acc,
                    local_acc_min=acc, local_acc_max=acc, **final))  # fmt: skip
    w.close(finished=True)
    return path


def cells(folder: Path, accs: dict[str, tuple[float, ...]], **kw) -> claims.Cells:
    for cell, values in accs.items():
        for s, a in enumerate(values):
            write_run(folder, cell, s, a, **kw)
    return cells_in(folder)


def cells_in(folder: Path) -> claims.Cells:
    paths = sorted(folder.glob("*.h5"))
    return claims.Cells(pd.DataFrame([claims.run_stats(load_run(p)) for p in paths]))


# ------------------------------------------------------------------- claim 1


def test_ring_clearly_worse_with_a_growing_gap_is_reproduced(tmp_path):
    c = cells(tmp_path, {"ring_n4": (0.880, 0.882), "complete_n4": (0.885, 0.887),
                         "ring_n16": (0.850, 0.852), "complete_n16": (0.885, 0.886),
                         "ring_n32": (0.840, 0.842), "complete_n32": (0.884, 0.886)})  # fmt: skip
    v = claims.claim1(c)
    assert v.verdict == "reproduced", v.reason
    assert "gap n=16: +3.45 pp" in v.reason and "growth n=4->32: +3.90 pp" in v.reason


def test_ring_as_good_as_complete_is_not_reproduced(tmp_path):
    c = cells(tmp_path, {"ring_n4": (0.880, 0.882), "complete_n4": (0.870, 0.872),
                         "ring_n16": (0.880, 0.882), "complete_n16": (0.860, 0.862)})  # fmt: skip
    assert claims.claim1(c).verdict == "not reproduced"


def test_a_gap_the_seeds_could_have_seen_but_did_not_is_absent(tmp_path):
    c = cells(tmp_path, {"ring_n4": (0.880, 0.881), "complete_n4": (0.880, 0.881),
                         "ring_n16": (0.879, 0.881), "complete_n16": (0.880, 0.881)})  # fmt: skip
    v = claims.claim1(c)
    assert v.verdict == "not reproduced" and "gap n=16: +0.05 pp" in v.reason


def test_differences_inside_the_seed_noise_are_inconclusive_and_one_seed_never_decides(tmp_path):
    c = cells(tmp_path / "a", {"ring_n4": (0.85, 0.89), "complete_n4": (0.86, 0.88),
                               "ring_n16": (0.84, 0.89), "complete_n16": (0.87, 0.88)})  # fmt: skip
    assert claims.claim1(c).verdict == "inconclusive"
    c = cells(tmp_path / "b", {"ring_n4": (0.80,), "complete_n4": (0.90,),
                               "ring_n16": (0.70,), "complete_n16": (0.90,)})  # fmt: skip
    assert claims.claim1(c).verdict == "inconclusive"


@pytest.fixture(autouse=True)
def _folders(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()


def test_mpi_cells_agree_with_the_simulator_or_differ(tmp_path):
    accs = {"ring_n16": (0.850, 0.852, 0.851)}
    for s, a in enumerate((0.851, 0.850, 0.852)):
        write_run(tmp_path, "ring_n16_mpi", s, a, backend="mpi")
    c = cells(tmp_path, accs)
    v = claims.mpi_check(c)
    assert v.verdict == "agree" and "ring_n16_mpi - simulator: +0.00 pp" in v.reason
    assert c.stats.set_index("run").loc["ring_n16_mpi_s0", "backend"] == "mpi"
    for s, a in enumerate((0.800, 0.802, 0.801)):
        write_run(tmp_path, "ring_n16_mpi", s, a, backend="mpi")
    assert claims.mpi_check(cells_in(tmp_path)).verdict == "differ"
    # One MPI seed beside the simulator's three: judged against their spread.
    for s in (1, 2):
        (tmp_path / f"ring_n16_mpi_s{s}.h5").unlink()
    assert claims.mpi_check(cells_in(tmp_path)).verdict == "differ"  # 5 pp off
    write_run(tmp_path, "ring_n16_mpi", 0, 0.8505, backend="mpi")
    assert claims.mpi_check(cells_in(tmp_path)).verdict == "agree"


# -------------------------------------------------------------- claims 2-4


def test_critical_consensus_distance(tmp_path):
    accs = {
        "complete_n16": (0.880, 0.881),
        "dec-phase-1_none_n16": (0.840, 0.841),
        "dec-phase-1_f0.5_n16": (0.870, 0.871),
        "dec-phase-1_f0.25_n16": (0.879, 0.880),
        "dec-phase-1_f0.125_n16": (0.879, 0.881),
    }
    held = dict(target=1.0, exact=0.9)  # the measured distance met its target on every step
    assert claims.claim2(cells(tmp_path / "a", accs, **held), 16).verdict == "reproduced"
    accs["dec-phase-1_f0.25_n16"] = accs["dec-phase-1_f0.5_n16"] = (0.846, 0.847)
    accs["dec-phase-1_f0.125_n16"] = (0.846, 0.848)
    v = claims.claim2(cells(tmp_path / "b", accs, **held), 16)
    assert v.verdict == "not reproduced" and "f0.25 closes 15%" in v.reason


def test_a_control_that_did_not_hold_cannot_decide(tmp_path):
    accs = {"complete_n16": (0.880, 0.881), "dec-phase-1_none_n16": (0.840, 0.841),
            "dec-phase-1_f0.5_n16": (0.870, 0.871), "dec-phase-1_f0.25_n16": (0.879, 0.880),
            "dec-phase-1_f0.125_n16": (0.879, 0.881)}  # fmt: skip
    c = cells(tmp_path, accs, target=1.0, exact=2.0)  # measured above target on every step
    v = claims.claim2(c, 16)
    assert v.verdict == "inconclusive" and "dec-phase-1_f0.5_n16 held 0%" in v.reason
    stats = c.stats.set_index("run").loc["dec-phase-1_f0.5_n16_s0"]
    assert stats["target_p1"] == 1.0 and stats["exact_p1"] == 2.0 and stats["held_p1"] == 0.0


def test_distance_in_phase_two_that_hurts_is_not_reproduced(tmp_path):
    accs = {"complete_n16": (0.880, 0.881), "ring_n16": (0.850, 0.851),
            "dec-phase-2_none_n16": (0.881, 0.880), "dec-phase-2_f0.5_n16": (0.880, 0.882)}
    v = claims.claim3(cells(tmp_path / "a", accs), 16)
    assert v.verdict == "reproduced", v.reason
    accs["dec-phase-2_none_n16"] = (0.860, 0.861)
    assert claims.claim3(cells(tmp_path / "b", accs), 16).verdict == "not reproduced"


def test_guideline_needs_far_fewer_rounds_than_whole_run_control(tmp_path):
    for cell, acc, rounds in (("guideline_f0.25_n16", 0.880, 2), ("whole_f0.25_n16", 0.880, 6),
                              ("complete_n16", 0.880, 1), ("ring_n16", 0.850, 1)):  # fmt: skip
        for s in (0, 1):
            write_run(tmp_path, cell, s, acc + s / 1000, rounds=rounds)
    c = cells_in(tmp_path)
    v = claims.claim4(c, 16)
    assert v.verdict == "reproduced", v.reason
    assert c.mean("guideline_f0.25_n16", "rounds") == 20  # the running total of the last row
    for s in (0, 1):  # whole-run control that costs only 1.5x the guideline's rounds
        write_run(tmp_path, "whole_f0.25_n16", s, 0.88, rounds=3)
    v = claims.claim4(cells_in(tmp_path), 16)
    assert v.verdict == "not reproduced" and "rounds 0.67" in v.reason


# ------------------------------------------------------------------- claim 5


def test_bound_violation_and_rounds_to_a_target(tmp_path):
    write_run(tmp_path, "target_ring_n16", 0, 0.5, rounds=8, target=0.1, exact=0.09)
    write_run(tmp_path, "target_onepeer_n16", 0, 0.5, rounds=2, topology="one_peer_exponential",
              target=0.1, exact=0.01, bound=math.nan)  # fmt: skip
    a, b = claims.claim5(cells_in(tmp_path), 16)
    assert a.verdict == "reproduced" and "10 logged" in a.reason  # ring only: one-peer's is NaN
    assert b.verdict == "reproduced" and "ratio 0.25" in b.reason
    assert "one-peer 4, ring 45" in b.reason  # rounds to shrink the distance 100x, from W(t)
    write_run(tmp_path, "target_onepeer_n16", 0, 0.5, rounds=6, topology="one_peer_exponential",
              target=0.1, exact=0.01, bound=math.nan)  # fmt: skip
    write_run(tmp_path, "zhu_lb_ring_n16", 0, 0.5, exact=2.0, bound=1.0, order="gossip_first")
    a, _ = claims.claim5(cells_in(tmp_path), 16)  # measured after the gradient: not bounded
    assert a.verdict == "reproduced" and "10 logged" in a.reason
    write_run(tmp_path, "ring_n16", 0, 0.5, exact=2.0, bound=1.0)
    a, b = claims.claim5(cells_in(tmp_path), 16)
    assert a.verdict == "not reproduced" and "10 with exact > bound" in a.reason
    assert b.verdict == "not reproduced"


# -------------------------------------------------------------- claims 6-9


def zhu_runs(folder: Path, **cells_final: tuple[float, dict]) -> claims.Cells:
    """Three seeds per Zhu cell: (accuracy, evaluation fields), seeds spread by 0.001."""
    topo = {"ring": "ring", "csgd": "complete", "avgsam": "complete"}
    for cell, (acc, final) in cells_final.items():
        for s in range(3):
            jitter = {k: v * (1 + 0.01 * s) for k, v in final.items()}
            write_run(folder, f"zhu_{cell}_n16", s, acc + s / 1000,
                      topology=topo[cell.split("_")[1]], **jitter)  # fmt: skip
    return cells_in(folder)


def test_zhu_claims_from_known_values(tmp_path):
    flat, sharp = {"sharpness_lambda_max": 10.0, "sharpness_trace": 100.0}, {
        "sharpness_lambda_max": 40.0, "sharpness_trace": 400.0}
    calib = {"test_ece": 0.05, "test_nll": 0.4, "ensemble_ece": 0.02, "ensemble_nll": 0.3}
    c = zhu_runs(tmp_path, sb_ring=(0.800, {}), sb_csgd=(0.801, {}),
                 lb_ring=(0.850, {**flat, **calib}), lb_csgd=(0.820, sharp),
                 lb_avgsam=(0.840, {"sharpness_lambda_max": 20.0}))  # fmt: skip
    assert c.mean("zhu_lb_ring_n16", "lambda_max") == pytest.approx(10.1)
    for claim in (claims.claim6, claims.claim7, claims.claim8, claims.claim9):
        v = claim(c, 16)
        assert v.verdict == "reproduced", (v.key, v.reason)


def test_zhu_claims_the_other_way(tmp_path):
    same = {"sharpness_lambda_max": 40.0, "sharpness_trace": 400.0}
    calib = {"test_ece": 0.02, "test_nll": 0.3, "ensemble_ece": 0.05, "ensemble_nll": 0.4}
    c = zhu_runs(tmp_path, sb_ring=(0.800, {}), sb_csgd=(0.801, {}),
                 lb_ring=(0.820, {**same, "sharpness_lambda_max": 10.0, **calib}),
                 lb_csgd=(0.850, same), lb_avgsam=(0.870, {"sharpness_lambda_max": 60.0}))
    assert claims.claim6(c, 16).verdict == "not reproduced"  # D-SGD clearly below
    assert claims.claim7(c, 16).verdict == "not reproduced"  # trace: absent
    assert claims.claim8(c, 16).verdict == "not reproduced"  # the ensemble is worse
    assert claims.claim9(c, 16).verdict == "not reproduced"  # avg-SAM moved away


def test_a_diverged_large_batch_c_sgd_is_inconclusive(tmp_path):
    c = zhu_runs(tmp_path, sb_ring=(0.80, {}), sb_csgd=(0.80, {}), lb_ring=(0.85, {}),
                 lb_csgd=(0.10, {}))  # fmt: skip
    v = claims.claim6(c, 16)
    assert v.verdict == "inconclusive" and "diverged" in v.reason


# ------------------------------------------------------------------ report


def test_results_markdown_states_each_rule_before_its_numbers(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    for cell in ("ring_n4", "complete_n4", "ring_n16", "complete_n16", "guideline_f0.25_n16",
                 "zhu_lb_ring_n16"):  # fmt: skip
        for s in (0, 1):
            write_run(runs_dir, cell, s, 0.8 + s / 100, target=1.0 if "f0" in cell else math.inf)
    files = [str(p) for p in sorted(runs_dir.glob("*.h5"))]
    assert report.main([*files, "--out", str(tmp_path / "docs"), "--note", "took 1 min"]) == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    for key in ("1", "1-mpi", "2", "3", "4", "5a", "5b", "6", "7", "8", "9"):
        section = text.split(f"\n## Claim {key}:")[1].split("\n## ")[0]
        assert "**Verdict:" in section
        if key not in ("1-mpi", "5b"):
            assert section.index("**Rule") < section.index("**Verdict")
            assert "|" not in section.split("**Rule")[0]  # no table before the rule
    claim4 = text.split("\n## Claim 4:")[1].split("\n## ")[0]
    # phase 1 of the guideline: its target (1) beside the exact distance it got (0.5)
    assert re.search(r"\| guideline_f0.25_n16 \| 1 +\| 1 +\| 0.5 +\| 0.5 +\| 100 ", claim4)
    assert "took 1 min" in text and "![claim1_acc](study/claim1_acc.png)" in text
    assert "## Previous edition" in text  # then, now, and the claim's number now
    assert re.search(r"\| 6b: one-peer vs ring rounds +\| inconclusive +\| inconclusive +\| 5b ",
                     text)  # fmt: skip
    assert (tmp_path / "docs" / "study" / "claim1_acc.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "study" / "claim5_bound.png").exists()


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
    assert len(entries) >= 2 and len({e.overrides for e in entries}) == len(entries)
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
        path = f"{cfg.run.out_dir}/{cfg.run.name}.h5"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        written.add(path)


def test_the_fmnist_grid_meets_the_issue():
    """Unique run names; >= 3 seeds; >= 5x the first edition's 234 steps at 16 workers."""
    plans = sorted((STUDY / "fmnist").glob("plan_*.txt"))
    entries = [e for p in plans for e in read_plan(str(p))]
    s = generate.FMNIST
    stage2 = [c for c in generate.cells(s) if c.stage == 2]
    names = [o.split("=", 1)[1] for e in entries for o in e.overrides if o.startswith("run.name=")]
    names += [generate.run_name(s, c, "sim", seed) for c in stage2 for seed in s["seeds"]]
    assert len(names) == len(set(names)) and len(s["seeds"]) >= 3
    big = load_config(str(ROOT / "configs/study/fmnist/ring_n16.yaml"), ["data.root=."])
    steps_per_epoch = 60_000 // 16 // big.data.batch_size
    assert big.run.epochs * steps_per_epoch >= 5 * 234
    zhu = load_config(str(ROOT / "configs/study/fmnist/zhu_lb_ring_n16.yaml"), ["data.root=."])
    assert zhu.run.steps >= 70 and zhu.optim.momentum == 0 and zhu.gossip.order == "gossip_first"
    for path in (STUDY / "fmnist").glob("*.yaml"):  # controlled phases compare Xi^2 itself
        body = yaml.safe_load(path.read_text())
        targets = {p["target"] for p in body["consensus"]["phases"]}
        if targets & {"constant", "adaptive"}:
            assert body["consensus"]["measure"] == "exact", path.name


def test_avg_sam_plan_takes_each_seeds_mean_distance(tmp_path):
    s = {**generate.QUICK, "configs": "cfg", "out": str(tmp_path)}
    n = s["big"]
    for seed, xi2 in zip(s["seeds"], (0.5, 0.25), strict=True):
        write_run(tmp_path, f"zhu_lb_ring_n{n}", seed, 0.8, exact=xi2)
    plans = generate.avg_sam_plans(s, str(tmp_path))
    assert sorted(plans) == [f"plan_avgsam_n{n}_s{seed}.txt" for seed in s["seeds"]]
    lines = [ln for text in plans.values() for ln in text.splitlines()
             if ln and not ln.startswith("#")]  # fmt: skip
    assert lines == [
        f"cfg/zhu_lb_avgsam_n{n}.yaml run.seed={seed} run.name=zhu_lb_avgsam_n{n}_s{seed} "
        f"optim.perturb_xi2={xi2}" for seed, xi2 in ((0, 0.5), (1, 0.25))
    ]  # fmt: skip
    (tmp_path / f"zhu_lb_ring_n{n}_s1.h5").unlink()
    with pytest.raises(OSError):
        generate.avg_sam_plans(s, str(tmp_path))


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

"""The study (issue 6): claim verdicts on hand-made run files, the plans, and one real plan."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest
import yaml

from dsgd_mpi.analysis import claims, report
from dsgd_mpi.analysis.load import load_run
from dsgd_mpi.config import check_world, load_config, to_yaml
from dsgd_mpi.metrics import H5Writer
from dsgd_mpi.study import read_plan
from tests.mpi_util import run_ranks

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "configs" / "study"
PLANS = sorted(STUDY.glob("*/plan_n*.txt"))
TINY = {  # a synthetic run of a few seconds on 2 ranks
    "run": {"epochs": 1, "seed": 3},
    "data": {"name": "synthetic", "synthetic_size": 512, "batch_size": 16},
    "model": {"name": "mlp"},
    "optim": {"lr": 0.05, "base_batch": 64},
    "metrics": {"log_every": 1, "exact_every": 2, "eval_every": 1, "flush_every": 3},
}


def write_run(tmp_path: Path, cell: str, seed: int, acc: float, *, topology: str = "ring",
              n: int = 16, rounds: int = 1, exact: float = 0.5, bound: float = 1.0,
              estimate: float = 0.1, target: float = math.inf) -> str:  # fmt: skip
    """A finished run file of ``rows`` logged steps, as the trainer writes it."""
    name = f"{cell}_s{seed}"
    cfg = load_config(None, [f"run.name={name}", f"run.seed={seed}", "metrics.log_every=1",
                             f"topology.name={topology}"])  # fmt: skip
    path = str(tmp_path / f"{name}.h5")
    attrs = {"config": to_yaml(cfg), "world_size": n, "topology": topology,
             "started": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    w = H5Writer(path, attrs, flush_every=4)
    for step in range(1, 11):
        w.log_step(dict(step=step, epoch=step / 10, phase=0, lr=0.1, train_loss=1.0,
                        train_acc=acc, consensus_estimate=estimate, consensus_exact=exact,
                        consensus_bound=bound, gossip_rounds=rounds, target=target,
                        bytes_sent=1000 * rounds, time_compute=0.0, time_gossip=0.0,
                        time_allreduce=0.0))  # fmt: skip
    w.log_eval(dict(step=10, epoch=1.0, test_loss=1.0, test_acc=acc, local_acc_mean=acc,
                    local_acc_min=acc, local_acc_max=acc))  # fmt: skip
    w.close(finished=True)
    return path


def table(tmp_path: Path, accs: dict[str, tuple[float, ...]], **kw) -> pd.DataFrame:
    paths = [write_run(tmp_path, cell, s, a, n=int(cell.rsplit("_n", 1)[1]), **kw)
             for cell, values in accs.items() for s, a in enumerate(values)]  # fmt: skip
    stats = pd.DataFrame([claims.run_stats(load_run(p)) for p in paths])
    return claims.cell_table(stats)


def test_ring_clearly_worse_with_a_growing_gap_is_reproduced(tmp_path):
    t = table(tmp_path, {"ring_n4": (0.880, 0.882), "complete_n4": (0.885, 0.887),
                         "ring_n16": (0.850, 0.852), "complete_n16": (0.885, 0.886)})  # fmt: skip
    v = claims.claim1(t)
    assert v.verdict == "reproduced", v.reason
    assert "gap n=16: +3.45 pp" in v.reason


def test_ring_as_good_as_complete_is_not_reproduced(tmp_path):
    t = table(tmp_path, {"ring_n4": (0.880, 0.882), "complete_n4": (0.870, 0.872),
                         "ring_n16": (0.880, 0.882), "complete_n16": (0.860, 0.862)})  # fmt: skip
    assert claims.claim1(t).verdict == "not reproduced"


def test_a_gap_the_seeds_could_have_seen_but_did_not_is_absent(tmp_path):
    t = table(tmp_path, {"ring_n4": (0.880, 0.881), "complete_n4": (0.880, 0.881),
                         "ring_n16": (0.879, 0.881), "complete_n16": (0.880, 0.881)})  # fmt: skip
    v = claims.claim1(t)
    assert v.verdict == "not reproduced" and "gap n=16: +0.05 pp" in v.reason


def test_differences_inside_the_seed_noise_are_inconclusive(tmp_path):
    t = table(tmp_path, {"ring_n4": (0.85, 0.89), "complete_n4": (0.86, 0.88),
                         "ring_n16": (0.84, 0.89), "complete_n16": (0.87, 0.88)})  # fmt: skip
    assert claims.claim1(t).verdict == "inconclusive"


def test_one_seed_never_decides(tmp_path):
    t = table(tmp_path, {"ring_n4": (0.80,), "complete_n4": (0.90,),
                         "ring_n16": (0.70,), "complete_n16": (0.90,)})  # fmt: skip
    assert claims.claim1(t).verdict == "inconclusive"


def test_critical_consensus_distance(tmp_path):
    accs = {
        "complete_n16": (0.880, 0.881),
        "dec-phase-1_none_n16": (0.840, 0.841),
        "dec-phase-1_f0.5_n16": (0.870, 0.871),
        "dec-phase-1_f0.25_n16": (0.879, 0.880),
    }
    assert claims.claim2(table(tmp_path, accs), 16).verdict == "reproduced"
    accs["dec-phase-1_f0.25_n16"] = accs["dec-phase-1_f0.5_n16"] = (0.845, 0.846)
    assert claims.claim2(table(tmp_path, accs), 16).verdict == "not reproduced"


def cells_in(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-run stats, per-cell table) of every run file in a folder."""
    stats = pd.DataFrame([claims.run_stats(load_run(p)) for p in sorted(folder.glob("*.h5"))])
    return stats, claims.cell_table(stats)


def test_guideline_needs_far_fewer_rounds_than_whole_run_control(tmp_path):
    for cell, acc, rounds in (("guideline_f0.25_n16", 0.880, 2), ("whole_f0.25_n16", 0.880, 6),
                              ("complete_n16", 0.880, 1), ("ring_n16", 0.850, 1)):  # fmt: skip
        for s in (0, 1):
            write_run(tmp_path, cell, s, acc + s / 1000, rounds=rounds)
    _, t = cells_in(tmp_path)
    v = claims.claim4(t, 16)
    assert v.verdict == "reproduced", v.reason
    assert t.loc["guideline_f0.25_n16", "rounds"] == 20  # 10 steps x 2 rounds, exact total
    for s in (0, 1):  # whole-run control that costs only 1.5x the guideline's rounds
        write_run(tmp_path, "whole_f0.25_n16", s, 0.88, rounds=3)
    v = claims.claim4(cells_in(tmp_path)[1], 16)
    assert v.verdict == "not reproduced" and "= 0.67" in v.reason


def test_bound_violation_and_topology_rounds(tmp_path):
    write_run(tmp_path, "adaptive_ring_n16", 0, 0.5, rounds=8, estimate=0.2, target=0.1, exact=0.5)
    write_run(tmp_path, "adaptive_onepeer_n16", 0, 0.5, rounds=2, topology="one_peer_exponential",
              estimate=0.05, target=0.1, bound=math.nan, exact=0.01)  # fmt: skip
    stats, t = cells_in(tmp_path)
    a, b = claims.claim6(stats, t, 16)
    assert a.verdict == "reproduced" and "10 logged" in a.reason  # ring only: bound is NaN
    assert b.verdict == "reproduced" and "0.01 vs 0.5" in b.reason
    assert "one-peer 4, ring 45" in b.reason  # rounds to shrink the distance 100x, from W(t)
    write_run(tmp_path, "ring_n16", 0, 0.5, exact=2.0, bound=1.0)
    a, _ = claims.claim6(*cells_in(tmp_path), 16)
    assert a.verdict == "not reproduced" and "10 with exact > bound" in a.reason


def test_results_markdown_has_every_claim_and_its_plots(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    for cell in ("ring_n4", "complete_n4", "ring_n16", "complete_n16", "guideline_f0.25_n16"):
        for s in (0, 1):
            write_run(runs_dir, cell, s, 0.8 + s / 100, n=int(cell.rsplit("_n", 1)[1]))
    files = [str(p) for p in sorted(runs_dir.glob("*.h5"))]
    assert report.main([*files, "--out", str(tmp_path / "docs"), "--note", "took 1 min"]) == 0
    text = (tmp_path / "docs" / "RESULTS.md").read_text()
    for key in ("1:", "2:", "3:", "4:", "5:", "6a:", "6b:"):
        assert f"## Claim {key}" in text
    assert "took 1 min" in text and "![claim1_acc](study/claim1_acc.png)" in text
    assert (tmp_path / "docs" / "study" / "claim1_acc.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "study" / "claim6_bound.png").exists()


# ------------------------------------------------------------------ the plans


def test_generator_reproduces_the_committed_files():
    before = {p: p.read_text() for p in sorted(STUDY.glob("*/*")) if p.suffix in (".yaml", ".txt")}
    subprocess.run([sys.executable, str(STUDY / "generate.py")], check=True)
    after = {p: p.read_text() for p in sorted(STUDY.glob("*/*")) if p.suffix in (".yaml", ".txt")}
    assert after == before, "configs/study differ from generate.py's output"


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_plan_runs_validate_and_references_come_first(plan, tmp_path, monkeypatch):
    n = int(plan.stem.removeprefix("plan_n"))
    monkeypatch.chdir(tmp_path)  # reference_run paths are relative: placeholders here
    (tmp_path / "data").mkdir()
    entries = read_plan(str(plan))
    assert len(entries) >= 4 and len({e.overrides for e in entries}) == len(entries)
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
        path = f"{cfg.run.out_dir}/{cfg.run.name}.h5"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        written.add(path)


# ------------------------------------------------------------- a real plan, 2 ranks


@pytest.mark.mpi
def test_study_runs_a_plan_in_one_job_and_skips_finished_runs(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        yaml.safe_dump({**TINY, "run": {**TINY["run"], "out_dir": str(tmp_path / "runs")}})
    )
    ref = tmp_path / "runs" / "ref_s0.h5"
    control = (
        f"consensus.phases.0.target=constant consensus.phases.0.factor=0.5 "
        f"consensus.phases.0.reference_run={ref} consensus.phases.0.max_rounds=4"
    )
    plan = tmp_path / "plan.txt"
    plan.write_text(f"# two runs\n{cfg} run.name=ref_s0\n\n{cfg} run.name=ctl_s0 {control}\n")
    done = run_ranks(2, ["-m", "dsgd_mpi.study", str(plan)], timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "[1/2]" in out and "[2/2]" in out and "plan done: 2 runs" in out
    for name in ("ref_s0", "ctl_s0"):
        with h5py.File(tmp_path / "runs" / f"{name}.h5", "r", locking=False) as f:
            assert "finished" in f.attrs
        assert "done: averaged model" in (tmp_path / "runs" / f"{name}.log").read_text()
    with h5py.File(tmp_path / "runs" / "ctl_s0.h5", "r", locking=False) as f:
        assert yaml.safe_load(f.attrs["config"])["consensus"]["phases"][0]["factor"] == 0.5
        assert f["steps"]["gossip_rounds"][:].max() > 1
    again = run_ranks(2, ["-m", "dsgd_mpi.study", str(plan)], timeout=120)
    assert again.returncode == 0 and again.stdout.count("skip (finished, same config)") == 2


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
    plan = read_plan(str(STUDY / "cifar10" / "plan_n16.txt"))
    assert sorted(map(str, plan)) == sorted(map(str, first + then))  # the same runs

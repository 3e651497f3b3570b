"""Tests for dsgd_mpi.analyze: run files written by metrics.H5Writer, read back and summarised."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from dsgd_mpi import analyze
from dsgd_mpi.analysis import load as load_mod
from dsgd_mpi.analyze import eval_frame, load_run, main, steps_frame
from dsgd_mpi.config import load_config, to_yaml
from dsgd_mpi.metrics import EVAL_FIELDS, STEP_FIELDS, H5Writer

QUICKSTART = str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml")

DEC_PHASE = (
    "consensus.phases=[{until_epoch: 1, target: %s}, {until_epoch: 2, target: %s}, {target: %s}]"
)


@pytest.fixture(autouse=True)
def _fast_retry(monkeypatch):
    monkeypatch.setattr(load_mod, "RETRY_DELAY", 0.01)


def make_run(
    tmp_path: Path,
    name: str,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
    accs: tuple[float, ...] = (0.5, 0.7, 0.8),
    world_size: int = 4,
    rows: int = 30,
    finished: bool = True,
) -> str:
    """A run file as the trainer writes it: 3 phases of 10 logged rows, one eval per epoch."""
    cfg = load_config(QUICKSTART, [f"run.name={name}", f"run.seed={seed}", *overrides])
    path = str(tmp_path / f"{name}.h5")
    attrs = {
        "config": to_yaml(cfg), "version": "0.1.0", "git": "abc123", "mpi": "MPICH 4",
        "torch": "2.3.0", "world_size": world_size, "topology": cfg.topology.name,
        "started": "2024-05-01T12:00:00+0000",
    }  # fmt: skip
    writer = H5Writer(path, attrs, flush_every=7)
    rng = np.random.default_rng(seed)
    for i in range(rows):
        step = 50 * (i + 1)
        exact = 10.0 ** -(1 + i / 10) if i % 3 == 0 else math.nan
        writer.log_step(
            dict(
                step=step, epoch=3 * i / rows, phase=3 * i // rows, lr=0.1, train_loss=1.0,
                train_acc=0.5, consensus_estimate=10.0 ** -(1 + i / 10) * (1 + rng.random()),
                consensus_exact=exact, consensus_bound=1.0, gossip_rounds=1 + i % 3,
                target=0.01 if 3 * i // rows == 1 else math.inf, bytes_sent=1000,
                time_compute=0.01, time_gossip=0.002, time_allreduce=0.001,
            )
        )  # fmt: skip
    for e, acc in enumerate(accs):
        writer.log_eval(dict(step=50 * (e + 1) * rows // 3, epoch=e + 1.0, test_loss=1 - acc,
                             test_acc=acc, local_acc_mean=acc, local_acc_min=acc,
                             local_acc_max=acc))  # fmt: skip
    writer.flush()
    if finished:
        with h5py.File(path, "a", locking=False) as f:
            f.attrs["finished"] = "2024-05-01T12:10:00+00:00"
    return path


# --------------------------------------------------------------- loading


def test_frames_have_the_writer_columns(tmp_path):
    path = make_run(tmp_path, "ring_s0")
    run = load_run(path)
    assert list(run.steps.columns[: len(STEP_FIELDS)]) == list(STEP_FIELDS)
    assert list(run.eval.columns[: len(EVAL_FIELDS)]) == list(EVAL_FIELDS)
    assert len(run.steps) == 30 and len(run.eval) == 3
    assert run.steps["step"].dtype == np.int64
    assert run.name == "ring_s0"
    assert run.config["run"]["seed"] == 0 and run.config["topology"]["name"] == "ring"
    assert run.attrs["world_size"] == 4 and isinstance(run.attrs["world_size"], int)
    assert run.ranks is None
    assert list(steps_frame(path).columns) == list(run.steps.columns)
    assert eval_frame(path)["test_acc"].tolist() == [0.5, 0.7, 0.8]


def test_name_falls_back_to_file_stem_and_fields_are_completed(tmp_path):
    path = tmp_path / "bare.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("steps/step", data=np.arange(5))
        f.create_dataset("steps/lr", data=np.ones(3))  # caught half-way through a flush
        f.create_dataset("ranks/train_loss", data=np.ones((3, 4)))
    run = load_run(path)
    assert run.name == "bare" and run.config == {}
    assert len(run.steps) == 3 and set(STEP_FIELDS) <= set(run.steps.columns)
    assert run.steps["consensus_exact"].isna().all()
    assert run.eval.empty and set(EVAL_FIELDS) <= set(run.eval.columns)
    assert run.ranks is not None and len(run.ranks) == 12
    assert list(run.ranks.columns) == ["row", "rank", "train_loss"]


def test_file_open_for_writing_elsewhere_can_be_read(tmp_path):
    path = make_run(tmp_path, "live", finished=False)
    script = textwrap.dedent(
        f"""
        import sys, h5py, numpy as np
        f = h5py.File({path!r}, "a", locking=False)
        d = f["steps/step"]; d.resize((d.shape[0] + 1,)); d[-1] = 99999
        f.flush()
        print("ready", flush=True)
        sys.stdin.readline()
        f.close()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        run = load_run(path)  # the other datasets are one row shorter: cut to 30
        assert len(run.steps) == 30 and not run.finished
        # and a handle open for writing in this very process does not stop it either
        with h5py.File(path, "a", locking=False):
            assert len(load_run(path).steps) == 30
    finally:
        proc.communicate("\n", timeout=30)
    assert proc.returncode == 0


# --------------------------------------------------------------- tables


def test_seeds_are_grouped_with_mean_and_std(tmp_path):
    paths = [
        make_run(tmp_path, "ring_s0", seed=0, accs=(0.5, 0.80)),
        make_run(tmp_path, "ring_s1", seed=1, accs=(0.5, 0.90)),
        make_run(tmp_path, "torus", seed=0, overrides=("topology.name=torus",), accs=(0.7,)),
    ]
    runs = [load_run(p) for p in paths]
    summary = analyze.summary_table(runs)
    assert summary["final_test_acc"].tolist() == [0.8, 0.9, 0.7]
    assert summary["gossip_rounds_sum"].iloc[0] == sum(1 + i % 3 for i in range(30))
    assert summary["rounds_per_logged_step"].iloc[0] == pytest.approx(2.0)
    assert summary["bytes_sent_sum"].iloc[0] == 30_000
    assert summary["time_logged_s"].iloc[0] == pytest.approx(30 * 0.013)
    assert summary["wall_s"].iloc[0] == pytest.approx(600.0)

    grouped = analyze.grouped_table(runs)
    assert len(grouped) == 2
    ring = grouped.iloc[0]
    assert ring["group"] == "ring" and ring["seeds"] == 2 and ring["seed_list"] == "0 1"
    assert ring["final_test_acc_mean"] == pytest.approx(0.85)
    assert ring["final_test_acc_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert grouped.iloc[1]["seeds"] == 1 and math.isnan(grouped.iloc[1]["final_test_acc_std"])
    assert list(grouped["topology.name"]) == ["ring", "torus"]  # the config key that varies
    md = analyze.grouped_markdown(grouped)
    assert "85.00 ± 7.07" in md and "70.00" in md

    # the world size is part of the experiment even though it is not in the config
    other_n = load_run(make_run(tmp_path, "ring_n8", seed=2, world_size=8))
    assert len(analyze.grouped_table([*runs, other_n])) == 3


def test_phase_factor_grid(tmp_path):
    specs = {
        "k1_none_s0": ("none", "exact", "exact"),
        "k1_none_s1": ("none", "exact", "exact"),
        "k2_none": ("exact", "none", "exact"),
        "k3_none": ("exact", "exact", "none"),
        "csgd": ("exact", "exact", "exact"),
    }
    runs = [
        load_run(
            make_run(tmp_path, name, seed=i, overrides=(DEC_PHASE % t,), accs=(0.6 + i / 100,))
        )
        for i, (name, t) in enumerate(specs.items())
    ]
    ctrl = "consensus.phases=[{until_epoch: 1, target: constant, reference: 0.01, factor: 0.5, max_rounds: 8}, {until_epoch: 2, target: exact}, {target: exact}]"  # noqa: E501
    runs.append(load_run(make_run(tmp_path, "k1_c05", overrides=(ctrl,), accs=(0.9,))))
    runs.append(load_run(make_run(tmp_path, "plain", accs=(0.5,))))  # 3 x none: not in the grid
    grid = analyze.phase_factor_table(runs)
    assert grid is not None
    assert list(grid["phase k"]) == ["1", "2", "3", "all exact"]
    assert list(grid.columns[3:]) == ["none", "constant 0.5 Ξmax", "exact"]
    assert grid.loc[0, "none"] == "60.50 ± 0.71 (n=2)"
    assert grid.loc[0, "constant 0.5 Ξmax"] == "90.00 (n=1)"
    assert grid.loc[3, "exact"] == "64.00 (n=1)"
    assert analyze.phase_factor_table(runs[-1:]) is None


# ----------------------------------------------------------------- CLI


def test_main_writes_tables_and_plots(tmp_path, capsys):
    paths = [make_run(tmp_path, f"ring_s{s}", seed=s) for s in range(2)]
    paths.append(make_run(tmp_path, "k1", overrides=(DEC_PHASE % ("none", "exact", "exact"),)))
    paths.append(make_run(tmp_path, "k2", overrides=(DEC_PHASE % ("exact", "none", "exact"),)))
    out = tmp_path / "out"
    assert main([*paths, paths[0], "--out", str(out)]) == 0  # a file given twice counts once
    for name in ("summary.md", "summary.csv", "summary_grouped.md", "summary_grouped.csv",
                 "phase_factor.md", "consensus.png", "test_acc.png", "rounds.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    for name in ("consensus.png", "test_acc.png", "rounds.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "summary.md").read_text().count("| ring_s0") == 1
    assert str(out) in capsys.readouterr().out


def test_consensus_overlay_beyond_six_runs(tmp_path):
    runs = [load_run(make_run(tmp_path, f"r{i}", seed=i, rows=4)) for i in range(7)]
    written = analyze.analyze(runs, str(tmp_path / "out"))
    assert all(Path(p).stat().st_size > 0 for p in written)


def test_bad_files_are_skipped_with_a_warning(tmp_path, capsys):
    good = make_run(tmp_path, "good")
    data = Path(good).read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"this is not HDF5\n" * 100)
    no_steps = tmp_path / "no_steps.h5"
    with h5py.File(no_steps, "w") as f:
        f.attrs["config"] = "run: {name: x}\n"
    missing = tmp_path / "missing.h5"

    bad = [truncated, garbage, no_steps, missing]
    out = tmp_path / "out"
    assert main([*map(str, bad), good, "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4
    for line, path in zip(err, bad, strict=True):
        assert line.startswith(f"warning: skipping {path}: ")
    assert "not an HDF5 file" in err[1] and "/steps" in err[2] and "no such file" in err[3]
    assert "good" in (out / "summary.csv").read_text()

    assert main([*map(str, bad), "--out", str(tmp_path / "none")]) == 2
    assert "none of the files" in capsys.readouterr().err
    with pytest.raises(load_mod.LoadError):
        load_run(truncated)


def test_module_runs_as_script_without_torch_or_mpi(tmp_path):
    path = make_run(tmp_path, "cli")
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["analyze", {path!r}, "--out", {str(out)!r}]
        try:
            runpy.run_module("dsgd_mpi.analyze", run_name="__main__")
        except SystemExit as exc:
            print(sorted({{"torch", "mpi4py"}} & set(sys.modules)))
            sys.exit(exc.code)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (out / "consensus.png").stat().st_size > 0


def test_run_without_rows_yet(tmp_path):
    fresh = str(tmp_path / "fresh.h5")
    H5Writer(fresh, {"config": "run: {name: fresh}\n", "world_size": 2}, flush_every=10)
    run = load_run(fresh)
    assert run.name == "fresh" and run.steps.empty and list(run.steps.columns) == list(STEP_FIELDS)
    row = analyze.summary_table([run]).iloc[0]
    assert row["steps"] == 0 and math.isnan(row["final_test_acc"]) and not row["finished"]
    assert main([fresh, make_run(tmp_path, "other"), "--out", str(tmp_path / "out")]) == 0

"""Checkpoint, resume and faults with real ranks and real signals.

The promise under test: a run stopped by its launcher's stop signal and relaunched with the same
command ends bit-identical to a run that was never interrupted, and its HDF5
file has every step exactly once; a killed rank or a killed job never hangs and
never loses flushed rows; a diverging run stops and keeps its last good checkpoint.
"""

import os
import signal
import time

import h5py
import numpy as np
import pytest
import torch
import yaml

from dsgd_mpi import checkpoint
from tests.mpi_util import (
    STOP_SIGNAL,
    finish,
    kill_job,
    launcher_kind,
    rank_pids,
    run_ranks,
    start_ranks,
)

N = 4
STEPS = 32  # 4 epochs of 8 steps
BASE = {
    "run": {"name": "r", "epochs": 4, "seed": 5},
    "data": {"name": "synthetic", "synthetic_size": 512, "batch_size": 16},  # 8 steps/epoch
    "model": {"name": "mlp"},
    "optim": {"lr": 0.05, "base_batch": 64, "milestones": [0.5, 0.75]},
    "topology": {"name": "random_matching", "seed": 1},  # time-varying: the round counter matters
    "consensus": {
        "phases": [{"target": "constant", "reference": 2e-5, "max_rounds": 3, "until_epoch": None}]
    },  # fmt: skip
    "metrics": {"log_every": 1, "exact_every": 4, "eval_every": 1, "flush_every": 1},
    "checkpoint": {"every": 5},
}


def _config(tmp_path, name: str, **sections) -> str:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    cfg["run"]["out_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _rows(h5: str, group: str = "steps") -> dict[str, np.ndarray]:
    with h5py.File(h5, "r", locking=False) as f:
        return {k: v[:] for k, v in f[group].items()}


def _wait_for_rows(h5: str, rows: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"job ended early: {finish(proc, 10)}"
        try:
            if len(_rows(h5)["step"]) >= rows:
                return
        except (OSError, KeyError):
            pass  # not created yet, or being created
        time.sleep(0.1)
    kill_job(proc)
    raise AssertionError(f"{h5} never reached {rows} rows")


def _final_states(out_dir: str) -> list[dict]:
    directory = os.path.join(out_dir, "r", "ckpt")
    step = checkpoint.latest_common(checkpoint.steps_on_disk(directory, r) for r in range(N))
    return [checkpoint.load(directory, step, r) for r in range(N)]


@pytest.mark.mpi
def test_stop_signal_then_relaunch_ends_bit_identical_with_every_row_once(tmp_path):
    """The launcher's stop signal (SIGTERM to MPICH's mpiexec, SIGUSR1 to Open MPI's mpirun:
    tests/mpi_util.STOP_SIGNAL) reaches every rank; the run checkpoints and exits 3."""
    kind = launcher_kind()
    if kind not in STOP_SIGNAL:
        pytest.skip(f"no stop signal known for this launcher ({kind})")
    sig = STOP_SIGNAL[kind]
    whole = _config(tmp_path, "whole")
    run_ranks(N, ["-m", "dsgd_mpi.run", whole], timeout=240).check_returncode()

    cut = _config(tmp_path, "cut")
    h5 = str(tmp_path / "cut" / "r.h5")
    proc = start_ranks(N, ["-m", "dsgd_mpi.run", cut])
    _wait_for_rows(h5, 7, proc)
    proc.send_signal(sig)  # to the launcher, which forwards it to every rank
    stopped = finish(proc, 120)
    assert stopped.returncode == 3, stopped.stderr
    said = f"stopped by {sig.name} at step "
    assert said in stopped.stdout
    stop_step = int(stopped.stdout.split(said)[1].split(":")[0])
    assert 7 <= stop_step < STEPS, "the run must really have been cut short"

    resumed = run_ranks(N, ["-m", "dsgd_mpi.run", cut], timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"ckpt/step{stop_step:09d}" in resumed.stdout

    for a, b in zip(
        _final_states(str(tmp_path / "whole")), _final_states(str(tmp_path / "cut")), strict=True
    ):
        assert a["step"] == b["step"] == STEPS
        ra, rb = a["replica"], b["replica"]
        for key in ra["model"]:
            assert torch.equal(ra["model"][key], rb["model"][key]), key
        assert torch.equal(ra["optimizer"]["momentum_buffer"], rb["optimizer"]["momentum_buffer"])
        assert a["gossip_t"] == b["gossip_t"] > STEPS  # several rounds per step were needed

    ref, got = _rows(str(tmp_path / "whole" / "r.h5")), _rows(h5)
    np.testing.assert_array_equal(got["step"], np.arange(1, STEPS + 1))  # no gap, no duplicate
    for field in ("train_loss", "consensus_estimate", "gossip_rounds", "lr", "phase"):
        np.testing.assert_array_equal(got[field], ref[field], err_msg=field)
    ref_eval, got_eval = _rows(str(tmp_path / "whole" / "r.h5"), "eval"), _rows(h5, "eval")
    np.testing.assert_array_equal(got_eval["step"], ref_eval["step"])
    np.testing.assert_array_equal(got_eval["test_acc"], ref_eval["test_acc"])

    # The same name with a different recipe must not continue this run's checkpoint.
    refused = run_ranks(N, ["-m", "dsgd_mpi.run", cut, "optim.lr=0.2"], timeout=240)
    assert refused.returncode == 2
    assert "checkpoint.dir" in refused.stderr and "optim.lr differs" in refused.stderr
    np.testing.assert_array_equal(_rows(h5)["step"], got["step"])  # the file was not touched


@pytest.mark.mpi
def test_sigusr1_to_the_launcher_stops_the_run_under_every_launcher(tmp_path):
    """SIGUSR1, the signal Slurm's --signal=B:USR1@N leads to, is forwarded to the ranks by
    MPICH's mpiexec and Open MPI's mpirun alike (srun: tests/test_slurm.py)."""
    kind = launcher_kind()
    if kind not in STOP_SIGNAL:
        pytest.skip(f"no stop protocol known for this launcher ({kind})")
    cfg = _config(tmp_path, "usr1", run={"epochs": 200}, checkpoint={"every": 0})
    proc = start_ranks(2, ["-m", "dsgd_mpi.run", cfg])
    _wait_for_rows(str(tmp_path / "usr1" / "r.h5"), 2, proc)
    proc.send_signal(signal.SIGUSR1)
    stopped = finish(proc, 120)
    assert stopped.returncode == 3, stopped.stdout + stopped.stderr
    assert "stopped by SIGUSR1 at step" in stopped.stdout


@pytest.mark.mpi
def test_a_killed_rank_ends_the_job_nonzero_within_seconds(tmp_path):
    cfg = _config(tmp_path, "dead", run={"epochs": 200})
    proc = start_ranks(3, ["-m", "dsgd_mpi.run", cfg])
    _wait_for_rows(str(tmp_path / "dead" / "r.h5"), 3, proc)
    os.kill(rank_pids(proc)[2], signal.SIGKILL)
    t0 = time.monotonic()
    done = finish(proc, 60)  # a hang fails here
    assert done.returncode != 0
    assert time.monotonic() - t0 < 30


@pytest.mark.mpi
def test_divergence_stops_the_job_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr warms up to 1e6 over the first epoch: fine for a few steps, then it explodes.
    cfg = _config(tmp_path, "nan", optim={"lr": 1e6, "warmup_epochs": 1.0},
                  checkpoint={"every": 2}, consensus={"phases": [{"target": "none"}]})  # fmt: skip
    done = run_ranks(2, ["-m", "dsgd_mpi.run", cfg], timeout=240)
    assert done.returncode != 0
    assert "diverged" in done.stderr or "non-finite" in done.stderr
    directory = str(tmp_path / "nan" / "r" / "ckpt")
    steps = checkpoint.steps_on_disk(directory, 0)
    assert steps, "a checkpoint was written before the blow-up"
    # The message names the newest checkpoint on disk, the whole path and nothing after it.
    named = done.stderr.split("Last good checkpoint: ", 1)[1].split()[0].rstrip(".")
    assert named == checkpoint.step_dir(directory, steps[-1]), named
    for rank in range(2):
        state = checkpoint.load(directory, steps[-1], rank)
        assert all(torch.isfinite(t).all() for t in state["replica"]["model"].values())

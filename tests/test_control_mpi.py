"""Consensus control on real ranks: targets are met, rounds are spent, references read."""

import h5py
import numpy as np
import pytest

from tests.mpi_util import check_ranks, run_ranks
from tests.test_run_mpi import _config

EVERY_STEP = {"log_every": 1, "exact_every": 1, "eval_every": 1, "flush_every": 4}


def _steps(tmp_path, name):
    with h5py.File(tmp_path / "runs" / f"{name}.h5", "r", locking=False) as f:
        return {k: f["steps"][k][:] for k in f["steps"]}


def _run(tmp_path, name, phases, n=4, topology="ring", extra=()):
    cfg = _config(tmp_path, metrics=EVERY_STEP, run={"epochs": 1, "name": name},
                  consensus={"phases": phases}, topology={"name": topology})  # fmt: skip
    check_ranks(n, ["-m", "dsgd_mpi.run", cfg, *extra], timeout=240)
    return _steps(tmp_path, name)


@pytest.mark.mpi
def test_constant_target_is_met_or_the_round_budget_spent_and_tighter_costs_more(tmp_path):
    rounds = {}
    for name, reference in (("loose", 1e-2), ("tight", 1e-5)):
        s = _run(tmp_path, name, [{"target": "constant", "reference": reference, "max_rounds": 12}])
        ok = (s["consensus_estimate"] <= s["target"]) | (s["gossip_rounds"] == 12)
        assert ok.all(), f"{name}: a step ended above target with rounds to spare"
        assert (s["target"] == reference).all()
        rounds[name] = s["gossip_rounds"].sum()
    assert rounds["tight"] > rounds["loose"]


@pytest.mark.mpi
def test_exact_phase_leaves_no_consensus_distance(tmp_path):
    s = _run(tmp_path, "exact", [{"target": "exact"}])
    assert (s["consensus_exact"] == 0).all()
    assert (s["gossip_rounds"] == 1).all()


@pytest.mark.mpi
def test_adaptive_target_follows_lr_squared_times_gradient_norm(tmp_path):
    s = _run(tmp_path, "adaptive", [{"target": "adaptive", "factor": 0.5, "max_rounds": 8}])
    assert np.isfinite(s["target"]).all() and (s["target"] > 0).all()
    ok = (s["consensus_estimate"] <= s["target"]) | (s["gossip_rounds"] == 8)
    assert ok.all()


@pytest.mark.mpi
def test_reference_run_target_reads_the_phase_maximum_of_a_real_run(tmp_path):
    ref = _run(tmp_path, "reference", [{"target": "none"}])
    expected = np.nanmax(ref["consensus_estimate"])  # the controlled quantity
    ref_path = str(tmp_path / "runs" / "reference.h5")
    phase = {"target": "constant", "factor": 0.25, "reference_run": ref_path, "max_rounds": 6}
    s = _run(tmp_path, "controlled", [phase])
    np.testing.assert_allclose(s["target"], 0.25 * expected)
    assert s["gossip_rounds"].max() > 1  # a quarter of the uncontrolled peak needs extra rounds

    # The same reference for another world size is refused before training.
    cfg = _config(tmp_path, run={"epochs": 1, "name": "wrong_n"}, consensus={"phases": [
        {"target": "constant", "factor": 0.25, "reference_run": ref_path}]})  # fmt: skip
    done = run_ranks(2, ["-m", "dsgd_mpi.run", cfg], timeout=120)
    assert done.returncode == 2
    assert "config error: consensus.phases.0.reference_run" in done.stderr
    assert "world_size" in done.stderr


@pytest.mark.mpi
def test_reference_file_without_the_fields_is_refused(tmp_path):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f.create_group("steps")
    cfg = _config(tmp_path, consensus={"phases": [
        {"target": "constant", "factor": 0.5, "reference_run": str(bad)}]})  # fmt: skip
    done = run_ranks(2, ["-m", "dsgd_mpi.run", cfg], timeout=120)
    assert done.returncode == 2 and "consensus.phases.0.reference_run" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.mpi
def test_local_steps_communicate_every_h_steps(tmp_path):
    s = _run(tmp_path, "local", [{"target": "none"}], n=2, extra=["gossip.local_steps=3"])
    communicated = s["gossip_rounds"] > 0
    np.testing.assert_array_equal(communicated, s["step"] % 3 == 0)
    assert (s["bytes_sent"][~communicated] == 0).all()

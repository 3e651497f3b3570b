"""The main job, launched on real ranks: end to end, config errors, invariants.

The training runs are made once for the session by tests/shared_runs.py (one
4-rank job); the tests here open their files.
"""

import h5py
import numpy as np
import pytest
import yaml

from dsgd_mpi.metrics import EVAL_FIELDS, STEP_FIELDS
from tests.mpi_util import check_ranks, run_ranks
from tests.shared_runs import TINY


def _config(tmp_path, **sections) -> str:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    cfg["run"]["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.mpi
def test_end_to_end_synthetic_run_writes_every_design_field(shared):
    assert "done: averaged model test accuracy" in shared.log("tiny")
    with h5py.File(shared.h5("tiny"), "r", locking=False) as f:
        for attr in ("config", "version", "git", "mpi", "torch", "world_size", "topology",
                     "started", "finished", "backend"):  # fmt: skip
            assert attr in f.attrs, attr
        assert f.attrs["world_size"] == 4 and f.attrs["topology"] == "ring"
        assert f.attrs["backend"] == "mpi"
        assert set(STEP_FIELDS) <= set(f["steps"]) and set(EVAL_FIELDS) <= set(f["eval"])
        steps = f["steps"]["step"][:]
        assert len(steps) > 3 and (np.diff(steps) > 0).all()
        assert (f["steps"]["gossip_rounds"][:] == 1).all()  # target none: one round per step
        assert len(f["eval"]["step"]) == 2  # eval_every 1 epoch, 2 epochs
        exact = f["steps"]["consensus_exact"][:]
        bound = f["steps"]["consensus_bound"][:]
        measured = ~np.isnan(exact)
        assert measured.any() and (exact[measured] <= bound[measured] * (1 + 1e-6)).all()
        acc = f["eval"]["test_acc"][:]
        assert acc[-1] > 0.2  # twice chance: 10 learnable synthetic classes


@pytest.mark.mpi
def test_end_to_end_on_real_format_fashion_mnist_files(shared):
    evals = shared.table("fmnist", "eval")
    np.testing.assert_allclose(evals["epoch"], [0.5, 1.0])  # fractional eval_every
    assert evals["test_acc"][-1] > 0.2  # the files' classes are learnable


@pytest.mark.mpi
def test_same_seed_same_loss_trajectory(shared):
    a, b = (shared.table(name)["train_loss"] for name in ("seed_a", "seed_b"))
    assert len(a) > 3
    np.testing.assert_array_equal(a, b)


@pytest.mark.mpi
def test_step_invariants_and_instruments_against_numpy(tmp_path):
    """C-SGD steps, gossip at lr 0, every logged distance recomputed from the gathered
    parameters, C-SGD = single-model SGD in both orders, avg-SAM's reduce-scatter
    (tests/mpi/train_invariants.py)."""
    modes = ("complete", "ring_lr0", "distances", "csgd", "avg_sam")
    out = check_ranks(4, ["tests/mpi/train_invariants.py", ",".join(modes), _config(tmp_path),
                          str(tmp_path / "instruments")], timeout=300)  # fmt: skip
    for mode in modes:
        assert f"ok {mode}" in out, out


@pytest.mark.mpi
def test_bad_config_exits_2_naming_the_key_before_training(tmp_path):
    # One launch: the exit path on every rank. Which keys are refused, and how, is
    # checked without MPI in test_config.py (world-size checks included).
    done = run_ranks(3, ["-m", "dsgd_mpi.run", _config(tmp_path), "optim.lr=-0.1"], timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "config error: optim.lr" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.mpi
def test_missing_data_files_end_the_job_naming_rank_and_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()  # the directory exists, so config validation passes; the files do not
    cfg = _config(tmp_path, data={"name": "fashion_mnist", "root": str(empty)})
    done = run_ranks(3, ["-m", "dsgd_mpi.run", cfg], timeout=120)
    assert done.returncode != 0
    assert "[rank " in done.stderr and "train-images-idx3-ubyte" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.mpi
def test_pretrained_weights_without_network_are_refused_on_every_rank(tmp_path):
    """model.pretrained fetches the weights once before training; where the download cannot
    happen (here: an empty weight cache and a proxy that refuses every connection), every
    rank exits 2 with one message naming the key, before any data or model is built."""
    cfg = _config(tmp_path, model={"name": "resnet18", "pretrained": True},
                  data={"name": "synthetic", "synthetic_size": 64, "batch_size": 8})  # fmt: skip
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}  # fmt: skip
    done = run_ranks(2, ["-m", "dsgd_mpi.run", cfg], timeout=120, env=offline)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("config error: model.pretrained: cannot download") == 1
    assert "model.pretrained=false" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()

"""The main job, launched on real ranks: end to end, config errors, invariants."""

import gzip
import struct

import h5py
import numpy as np
import pytest
import yaml

from dsgd_mpi.metrics import EVAL_FIELDS, STEP_FIELDS
from tests.mpi_util import check_ranks, run_ranks

TINY = {
    "run": {"name": "tiny", "epochs": 2, "seed": 3},
    "data": {"name": "synthetic", "synthetic_size": 512, "batch_size": 16},
    "model": {"name": "mlp"},
    "optim": {"lr": 0.05, "base_batch": 64, "milestones": [0.5, 0.75]},
    "metrics": {"log_every": 2, "exact_every": 2, "eval_every": 1, "flush_every": 3},
}


def _config(tmp_path, **sections) -> str:
    cfg = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value)
    cfg["run"]["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _idx(path, array: np.ndarray) -> None:
    """Write the standard IDX format (the Fashion-MNIST files) gzipped."""
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.mpi
def test_end_to_end_synthetic_run_writes_every_design_field(tmp_path):
    out = check_ranks(4, ["-m", "dsgd_mpi.run", _config(tmp_path)], timeout=240)
    assert "done: averaged model test accuracy" in out
    with h5py.File(tmp_path / "runs" / "tiny.h5", "r", locking=False) as f:
        for attr in ("config", "version", "git", "mpi", "torch", "world_size", "topology",
                     "started", "finished"):  # fmt: skip
            assert attr in f.attrs, attr
        assert f.attrs["world_size"] == 4 and f.attrs["topology"] == "ring"
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
def test_end_to_end_on_real_format_fashion_mnist_files(tmp_path):
    root = tmp_path / "fmnist"
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 64)):
        labels = rng.integers(0, 10, n)
        images = (labels[:, None, None] * 25 + rng.integers(0, 20, (n, 28, 28))).clip(0, 255)
        _idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    cfg = _config(
        tmp_path, data={"name": "fashion_mnist", "root": str(root)}, model={"name": "small_cnn"}
    )
    check_ranks(4, ["-m", "dsgd_mpi.run", cfg, "run.epochs=1", "metrics.eval_every=0.5"],
                timeout=240)  # fmt: skip
    with h5py.File(tmp_path / "runs" / "tiny.h5", "r", locking=False) as f:
        np.testing.assert_allclose(f["eval"]["epoch"][:], [0.5, 1.0])  # fractional eval_every


@pytest.mark.mpi
def test_same_seed_same_loss_trajectory(tmp_path):
    cfg = _config(tmp_path)
    losses = []
    for name in ("a", "b"):
        check_ranks(2, ["-m", "dsgd_mpi.run", cfg, f"run.name={name}", "run.epochs=1"], timeout=180)
        with h5py.File(tmp_path / "runs" / f"{name}.h5", "r", locking=False) as f:
            losses.append(f["steps"]["train_loss"][:])
    assert len(losses[0]) > 3
    np.testing.assert_array_equal(losses[0], losses[1])


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["complete", "ring_lr0"])
def test_step_invariants(tmp_path, mode):
    check_ranks(4, ["tests/mpi/train_invariants.py", mode, _config(tmp_path)], timeout=180)


@pytest.mark.mpi
@pytest.mark.parametrize(
    "overrides, key",
    [  # the other bad keys are checked without MPI in test_config.py
        (["optim.lr=-0.1"], "optim.lr"),
        (["topology.name=bipartite_exponential"], "topology.name"),  # 3 ranks: odd
        (["data.name=fashion_mnist", "data.root=/nonexistent"], "data.root"),
    ],
)
def test_bad_config_exits_2_naming_the_key_before_training(tmp_path, overrides, key):
    done = run_ranks(3, ["-m", "dsgd_mpi.run", _config(tmp_path), *overrides], timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"config error: {key}" in done.stderr
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

"""The same checks with CUDA tensors: run on a machine with GPUs (`make gpu-check`).

Skipped where torch sees no GPU (the development VM has none: these have not run
there). Each test launches real ranks; ranks bind to GPU local_rank % gpus. Every
GPU result is compared with numpy's or with the same run on the CPU
(``CUDA_VISIBLE_DEVICES=""``); the gossip runs on 4 ranks, so a ring round has
two exchanges.
"""

import json

import h5py
import numpy as np
import pytest
import torch
import yaml

from dsgd_mpi.comm import cuda_aware
from tests.mpi_util import check_ranks, run_ranks

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def test_gossip_on_device_buffers_staged_equals_numpy():
    out = check_ranks(4, ["tests/mpi/gossip_vs_numpy.py", "4", "300000", "65536", "300000",
                          "staged", "cuda"], timeout=280)  # fmt: skip
    assert "ring" in out and "exponential" in out


@pytest.mark.skipif(not cuda_aware()[0], reason="this MPI is not CUDA-aware")
def test_gossip_on_device_buffers_direct_equals_numpy_and_staged():
    out = check_ranks(4, ["tests/mpi/gossip_vs_numpy.py", "4", "300000", "65536", "300000",
                          "direct,staged", "cuda"], timeout=280)  # fmt: skip
    assert "ring" in out and "exponential" in out


def _rows(path) -> tuple[dict, dict]:
    with h5py.File(path, "r", locking=False) as f:
        return ({k: v[()] for k, v in f["steps"].items()},
                {k: v[()] for k, v in f["eval"].items() if v.ndim == 1})  # fmt: skip


def test_training_on_gpu_equals_the_same_run_on_the_cpu(tmp_path):
    """4 ranks on a ring with the exact measure and a binding target: the GPU run's losses,
    rounds, distances and evaluation against the CPU run of the same config. Kernels sum
    in another order on the GPU, so values agree to float tolerance that 30 steps at a
    small lr keep small, not bit for bit."""
    for device in ("gpu", "cpu"):
        cfg = {
            "run": {"name": device, "steps": 30, "seed": 0, "out_dir": str(tmp_path)},
            "data": {"name": "synthetic", "synthetic_size": 4096, "batch_size": 32},
            "model": {"name": "small_cnn"},
            "optim": {"lr": 0.02, "momentum": 0.0},
            "topology": {"name": "ring"},
            "consensus": {"measure": "exact",
                          "phases": [{"target": "constant", "reference": 1e-5, "max_rounds": 4}]},
            "metrics": {"log_every": 5, "exact_every": 5, "eval_every": 100, "flush_every": 10},
        }  # fmt: skip
        path = tmp_path / f"{device}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else None
        done = run_ranks(4, ["-m", "dsgd_mpi.run", str(path)], timeout=280, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert ("cuda" in done.stdout) == (device == "gpu"), done.stdout
    (gpu, gpu_eval), (cpu, cpu_eval) = _rows(tmp_path / "gpu.h5"), _rows(tmp_path / "cpu.h5")
    np.testing.assert_array_equal(gpu["step"], cpu["step"])
    np.testing.assert_allclose(gpu["train_loss"], cpu["train_loss"], rtol=1e-3)
    np.testing.assert_allclose(gpu["consensus_exact"], cpu["consensus_exact"], rtol=1e-2)
    assert (gpu["gossip_rounds"] == cpu["gossip_rounds"]).mean() >= 0.8  # a target near a value
    np.testing.assert_allclose(gpu_eval["test_acc"], cpu_eval["test_acc"], atol=0.01)
    np.testing.assert_allclose(gpu_eval["ensemble_acc"], cpu_eval["ensemble_acc"], atol=0.01)


def test_training_on_gpu_with_evaluation_and_exact_distance(tmp_path):
    cfg = {
        "run": {"name": "gpu", "steps": 200, "seed": 0, "out_dir": str(tmp_path)},
        "data": {"name": "synthetic", "synthetic_size": 8192, "batch_size": 32},
        "model": {"name": "resnet20"},
        "topology": {"name": "ring"},
        "consensus": {"measure": "exact",
                      "phases": [{"target": "constant", "reference": 1e-3, "max_rounds": 5}]},
        "metrics": {"log_every": 10, "exact_every": 10, "eval_every": 0.5, "flush_every": 50},
    }  # fmt: skip
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = check_ranks(2, ["-m", "dsgd_mpi.run", str(path)], timeout=280)
    assert "cuda" in out and "device buffers:" in out
    with h5py.File(tmp_path / "gpu.h5", "r", locking=False) as f:
        exact = f["steps"]["consensus_exact"][:]
        assert np.isfinite(exact).all() and len(exact) == 20
        assert len(f["eval"]["test_acc"]) >= 2


def test_step_time_against_a_step_without_communication():
    result = json.loads(check_ranks(2, ["-m", "dsgd_mpi.bench", "step", "--model", "resnet20",
                                        "--batch", "128", "--json"], timeout=280))  # fmt: skip
    print(json.dumps(result, indent=1))
    assert result["update_s"] > 0 and result["dsgd_step_s"] > 0

"""The same checks with CUDA tensors: run on a machine with GPUs (`make gpu-check`).

Skipped where torch sees no GPU (the development VM has none: these have not run
there). Each test launches real ranks; ranks bind to GPU local_rank % gpus.
"""

import json

import h5py
import numpy as np
import pytest
import torch
import yaml

from dsgd_mpi.comm import cuda_aware
from tests.mpi_util import check_ranks

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def test_gossip_on_device_buffers_staged_equals_numpy():
    out = check_ranks(2, ["tests/mpi/gossip_vs_numpy.py", "4", "300000", "65536", "300000",
                          "staged", "cuda"], timeout=280)  # fmt: skip
    assert "ring" in out


@pytest.mark.skipif(not cuda_aware()[0], reason="this MPI is not CUDA-aware")
def test_gossip_on_device_buffers_direct_equals_numpy_and_staged():
    out = check_ranks(2, ["tests/mpi/gossip_vs_numpy.py", "4", "300000", "65536", "300000",
                          "direct,staged", "cuda"], timeout=280)  # fmt: skip
    assert "ring" in out


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

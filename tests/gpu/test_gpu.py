"""The same computations with CUDA tensors, each compared with its CPU or numpy result:
run on a machine with GPUs (`make gpu-check`).

Skipped where torch sees no GPU (the development VM has none: these have not run
there). Each test launches real ranks (3 or 4: graphs with two or more exchanges
per round); ranks share GPUs when there are fewer GPUs than ranks.
"""

import json

import h5py
import numpy as np
import pytest
import torch
import yaml

from dsgd_mpi.comm import cuda_aware
from tests.mpi_util import check_ranks, finish, start_ranks

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
GOSSIP = "tests/mpi/gossip_vs_numpy.py"
#: 4 rounds of 300,000 floats in chunks of 65,536 (the staged port reduces in such chunks too).
ARGS = ["4", "300000", "65536", "300000"]


def test_gossip_on_device_buffers_staged_equals_numpy():
    """Every topology for 4 ranks (ring: 2 exchanges a round; exponential: 3; complete:
    the chunked, overlapped staged average), against numpy in float64."""
    out = check_ranks(4, [GOSSIP, *ARGS, "staged", "cuda"], timeout=280)
    assert "checked 4 ring" in out and "complete" in out and "exponential" in out


@pytest.mark.skipif(not cuda_aware()[0], reason="this MPI is not CUDA-aware")
def test_gossip_on_device_buffers_direct_equals_numpy_and_staged():
    out = check_ranks(4, [GOSSIP, *ARGS, "direct,staged", "cuda"], timeout=280)
    assert "checked 4 ring" in out


def test_collectives_on_device_tensors_equal_the_host_ones():
    out = check_ranks(3, ["tests/mpi/port_staging.py", "cuda"], timeout=280)
    assert "port ok 3" in out and "device ports ok" in out


def test_each_rank_gets_its_own_gpu_from_its_local_rank():
    """Chosen before MPI_Init from the launcher's local rank, and trained on."""
    n = max(2, min(4, torch.cuda.device_count()))
    lines = [ln.split() for ln in check_ranks(n, ["tests/mpi/devices.py"], timeout=280)
             .splitlines() if ln.startswith("device ")]  # fmt: skip
    assert len(lines) == n
    gpus = torch.cuda.device_count()
    for _, _rank, local, seen, current, trains_on in lines:
        assert int(seen) == gpus and int(current) == int(local) % gpus, lines
        assert trains_on == f"cuda:{int(local) % gpus}", lines
    if n <= gpus:
        assert len({ln[4] for ln in lines}) == n, f"two ranks on one GPU: {lines}"


def _run(tmp_path, name: str, env: dict | None = None) -> dict:
    cfg = {
        "run": {"name": name, "steps": 40, "seed": 0, "out_dir": str(tmp_path)},
        "optim": {"lr": 0.5},
        "data": {"name": "synthetic", "synthetic_size": 2048, "batch_size": 32,
                 "augment": False},
        "model": {"name": "mlp"},
        "topology": {"name": "ring"},
        "consensus": {"measure": "exact",
                      # out of reach: 3 rounds every step on both devices, whatever rounding
                      "phases": [{"target": "constant", "reference": 1e-20, "max_rounds": 3}]},
        "metrics": {"log_every": 1, "exact_every": 5, "eval_every": 0.5, "flush_every": 10},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    done = finish(start_ranks(4, ["-m", "dsgd_mpi.run", str(path)], env=env), 280)
    assert done.returncode == 0, done.stdout + done.stderr
    with h5py.File(tmp_path / f"{name}.h5", "r", locking=False) as f:
        return {g: {k: v[()] for k, v in f[g].items()} for g in ("steps", "eval")} | {
            "log": done.stdout}


def test_training_on_gpus_follows_the_cpu_run(tmp_path):
    """The same 4-rank run (a ring: not exact after a round; a controlled phase of 3 rounds a
    step, the exact measure, evaluation) on the GPUs and on the CPU (CUDA_VISIBLE_DEVICES
    empty): every logged value agrees to float tolerance."""
    gpu = _run(tmp_path, "gpu")
    cpu = _run(tmp_path, "cpu", env={"CUDA_VISIBLE_DEVICES": ""})
    assert "cuda" in gpu["log"] and "device buffers:" in gpu["log"] and "cpu" in cpu["log"]
    steps_g, steps_c = gpu["steps"], cpu["steps"]
    np.testing.assert_array_equal(steps_g["step"], steps_c["step"])
    np.testing.assert_array_equal(steps_g["gossip_rounds"], steps_c["gossip_rounds"])
    assert (steps_c["gossip_rounds"] == 3).all()
    for field in ("train_loss", "train_acc", "consensus_estimate", "consensus_measured", "lr"):
        np.testing.assert_allclose(steps_g[field], steps_c[field], rtol=1e-3, atol=1e-12,
                                   err_msg=field)  # fmt: skip
    exact = np.isfinite(steps_c["consensus_exact"])
    assert exact.sum() == 8 and (np.isfinite(steps_g["consensus_exact"]) == exact).all()
    np.testing.assert_allclose(steps_g["consensus_exact"][exact], steps_c["consensus_exact"][exact],
                               rtol=1e-3, atol=1e-9)  # fmt: skip
    for field in ("test_acc", "test_loss", "local_acc_mean", "ensemble_acc"):
        np.testing.assert_allclose(gpu["eval"][field], cpu["eval"][field], rtol=1e-3,
                                   atol=2e-3, err_msg=field)  # fmt: skip


def test_step_time_against_a_step_without_communication():
    """A performance figure (not a check): printed for the record."""
    result = json.loads(check_ranks(2, ["-m", "dsgd_mpi.bench", "step", "--model", "resnet20",
                                        "--batch", "128", "--json"], timeout=280))  # fmt: skip
    print(json.dumps(result, indent=1))
    assert result["update_s"] > 0 and result["dsgd_step_s"] > 0


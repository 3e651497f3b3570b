"""Launching where users launch: Slurm tasks, CPU sets, CUDA-aware MPIs, ranks that see
different files. The pure decisions without MPI; the guards on real ranks."""

import gzip
import struct

import h5py
import numpy as np
import pytest
import yaml

from dsgd_mpi import comm, launch
from tests.mpi_util import finish, run_ranks, start_mpmd

# ------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    "env, world, named",
    [
        ({"SLURM_STEP_NUM_TASKS": "16"}, 1, "SLURM_STEP_NUM_TASKS=16"),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, 1, "OMPI_COMM_WORLD_SIZE=4"),
        ({"PMI_SIZE": "8"}, 1, "PMI_SIZE=8"),
        ({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}, 1, "SLURM_NTASKS=4"),  # inside srun
    ],
)
def test_several_tasks_in_a_one_rank_world_is_refused(env, world, named):
    message = launch.launch_mismatch(env, world)
    assert message is not None and named in message
    for way_out in ("MPI=system", "srun --mpi=", "mpirun"):
        assert way_out in message


@pytest.mark.parametrize(
    "env, world",
    [
        ({"SLURM_STEP_NUM_TASKS": "4"}, 4),  # the launcher and MPI agree
        ({"PMI_SIZE": "1"}, 1),
        ({"SLURM_NTASKS": "16"}, 1),  # a batch script's own shell: not inside srun
        ({}, 1),
        ({"SLURM_STEP_NUM_TASKS": ""}, 1),
    ],
)
def test_consistent_launches_pass(env, world):
    assert launch.launch_mismatch(env, world) is None


def test_threads_respect_omp_num_threads_and_the_cpu_set():
    cpus8 = frozenset(range(8))
    assert launch.threads_for({"OMP_NUM_THREADS": "3"}, [cpus8, cpus8])[0] == 3
    # Slurm --cpus-per-task=8: each task has its own 8 CPUs, so all of them.
    disjoint = [cpus8, frozenset(range(8, 16)), frozenset(range(16, 24))]
    threads, why = launch.threads_for({}, disjoint)
    assert threads == 8 and "1 rank" in why
    # plain mpiexec: every rank sees the same 16 cores, 4 ranks share them
    shared = [frozenset(range(16))] * 4
    assert launch.threads_for({}, shared)[0] == 4
    assert launch.threads_for({}, [frozenset({0})] * 4)[0] == 1  # never 0


def test_oversubscribed_mpich_is_told_to_turn_off_its_spinning_collectives():
    two = frozenset({0, 1})
    mpich, ompi = "MPICH Version: 5.0.2", "Open MPI v5.0.5"
    hint = launch.oversubscribed_mpich_hint({}, mpich, [two] * 16)
    assert hint and "16 ranks share 2 CPUs" in hint and "MPIR_CVAR_DEVICE_COLLECTIVES=none" in hint
    assert launch.oversubscribed_mpich_hint({}, mpich, [two] * 2) is None  # a core each
    # Slurm tasks with their own CPUs do not share
    assert launch.oversubscribed_mpich_hint({}, mpich, [frozenset({i}) for i in range(8)]) is None
    assert launch.oversubscribed_mpich_hint({}, ompi, [two] * 16) is None  # not MPICH's switch
    chosen = {"MPIR_CVAR_DEVICE_COLLECTIVES": "all"}  # the user decided
    assert launch.oversubscribed_mpich_hint(chosen, mpich, [two] * 16) is None


def test_cuda_awareness_is_asked_of_the_library_and_explained():
    aware, reason = comm.cuda_aware({})
    # The PyPI MPICH answers through MPIX_Query_cuda_support: built without CUDA.
    assert aware is False and "MPIX_Query_cuda_support" in reason
    # an MPI that only says so through its environment
    assert comm.cuda_aware.__doc__ and "Cray" in comm.cuda_aware.__doc__


# -------------------------------------------------------------- real ranks

TINY = {
    "run": {"name": "tiny", "epochs": 1, "seed": 1},
    "data": {"name": "synthetic", "synthetic_size": 256, "batch_size": 16},
    "model": {"name": "mlp"},
    "metrics": {"log_every": 4, "eval_every": 1, "flush_every": 4},
}


def _write(tmp_path, cfg: dict) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.mpi
def test_singleton_fallback_exits_2_naming_what_the_launcher_said(tmp_path):
    cfg = {**TINY, "run": {**TINY["run"], "out_dir": str(tmp_path / "runs")}}
    done = run_ranks(1, ["-m", "dsgd_mpi.run", _write(tmp_path, cfg)], timeout=120,
                     env={"SLURM_STEP_NUM_TASKS": "4"})  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "launch error" in done.stderr and "SLURM_STEP_NUM_TASKS=4" in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


def _reference_file(path, world_size: int, cfg: dict) -> None:
    """An uncontrolled run of the same recipe, as reference_run needs it."""
    from dsgd_mpi.config import from_yaml, to_yaml

    with h5py.File(path, "w") as f:
        f.attrs["topology"], f.attrs["world_size"] = "ring", world_size
        f.attrs["config"] = to_yaml(from_yaml(yaml.safe_dump(cfg)))
        steps = f.create_group("steps")
        steps["epoch"] = np.linspace(0.1, 1.0, 10)
        steps["phase"] = np.zeros(10, dtype=np.int64)
        steps["step"] = np.arange(1, 11)
        steps["consensus_estimate"] = np.full(10, 1e-3)
        steps["consensus_estimate_max"] = np.full(10, 1e-3)  # the largest of every step


@pytest.mark.mpi
def test_a_file_only_rank_0_sees_is_validated_once_and_the_run_works(tmp_path):
    """Rank 1 cannot see the reference run (another node): only rank 0 checks files."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    phases = [{"target": "constant", "factor": 0.5, "reference_run": "ref.h5", "max_rounds": 3}]
    cfg = {**TINY, "run": {**TINY["run"], "out_dir": str(tmp_path / "runs")},
           "consensus": {"phases": phases}}  # fmt: skip
    _reference_file(tmp_path / "a" / "ref.h5", 2, {**cfg, "consensus": {}})
    path = _write(tmp_path, cfg)
    args = ["-m", "dsgd_mpi.run", path]
    done = finish(start_mpmd([(str(tmp_path / "a"), args), (str(tmp_path / "b"), args)]), 180)
    assert done.returncode == 0, done.stdout + done.stderr
    with h5py.File(tmp_path / "runs" / "tiny.h5", "r", locking=False) as f:
        assert (f["steps"]["target"][:] == 0.5**2 * 1e-3).all()  # factor 0.5 of the distance


def _idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.mpi
def test_an_error_on_one_rank_only_ends_the_job_with_2_not_a_hang(tmp_path):
    """Rank 1's node has no data where rank 0's has: rank 1 fails alone, mid-build."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    data = tmp_path / "a" / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 128), ("t10k", 32)):
        _idx(data / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    cfg = {**TINY, "run": {**TINY["run"], "out_dir": str(tmp_path / "runs")},
           "data": {"name": "fashion_mnist", "root": "data", "batch_size": 16}}  # fmt: skip
    args = ["-m", "dsgd_mpi.run", _write(tmp_path, cfg)]
    done = finish(start_mpmd([(str(tmp_path / "a"), args), (str(tmp_path / "b"), args)]), 120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "[rank 1]" in done.stderr and "train-images-idx3-ubyte" in done.stderr

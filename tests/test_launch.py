"""Launching where users launch: Slurm tasks, CPU sets, CUDA-aware MPIs, ranks that see
different files. The pure decisions without MPI; the guards on real ranks."""

import gzip
import os
import struct
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from dsgd_mpi import comm, launch
from tests.mpi_util import ROOT, finish, run_ranks, start_mpmd

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
    # The library's answer wins over the environment's switches.
    assert comm.cuda_aware({"MPICH_GPU_SUPPORT_ENABLED": "1"})[0] is False


@pytest.mark.parametrize(
    "env, aware, named",
    [
        ({"MPICH_GPU_SUPPORT_ENABLED": "1"}, True, "Cray MPICH"),
        ({"MV2_USE_CUDA": "1"}, True, "MVAPICH2-GDR"),
        ({"MPICH_GPU_SUPPORT_ENABLED": "0", "MV2_USE_CUDA": "0"}, False, "does not say"),
        ({}, False, "does not say"),
    ],
)
def test_cuda_awareness_of_an_mpi_that_only_says_so_in_its_environment(env, aware, named):
    """A library without either query function (libm stands in for such an MPI: a real
    library that has neither symbol) leaves the answer to the documented switches."""
    import ctypes
    import ctypes.util

    silent = ctypes.CDLL(ctypes.util.find_library("m"))
    assert not hasattr(silent, "MPIX_Query_cuda_support")
    assert not hasattr(silent, "MPIX_GPU_query_support")
    got, reason = comm.cuda_aware(env, lib=silent)
    assert got is aware and named in reason


# A real MPICH configure line with PMIx, and the PyPI wheel's (without).
MPICH_PMIX = "MPICH Version:      4.2.0\nMPICH configure:    --with-pmix=/usr --with-device=ch4:ofi"
WHEEL = "MPICH Version:      5.0.2\nMPICH configure:    --with-device=ch4:ucx,ofi --with-pm=hydra"
OPENMPI = "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4"


@pytest.mark.parametrize(
    "env, library, named",
    [
        ({"PMIX_NAMESPACE": "slurm.pmix.7.0", "PMIX_RANK": "0"}, WHEEL, "PMIx"),  # srun --mpi=pmix
        ({"PMIX_RANK": "3"}, WHEEL, "PMIX_RANK=3"),  # MPICH's PMI-1 client gives up on it too
        ({"PMIX_NAMESPACE": "x", "PMI_SIZE": "2"}, MPICH_PMIX, "both PMI-1/2"),
    ],
)
def test_a_launcher_whose_pmi_the_mpi_lacks_is_refused_before_mpi_init(env, library, named):
    message = launch.pmi_mismatch(env, library)
    assert message is not None and named in message
    assert "MPICH Version: " in message  # names the MPI it found
    for way_out in ("srun --mpi=pmi2", "mpiexec", "MPI=system"):
        assert way_out in message


@pytest.mark.parametrize(
    "env, library",
    [
        ({"PMI_FD": "9", "PMI_RANK": "0", "PMI_SIZE": "2"}, WHEEL),  # hydra, srun --mpi=pmi2
        ({}, WHEEL),  # a singleton
        ({"PMIX_NAMESPACE": "slurm.pmix.7.0", "PMIX_RANK": "0"}, MPICH_PMIX),
        ({"PMIX_NAMESPACE": "1972436993", "PMIX_RANK": "0"}, OPENMPI),  # Open MPI's mpirun
    ],
)
def test_launchers_the_mpi_speaks_pass(env, library):
    assert launch.pmi_mismatch(env, library) is None


def test_the_gpu_follows_the_launchers_local_rank():
    assert launch.local_rank({}) is None
    assert launch.local_rank({"SLURM_LOCALID": "3", "MPI_LOCALRANKID": "1"}) == 3  # srun first
    assert launch.local_rank({"MPI_LOCALRANKID": "1"}) == 1  # hydra
    assert launch.local_rank({"OMPI_COMM_WORLD_LOCAL_RANK": "2"}) == 2  # Open MPI
    assert launch.local_rank({"SLURM_LOCALID": ""}) is None
    assert launch.announced_rank({"SLURM_PROCID": "5"}) == 5
    assert launch.announced_rank({"PMIX_RANK": "0"}) == 0


SRUN_LIST = """MPI plugin types are...
	pmix
	none
	cray_shasta
	pmi2
specific pmix plugin versions available: pmix_v4
"""


def test_the_launcher_chosen_is_one_the_installed_mpi_speaks():
    plugins = launch.parse_mpi_list(SRUN_LIST)
    assert plugins == ["pmix", "none", "cray_shasta", "pmi2", "pmix_v4"]
    old = launch.parse_mpi_list("srun: MPI types are...\nsrun: none\nsrun: pmi2\n")
    assert old == ["none", "pmi2"]
    # The PyPI wheel: PMI-2 even where srun has pmix (the wheel has no PMIx).
    assert launch.choose_launcher(WHEEL, plugins)[0] == "srun --kill-on-bad-exit=1 --mpi=pmi2"
    assert launch.choose_launcher(MPICH_PMIX, plugins)[0].endswith("--mpi=pmix")
    assert launch.choose_launcher(OPENMPI, plugins)[0].endswith("--mpi=pmix")
    # Slurm without pmix: Open MPI's own mpirun, which reads the allocation.
    assert launch.choose_launcher(OPENMPI, ["none", "pmi2"])[0] == "mpirun"
    assert launch.choose_launcher(WHEEL, ["none"])[0] == "mpiexec"  # hydra starts through srun
    assert launch.choose_launcher(WHEEL, None)[0] == "mpiexec"  # no Slurm at all
    command, why = launch.choose_launcher(WHEEL, plugins)
    assert "MPICH Version: 5.0.2" in why and "pmi2" in why


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


def _silent_run(tmp_path, env: dict) -> "subprocess.CompletedProcess":
    """``python -m mpi4py -m dsgd_mpi.run`` without a launcher (a singleton), in ``env``."""
    cfg = {**TINY, "run": {**TINY["run"], "out_dir": str(tmp_path / "runs")}}
    return subprocess.run(
        [sys.executable, "-m", "mpi4py", "-m", "dsgd_mpi.run", _write(tmp_path, cfg)],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


def test_a_pmix_launch_of_the_wheel_exits_2_naming_pmix_and_the_launcher(tmp_path):
    """What srun --mpi=pmix does to the PyPI MPICH: refused before MPI_Init, in words.
    Without the check MPI_Init aborts (exit 16, "unsupported PMI version PMIx")."""
    if "MPICH" not in comm.library_version():
        pytest.skip(f"the PMIx check is for MPICH without PMIx; loaded: {comm.library_version()}")
    done = _silent_run(tmp_path, {"PMIX_NAMESPACE": "x"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "launch error" in done.stderr and "PMIx (PMIX_NAMESPACE=x)" in done.stderr
    assert "srun --mpi=pmi2" in done.stderr and "Internal MPI error" not in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.mpi
def test_two_kinds_of_pmi_at_once_exit_2_on_every_rank_not_in_mpi_init(tmp_path):
    """Hydra's PMI-1 variables plus a PMIx one: MPICH would abort in MPI_Init."""
    if "MPICH" not in comm.library_version():
        pytest.skip(f"MPICH's rule; loaded: {comm.library_version()}")
    cfg = {**TINY, "run": {**TINY["run"], "out_dir": str(tmp_path / "runs")}}
    done = run_ranks(2, ["-m", "dsgd_mpi.run", _write(tmp_path, cfg)], timeout=120,
                     env={"PMIX_NAMESPACE": "x"})  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("launch error") == 1  # said once, by the task announced as 0
    assert "both PMI-1/2" in done.stderr and "Auto-detection" not in done.stderr
    assert not (tmp_path / "runs").exists()


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

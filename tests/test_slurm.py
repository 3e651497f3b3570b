"""The Slurm templates under a real Slurm: sbatch, srun, signals, requeue, arrays, dependencies.

A one-machine cluster (tests/slurm_util.py: Debian's slurmctld, slurmd and munge,
installed with apt where missing) runs for this module. The templates are
submitted unchanged; the sbatch command line fits them to one node without GPUs
(2 tasks of 1 CPU, ``--gpus-per-node=0``), as options on the command line
override the ``#SBATCH`` headers for any user. Independent jobs are submitted
together at the start and run side by side; each test then waits for its own.
Skipped, with the reason, where there is no root or no apt.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from tests.shared_runs import fake_fashion_mnist
from tests.slurm_util import LocalSlurm, install, why_not

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
#: The templates' resources, fitted to one node of this machine.
FIT = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
       "--time=15"]  # fmt: skip
#: The quick start, short: 120 steps of 2 x 32 on small Fashion-MNIST files, a row per step.
QUICK = ["run.steps=120", "metrics.log_every=1", "metrics.flush_every=1", "metrics.eval_every=25",
         "checkpoint.every=20"]  # fmt: skip
TINY = {
    "run": {"epochs": 1, "seed": 4},
    "data": {"name": "synthetic", "synthetic_size": 128, "batch_size": 16},
    "model": {"name": "mlp"},
    "metrics": {"log_every": 1, "eval_every": 1, "flush_every": 2},
}
WAIT = 240  # seconds a job may take here before its test fails (it never hangs the suite)

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(2 * WAIT)]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = why_not()
    if reason:
        pytest.skip(f"local Slurm: {reason}")
    install()
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Jobs:
    """The jobs of this module, submitted at once from one submit directory."""

    def __init__(self, slurm: LocalSlurm, root: Path) -> None:
        self.slurm, self.root = slurm, root
        self.ids: dict[str, str] = {}
        fake_fashion_mnist(root / "fmnist")
        self.quick = [f"data.root={root / 'fmnist'}", f"run.out_dir={root / 'runs'}", *QUICK]
        (root / "logs").mkdir()

    def submit(self, name: str, template: str, args: list[str], options: list[str] = (),
               env: dict | None = None) -> str:  # fmt: skip
        cmd = ["sbatch", "--parsable", *FIT, f"--job-name={name}",
               f"--output={self.root / 'logs' / name}-%j.out", *options,
               str(JOBS / template), *args]  # fmt: skip
        run_env = {"DSGD_VENV": sys.prefix, "OMP_NUM_THREADS": "1",
                   "MPIR_CVAR_DEVICE_COLLECTIVES": "none", **(env or {})}  # fmt: skip
        done = self.slurm.run(cmd, cwd=self.root, env=run_env)
        assert done.returncode == 0, f"{cmd}\n{done.stdout}{done.stderr}"
        self.ids[name] = done.stdout.strip().split(";")[0]
        return self.ids[name]

    def wait(self, name: str, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")) -> dict:
        """The job's record once it has ended (or reached a state in ``done``)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            job = self.slurm.job(self.ids[name])
            if job.get("JobState") in done:
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {name} still {job.get('JobState')} after {WAIT}s\n"
                             f"{self.log(name)}\n{self.slurm.logs()}")  # fmt: skip

    def log(self, name: str) -> str:
        return "\n".join(p.read_text() for p in sorted((self.root / "logs").glob(f"{name}-*")))

    def config(self, name: str, **sections) -> str:
        cfg = yaml.safe_load(yaml.safe_dump(TINY))
        for key, value in sections.items():
            cfg.setdefault(key, {}).update(value)
        cfg["run"].update(name=name, out_dir=str(self.root / "runs"))
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory):
    """Every job that does not wait for another, submitted together."""
    j = Jobs(slurm, tmp_path_factory.mktemp("submit"))
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    j.submit("single", "single_node.sbatch", [quickstart, "run.name=qs", *j.quick])
    j.submit("requeue", "requeue.sbatch", [quickstart, "run.name=rq", *j.quick])
    j.submit("bad", "single_node.sbatch", [quickstart, *j.quick, "optim.lr=-1"])
    none = j.config("none")
    j.submit("none", "single_node.sbatch", [none], env={"LAUNCHER": "srun --mpi=none"})
    if "pmix" in (slurm.run(["srun", "--mpi=list"]).stdout + "").split():
        j.submit("pmix", "single_node.sbatch", [j.config("pmix")],
                 env={"LAUNCHER": "srun --mpi=pmix"})  # fmt: skip
    # The sweep's first part; the second waits for it (test_sweep_...).
    part1 = j.root / "part1.txt"
    part1.write_text("# part 1: two runs\n\n" + "".join(
        f"{j.config(f'p1_{k}', run={'seed': k})} run.name=p1_{k}\n" for k in (1, 2)))
    j.part1 = part1
    count = _array_size(part1)
    j.submit("part1", "sweep_array.sbatch", [], [f"--array=1-{count}"], env={"SWEEP": str(part1)})
    return j


def _array_size(sweep: Path) -> int:
    """The --array size, by the command jobs/README.md gives for it."""
    out = subprocess.run(["bash", "-c", f"grep -cvE '^[[:space:]]*(#|$)' {sweep}"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout)


def _rows(h5: Path, group: str = "steps") -> dict[str, np.ndarray]:
    with h5py.File(h5, "r", locking=False) as f:
        return {k: v[()] for k, v in f[group].items()}


def test_requeue_checkpoints_on_usr1_requeues_and_resumes_bit_identical(jobs, slurm):
    """The time-limit warning (--signal=B:USR1@N in the template; here scancel --batch
    --signal=USR1) reaches the ranks through the batch shell and srun: checkpoint, exit 3,
    requeue, resume; every row equals the uninterrupted quick start's (job "single").
    First in the module: the signal must come while the job runs."""
    h5 = jobs.root / "runs" / "rq.h5"
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            if len(_rows(h5)["step"]) >= 3:
                break
        except (OSError, KeyError):
            pass
        state = jobs.slurm.job(jobs.ids["requeue"]).get("JobState")
        assert state not in ("COMPLETED", "FAILED", "CANCELLED"), jobs.log("requeue")
        time.sleep(0.2)
    sent = slurm.run(["scancel", "--batch", "--signal=USR1", jobs.ids["requeue"]])
    assert sent.returncode == 0, sent.stderr
    # Slurm holds a requeued batch job for 120 s before it may start again. The test lets it
    # start once it is pending and the first run's steps are gone: a step of the new run
    # with the same id (JOB.0) started while the old one's slurmstepd was still tearing
    # down lost its PMI-2 socket to that teardown (measured: "failed to send temp kvs").
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        job = jobs.slurm.job(jobs.ids["requeue"])
        old_steps = _step_daemons(jobs.ids["requeue"])
        if job.get("Restarts") == "1" and job.get("JobState") == "PENDING" and not old_steps:
            slurm.run(["scontrol", "update", f"jobid={jobs.ids['requeue']}", "starttime=now"])
            break
        assert job.get("JobState") != "COMPLETED", "the run ended before the signal\n" + (
            jobs.log("requeue"))  # fmt: skip
        time.sleep(0.2)
    job = jobs.wait("requeue")
    log = jobs.log("requeue")
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "stopped by SIGUSR1 at step" in log and "step exited with status 3" in log
    stop = int(re.search(r"stopped by SIGUSR1 at step (\d+)", log)[1])
    assert 3 <= stop < 120 and f"resumed from {jobs.root / 'runs' / 'rq' / 'ckpt'}" in log

    jobs.wait("single")
    ref, got = _rows(jobs.root / "runs" / "qs.h5"), _rows(h5)
    assert set(ref) == set(got)
    for field in ref:
        if not field.startswith("time_"):  # clocks differ; everything computed is equal
            np.testing.assert_array_equal(got[field], ref[field], err_msg=field)
    ref_eval, got_eval = _rows(jobs.root / "runs" / "qs.h5", "eval"), _rows(h5, "eval")
    for field in ("step", "test_acc", "test_loss", "ensemble_acc", "local_acc_min"):
        np.testing.assert_array_equal(got_eval[field], ref_eval[field], err_msg=field)


def test_single_node_trains_the_quickstart_and_slurm_records_exit_0(jobs):
    job = jobs.wait("single")
    log = jobs.log("single")
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert "launcher: srun --kill-on-bad-exit=1 --mpi=" in log  # chosen by the helper
    assert "dsgd_mpi: 2 ranks, ring, small_cnn" in log and "done: averaged model" in log
    rows = _rows(jobs.root / "runs" / "qs.h5")
    np.testing.assert_array_equal(rows["step"], np.arange(1, 121))
    with h5py.File(jobs.root / "runs" / "qs.h5", "r", locking=False) as f:
        assert "finished" in f.attrs and f.attrs["world_size"] == 2
        assert len(f["eval"]["step"]) >= 2


def test_a_config_error_exits_2_and_slurm_shows_exit_code_2(jobs):
    job = jobs.wait("bad")
    log = jobs.log("bad")
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), log
    assert "config error: optim.lr" in log and "MPI_Abort" not in log


def test_srun_without_pmi_exits_2_and_writes_nothing(jobs):
    """srun --mpi=none: two 1-rank worlds; the launch guard refuses on both tasks."""
    job = jobs.wait("none")
    log = jobs.log("none")
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), log
    assert "launch error" in log and "SLURM_STEP_NUM_TASKS=2" in log
    assert not (jobs.root / "runs" / "none.h5").exists()


def test_srun_with_pmix_is_refused_before_mpi_init_by_an_mpi_without_it(jobs, slurm):
    if "pmix" not in jobs.ids:
        pytest.skip("this Slurm has no pmix plugin")
    if "MPICH" not in _installed_mpi():
        pytest.skip("the refusal is for an MPI without PMIx (the PyPI MPICH)")
    job = jobs.wait("pmix")
    log = jobs.log("pmix")
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), log
    assert "launch error" in log and "PMIx" in log and "srun --mpi=pmi2" in log
    assert "unsupported PMI version" not in log  # MPI_Init never ran
    assert not (jobs.root / "runs" / "pmix.h5").exists()


def _step_daemons(job_id: str) -> list[int]:
    """Pids of the slurmstepd processes still serving job ``job_id`` (Linux: /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"[{job_id}." in (entry / "cmdline").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _installed_mpi() -> str:
    from dsgd_mpi.launch import installed_mpi

    return installed_mpi()


def test_sweep_array_in_two_parts_with_afterok(jobs, slurm):
    part2 = jobs.root / "part2.txt"
    part2.write_text(f"{jobs.config('p2_1', run={'seed': 9})} run.name=p2_1\n")
    dep = f"--dependency=afterok:{jobs.ids['part1']}"
    jobs.submit("part2", "sweep_array.sbatch", [], [dep, f"--array=1-{_array_size(part2)}"],
                env={"SWEEP": str(part2)})  # fmt: skip
    for name in ("part1", "part2"):
        out = slurm.run(["scontrol", "-o", "show", "job", jobs.ids[name]]).stdout
        assert out.strip(), name
    # Every task of both arrays ends with exit 0, part 2 only after part 1.
    deadline = time.monotonic() + WAIT
    states: list[tuple[str, str]] = []
    while time.monotonic() < deadline:
        states = []
        for name in ("part1", "part2"):
            out = slurm.run(["scontrol", "-o", "show", "job", jobs.ids[name]]).stdout
            states += [(re.search(r"JobState=(\S+)", ln)[1], re.search(r"ExitCode=(\S+)", ln)[1])
                       for ln in out.splitlines() if ln.strip()]  # fmt: skip
        if len(states) == 3 and all(s in ("COMPLETED", "FAILED", "CANCELLED") for s, _ in states):
            break
        time.sleep(0.5)
    assert states == [("COMPLETED", "0:0")] * 3, states
    runs = jobs.root / "runs"
    finished = []
    for name in ("p1_1", "p1_2"):
        with h5py.File(runs / f"{name}.h5", "r", locking=False) as f:
            finished.append(f.attrs["finished"])
    with h5py.File(runs / "p2_1.h5", "r", locking=False) as f:
        started = f.attrs["started"]
        assert "finished" in f.attrs
    # "started" has whole seconds: part 2 started in or after the second part 1 finished.
    assert _utc(started) + 1 > max(_utc(t) for t in finished)


def _utc(stamp: str) -> float:
    """Seconds since the epoch of an ISO time ("...+0000" or "...+00:00")."""
    import datetime

    return datetime.datetime.fromisoformat(re.sub(r"([+-]\d\d)(\d\d)$", r"\1:\2", stamp)
                                           ).timestamp()  # fmt: skip

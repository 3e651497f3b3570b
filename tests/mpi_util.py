"""Launch real MPI ranks from a test, with a timeout that can never hang the suite.

Ranks run under ``python -m mpi4py`` so that an exception on one rank calls
``MPI_Abort`` and takes the others down instead of leaving them in a collective.
On timeout the whole process group (mpiexec and every rank) is killed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from dsgd_mpi.launch import MPICH_COLLECTIVES_VAR

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: Jobs started and not yet reaped: tests/conftest.py kills what a failed or timed-out
#: test left behind, so no rank outlives its test.
LIVE: list[subprocess.Popen] = []


def mpiexec() -> list[str]:
    """The launcher and its options: $MPIEXEC split as a shell would (the README's
    ``MPIEXEC="mpiexec --allow-run-as-root --oversubscribe"``), else the one beside this
    Python (the mpich wheel), else PATH's."""
    if os.environ.get("MPIEXEC", "").strip():
        return shlex.split(os.environ["MPIEXEC"])
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec: run `make test`, or set MPIEXEC")
    return [found]


def launcher_kind() -> str:
    """"hydra" (MPICH's mpiexec), "openmpi" (Open MPI's mpirun) or "other", by asking it."""
    try:
        out = subprocess.run([*mpiexec(), "--version"], capture_output=True, text=True,
                             timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "other"
    text = (out.stdout + out.stderr).lower()  # Open MPI 4: "mpirun (OpenRTE) 4.1.4"
    if any(name in text for name in ("open mpi", "openrte", "open-mpi.org")):
        return "openmpi"
    return "hydra" if "hydra" in text else "other"


#: The signal to the launcher that asks a run to stop (README "stop protocol"): MPICH's
#: hydra forwards SIGTERM and SIGUSR1 to the ranks; Open MPI's mpirun forwards SIGUSR1 but
#: turns SIGTERM into ending the job (exit 1); srun forwards SIGUSR1, SIGTERM cancels the step.
STOP_SIGNAL = {"hydra": signal.SIGTERM, "openmpi": signal.SIGUSR1}


#: Defaults a user's environment overrides: the tests oversubscribe 2 cores, where
#: MPICH's spinning shared-memory collectives are several times slower (launch.py).
RANK_ENV = {MPICH_COLLECTIVES_VAR: "none"}
#: What every test rank gets whatever the environment says.
PINNED_ENV = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _rank_env(env: dict | None) -> dict:
    """The ranks' environment: defaults, then the user's, then the pinned values, then ``env``."""
    return {**RANK_ENV, **os.environ, **PINNED_ENV, **(env or {})}


def start_ranks(n: int, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """Launch ``mpiexec -n n python -m mpi4py ARGS`` in its own process group; don't wait.

    ``args`` is a script path or ``-m module`` followed by its arguments.
    """
    cmd = [*mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py", *args]
    full_env = _rank_env(env)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=ROOT,
        start_new_session=True,  # own process group: a timeout kills every rank
    )
    LIVE.append(proc)
    return proc


def start_mpmd(parts: list[tuple[str, list[str]]], env: dict | None = None) -> subprocess.Popen:
    """One job, one rank per part, each ``(working directory, python args)``: ranks that
    see different files (as on nodes without a shared file system)."""
    cmd = mpiexec()
    for k, (wdir, args) in enumerate(parts):
        cmd += ([":"] if k else []) + ["-n", "1", "-wdir", wdir, sys.executable, "-m", "mpi4py",
                                      *args]  # fmt: skip
    full_env = _rank_env(env)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=ROOT, start_new_session=True)  # fmt: skip
    LIVE.append(proc)
    return proc


def kill_leftovers() -> None:
    """Kill every job this process started that is still running (and its ranks)."""
    while LIVE:
        proc = LIVE.pop()
        if proc.poll() is None:
            kill_job(proc)
            proc.communicate()


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for a launched job; on timeout kill its whole process group and fail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        raise AssertionError(
            f"MPI job timed out after {timeout}s: {proc.args}\n{out}\n{err}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_ranks(
    n: int, args: list[str], timeout: float = 180, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``mpiexec -n n python -m mpi4py ARGS``; returns the finished process."""
    return finish(start_ranks(n, args, env), timeout)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux: reads /proc). Hydra starts each rank in its
    own session, so killing mpiexec's process group does not reach the ranks."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_job(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to mpiexec and every process below it (ranks included)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def rank_pids(proc: subprocess.Popen) -> dict[int, int]:
    """{MPI rank: pid} of a job started by :func:`start_ranks` (Linux: reads /proc)."""
    found = {}
    for pid in descendants(proc.pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(item.split(b"=", 1) for item in fh.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        for key in (b"PMI_RANK", b"OMPI_COMM_WORLD_RANK", b"PMIX_RANK"):
            if key in env:
                found[int(env[key])] = pid
                break
    return found


def check_ranks(n: int, args: list[str], timeout: float = 180) -> str:
    """Run and require success; the failure message carries every rank's output."""
    done = run_ranks(n, args, timeout)
    assert done.returncode == 0, (
        f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    return done.stdout

"""Launch real MPI ranks from a test, with a timeout that can never hang the suite.

Ranks run under ``python -m mpi4py`` so that an exception on one rank calls
``MPI_Abort`` and takes the others down instead of leaving them in a collective.
On timeout the whole process group (mpiexec and every rank) is killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def mpiexec() -> str:
    """The launcher: $MPIEXEC, else the one beside this Python (the mpich wheel), else PATH."""
    if os.environ.get("MPIEXEC"):
        return os.environ["MPIEXEC"]
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    found = shutil.which("mpiexec")
    if not found:
        raise RuntimeError("no mpiexec: run `make test`, or set MPIEXEC")
    return found


def run_ranks(
    n: int, args: list[str], timeout: float = 180, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``mpiexec -n n python -m mpi4py ARGS``; returns the finished process.

    ``args`` is a script path or ``-m module`` followed by its arguments.
    """
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=ROOT,
        start_new_session=True,  # own process group: a timeout kills every rank
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"MPI job timed out after {timeout}s: {cmd}\n{out}\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check_ranks(n: int, args: list[str], timeout: float = 180) -> str:
    """Run and require success; the failure message carries every rank's output."""
    done = run_ranks(n, args, timeout)
    assert done.returncode == 0, (
        f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    return done.stdout

"""The simulator against the MPI run of the same config: whole runs, wall clock.

    python -m dsgd_mpi.bench sim configs/quickstart.yaml --workers 16 run.epochs=0.5 --json

Each repeat runs ``python -m dsgd_mpi.sim CONFIG --workers N`` and then
``mpiexec -n N python -m mpi4py -m dsgd_mpi.run CONFIG`` (the order alternates),
as fresh processes, start-up included: what a user waits for. Reported: the
median of each and their ratio, and the simulation alone at other N.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _mpiexec() -> list[str]:
    """$MPIEXEC with its options (split as a shell would), else the mpiexec beside Python."""
    if os.environ.get("MPIEXEC", "").strip():
        return shlex.split(os.environ["MPIEXEC"])
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return [beside if os.path.exists(beside) else "mpiexec"]


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def run_sim(args) -> int:
    if args.workers < 1 or args.repeats < 1:
        print("dsgd_mpi.bench: --workers and --repeats must be positive", file=sys.stderr)
        return 2
    out = tempfile.mkdtemp(prefix="dsgd_bench_sim_")
    # Each side sizes its own thread pool as a user's run would: the MPI ranks share the
    # cores (cores / ranks each), the simulation takes every core of its CPU set.
    env = dict(os.environ)
    py = sys.executable

    def sim(n: int, k: int) -> list[str]:
        return [py, "-m", "dsgd_mpi.sim", args.config, "--workers", str(n), "--mode", args.mode,
                *args.overrides, f"run.out_dir={out}", f"run.name=sim_{n}_{k}",
                "run.overwrite=true"]  # fmt: skip

    def mpi(n: int, k: int) -> list[str]:
        return [*_mpiexec(), "-n", str(n), py, "-m", "mpi4py", "-m", "dsgd_mpi.run", args.config,
                *args.overrides, f"run.out_dir={out}", f"run.name=mpi_{n}_{k}",
                "run.overwrite=true"]  # fmt: skip

    try:
        sims, mpis = [], []
        for k in range(args.repeats):  # alternate the order: drift hits both alike
            pair = [("sim", sim(args.workers, k)), ("mpi", mpi(args.workers, k))]
            for name, cmd in pair if k % 2 == 0 else pair[::-1]:
                (sims if name == "sim" else mpis).append(_timed(cmd, env))
        scaling = {}
        for n in [int(v) for v in args.scaling.split(",") if v.strip()]:
            scaling[n] = _timed(sim(n, 99), env)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    result = {
        "bench": "sim", "config": args.config, "overrides": args.overrides,
        "workers": args.workers, "mode": args.mode, "repeats": args.repeats,
        "sim_s": statistics.median(sims), "mpi_s": statistics.median(mpis),
        "speedup": statistics.median(mpis) / statistics.median(sims),
        "sim_runs_s": sims, "mpi_runs_s": mpis,
        "sim_by_workers_s": scaling,
    }  # fmt: skip
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0

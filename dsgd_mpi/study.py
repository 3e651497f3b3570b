"""Run a plan of several configs in ONE job: MPI ranks, or the one-process simulator.

    mpirun -n 16 python -m mpi4py -m dsgd_mpi.study configs/study/fmnist/plan_mpi_n16.txt
    mpirun -n 4  python -m mpi4py -m dsgd_mpi.study PLAN.txt data.root=/data/fmnist --force
    python -m dsgd_mpi.study --sim 16 configs/study/fmnist/plan_sim_n16.txt
    python -m dsgd_mpi.study --sim 16 --mode reference PLAN.txt   # the MPI ranks' arithmetic

A plan has one run per line, ``CONFIG.yaml [key.path=value ...]`` (blank and
``#`` lines skipped), the format of jobs/sweeps/*.txt; overrides given after the
plan are added to every run. Runs go in order, so uncontrolled reference runs
must come before the controlled runs that name them in ``reference_run``. A run
whose HDF5 file is finished and holds the same resolved config is skipped
(``--force`` runs it again), so a plan that stopped resumes. The first run that
fails stops the plan with its exit status.

Under MPI (torch and MPI start once per world size) each run is
``dsgd_mpi.run.run_config`` inside ``dsgd_mpi.run.guarded``: a failure on any
rank aborts the whole job, as a single run would. With ``--sim N`` each run is
``dsgd_mpi.sim`` with N replicas in this process (``--mode``, fast by default), and mpi4py is
never imported. Each run's own output goes to ``NAME.log`` beside its HDF5 file;
here one line per run.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from dsgd_mpi.plan import Entry, read_plan, run_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dsgd_mpi.study", description=__doc__.splitlines()[0]
    )
    parser.add_argument("plan", help="plan file: one 'CONFIG [key=value ...]' per line")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    parser.add_argument("--force", action="store_true", help="rerun finished runs too")
    parser.add_argument("--sim", type=int, metavar="N", default=None,
                        help="run every line with the simulator's N replicas in this process "
                             "(fast mode), without MPI")  # fmt: skip
    parser.add_argument("--mode", choices=("fast", "reference"), default="fast",
                        help="with --sim: the simulator's mode (reference: the MPI ranks' "
                             "arithmetic, bit for bit)")  # fmt: skip
    args = parser.parse_intermixed_args(argv)
    if args.sim is not None:
        return _simulated(args.plan, tuple(args.overrides), args.sim, args.force, args.mode)
    return _on_mpi(args.plan, tuple(args.overrides), args.force)


def _simulated(plan: str, overrides: tuple[str, ...], workers: int, force: bool,
               mode: str = "fast") -> int:  # fmt: skip
    from dsgd_mpi.sim.__main__ import run_config

    if workers < 1:
        print(f"study error: --sim needs at least 1 replica (got {workers})", file=sys.stderr)
        return 2
    try:
        entries = read_plan(plan, overrides)
    except OSError as exc:
        print(f"study error: {plan}: cannot read plan: {exc.strerror}", file=sys.stderr)
        return 2

    def one(entry: Entry) -> int:
        try:
            return run_config(entry.config, list(entry.overrides), workers, mode)
        except Exception:  # noqa: BLE001 - one failed run stops the plan, with its traceback
            traceback.print_exc(file=sys.stdout)  # into the run's log (the plan prints its tail)
            return 1

    return run_plan(entries, one, force=force)


def _on_mpi(plan: str, overrides: tuple[str, ...], force: bool) -> int:
    from dsgd_mpi import comm as mpi
    from dsgd_mpi.run import guarded, run_config

    comm = mpi.WORLD
    rank = comm.Get_rank()
    entries: list[Entry] | None = None
    error = ""
    if rank == 0:  # rank 0 reads the plan; the others follow what it broadcasts
        try:
            entries = read_plan(plan, overrides)
        except OSError as exc:
            error = f"{plan}: cannot read plan: {exc.strerror}"
    entries, error = comm.bcast((entries, error), root=0)
    if error:
        if rank == 0:
            print(f"study error: {error}", file=sys.stderr)
        mpi.finalize()
        return 2

    def one(entry: Entry) -> int:
        return guarded(comm, lambda: run_config(comm, entry.config, list(entry.overrides)))

    code = run_plan(entries or [], one, root=rank == 0,
                    agree=lambda value: comm.bcast(value, root=0), force=force)  # fmt: skip
    mpi.finalize()  # the code is agreed: the launcher sees it (python -m mpi4py would Abort)
    return code


if __name__ == "__main__":
    raise SystemExit(main())

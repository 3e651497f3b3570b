"""Pure decisions about how a job was launched: task counts and CPU sets.

No MPI here (the simulator uses it too); :mod:`dsgd_mpi.comm` gathers what the
ranks of a node see and passes it in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

#: Variables by which launchers announce how many tasks they started.
LAUNCHER_SIZE_VARS = (
    "OMPI_COMM_WORLD_SIZE",  # Open MPI's mpirun / prterun
    "PMI_SIZE",  # MPICH's hydra, srun --mpi=pmi2, Intel MPI
    "MV2_COMM_WORLD_SIZE",  # MVAPICH
    "SLURM_STEP_NUM_TASKS",  # srun: the tasks of this step
)


def launch_mismatch(env: Mapping[str, str], world_size: int) -> str | None:
    """Why the launcher's task count contradicts a 1-rank world, or None.

    An MPI that cannot talk to its launcher (e.g. the PyPI MPICH under
    ``srun --mpi=pmix``) starts every task as rank 0 of its own 1-rank world:
    N copies would then train alone and write the same files. Several tasks
    announced by the launcher with a world of one rank is that failure.
    """
    if world_size != 1:
        return None
    seen = {}
    for name in LAUNCHER_SIZE_VARS:
        value = env.get(name, "")
        if value.strip().isdigit() and int(value) > 1:
            seen[name] = value.strip()
    if "SLURM_STEP_NUM_TASKS" not in seen and env.get("SLURM_STEP_ID") not in (None, ""):
        # Inside an srun step the job-wide count describes the step too.
        ntasks = env.get("SLURM_NTASKS", "").strip()
        if ntasks.isdigit() and int(ntasks) > 1:
            seen["SLURM_NTASKS"] = ntasks
    if not seen:
        return None
    names = ", ".join(f"{k}={v}" for k, v in seen.items())
    return (
        f"the launcher started several tasks ({names}) but MPI gave this process a world of "
        "1 rank: this MPI cannot talk to the launcher, so every task would train alone and "
        "write the same files. Build mpi4py against the cluster's MPI (make install "
        "MPI=system), pick the PMI plugin that MPI supports (srun --mpi=pmix or --mpi=pmi2; "
        "srun --mpi=list), or launch with that MPI's own mpirun inside the allocation"
    )


def threads_for(env: Mapping[str, str], affinities: Sequence[frozenset[int]]) -> tuple[int, str]:
    """torch threads for this rank and why: an explicit OMP_NUM_THREADS wins, else
    this rank's CPU set divided among the ranks on the node whose sets overlap it.

    Under Slurm each task's set is its own ``--cpus-per-task`` CPUs (no overlap:
    all of them); under a plain ``mpiexec`` every rank sees every core (shared:
    cores / ranks). Oversubscribed ranks with default threads run many times slower.
    """
    explicit = env.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit), f"OMP_NUM_THREADS={explicit}"
    mine, sharing = _sharing(affinities)
    if not mine:
        cpus = os.cpu_count() or 1
        return cpus, f"{cpus} CPUs (no affinity mask)"
    threads = max(1, len(mine) // sharing)
    return threads, f"{len(mine)} CPUs in this rank's affinity mask shared by {sharing} rank(s)"


#: MPICH's switch for its device-level (shared-memory) collectives.
MPICH_COLLECTIVES_VAR = "MPIR_CVAR_DEVICE_COLLECTIVES"


def oversubscribed_mpich_hint(
    env: Mapping[str, str], library: str, affinities: Sequence[frozenset[int]]
) -> str | None:
    """What to set when MPICH ranks outnumber their cores, or None.

    MPICH's shared-memory collectives wait by spinning on flags; with more ranks
    than cores the spinning ranks take the cores from the ranks still computing.
    Measured here (16 ranks, 2 cores, the study's C-SGD cell): 64 samples/s, and
    464 with ``MPIR_CVAR_DEVICE_COLLECTIVES=none`` (MPICH's generic collectives).
    The variable is read at ``MPI_Init``, so it can only be advised, not set here.
    """
    if "MPICH" not in library.upper() or MPICH_COLLECTIVES_VAR in env:
        return None
    mine, sharing = _sharing(affinities)
    if not mine or sharing <= len(mine):
        return None
    return (
        f"{sharing} ranks share {len(mine)} CPUs: MPICH's shared-memory collectives spin "
        f"and run several times slower oversubscribed; export {MPICH_COLLECTIVES_VAR}=none "
        "before mpiexec (make sets it)"
    )


def _sharing(affinities: Sequence[frozenset[int]]) -> tuple[frozenset[int], int]:
    """This rank's CPU set (first) and how many of the node's ranks overlap it, itself included."""
    mine = affinities[0] if affinities else frozenset()
    return mine, 1 + sum(1 for other in affinities[1:] if other & mine)

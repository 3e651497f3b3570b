"""Pure decisions about how a job was launched: task counts, PMI, local ranks, CPU sets.

No MPI here (the simulator uses it too); :mod:`dsgd_mpi.comm` gathers what the
ranks of a node see and passes it in. Some decisions must be taken before
``MPI_Init`` (an MPI that cannot speak the launcher's PMI dies inside it
without a word of ours; an MPI that sets up CUDA at init binds the GPU then):
those read the environment alone. ``python -m dsgd_mpi.launch`` prints the
launcher the installed MPI speaks (the Slurm templates' default).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


#: Variables by which launchers hand a task its rank on its node, before MPI_Init.
LOCAL_RANK_VARS = (
    "SLURM_LOCALID",  # srun
    "MPI_LOCALRANKID",  # MPICH's hydra
    "OMPI_COMM_WORLD_LOCAL_RANK",  # Open MPI's mpirun
    "MV2_COMM_WORLD_LOCAL_RANK",  # MVAPICH
    "PMI_LOCAL_RANK",  # PMIx-based launchers that export it
)
#: What a PMIx launcher (srun --mpi=pmix, Open MPI's mpirun, prterun) sets for its tasks;
#: MPICH reads PMIX_NAMESPACE to pick PMIx, and its PMI-1 client gives up on PMIX_RANK.
PMIX_VARS = ("PMIX_NAMESPACE", "PMIX_RANK")
#: What a PMI-1/2 launcher (hydra, srun --mpi=pmi2) sets for its tasks.
PMI_VARS = ("PMI_FD", "PMI_PORT", "PMI_SIZE")


def local_rank(env: Mapping[str, str]) -> int | None:
    """This task's rank on its node as the launcher announced it, or None (no launcher)."""
    for name in LOCAL_RANK_VARS:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def announced_rank(env: Mapping[str, str]) -> int | None:
    """This task's global rank as the launcher announced it (before MPI_Init), or None."""
    for name in ("SLURM_PROCID", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"):
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def _first_line(library: str) -> str:
    """"MPICH Version:      5.0.2" -> "MPICH Version: 5.0.2" (the name of the library)."""
    return " ".join(library.split("\n", 1)[0].split()) or "unknown MPI"


def _mpich_has_pmix(library: str) -> bool:
    """MPICH (and its kin) speaks PMIx only when configured with it; the configure line of
    its version string says so (the PyPI wheel: ``--with-pm=hydra:gforker``, no PMIx)."""
    configure = next((ln for ln in library.splitlines() if "configure" in ln.lower()), "")
    return "pmix" in configure.lower()


def pmi_mismatch(env: Mapping[str, str], library: str) -> str | None:
    """Why MPI_Init would fail in this launch, or None; decided before MPI_Init.

    ``library`` is ``MPI_Get_library_version()`` (callable before init). An
    MPICH built without PMIx (the default ``mpich`` wheel) aborts inside
    ``MPI_Init`` under a PMIx launcher ("Runtime environment uses unsupported
    PMI version PMIx", exit 15 or 16), and any MPICH aborts when a task carries
    both kinds of variables. Only what is known to fail is refused: other MPIs
    and launchers go on, and a launch that gives N one-rank worlds is caught
    after MPI_Init by :func:`launch_mismatch`.
    """
    first = _first_line(library)
    if "MPICH" not in library.upper() and "MVAPICH" not in library.upper():
        return None
    pmix = [f"{k}={env[k]}" for k in PMIX_VARS if env.get(k)]
    pmi = [f"{k}={env[k]}" for k in PMI_VARS if env.get(k)]
    if not pmix:
        return None
    if pmi:
        said = f"both PMI-1/2 ({', '.join(pmi)}) and PMIx ({', '.join(pmix)})"
        why = f"{first} cannot tell which one to speak"
    elif not _mpich_has_pmix(library):
        said = f"PMIx ({', '.join(pmix)})"
        why = f"{first} was built without PMIx (it speaks PMI-1/2 only)"
    else:
        return None
    return (
        f"the launcher set up this task with {said}, and {why}: MPI_Init would abort. "
        "Launch with a PMI this MPI speaks: srun --mpi=pmi2 (srun --mpi=list shows what "
        "Slurm has), or this MPI's own mpiexec inside the allocation; or build mpi4py "
        "against an MPI with PMIx (make install MPI=system)"
    )


def choose_launcher(library: str, srun_plugins: Sequence[str] | None) -> tuple[str, str]:
    """The launch command the installed MPI speaks, and why (``python -m dsgd_mpi.launch``).

    ``srun_plugins``: what ``srun --mpi=list`` offers, or None outside Slurm.
    MPICH and its kin speak PMI-2, which every Slurm has; Open MPI speaks PMIx
    (Slurm's pmix plugin) and otherwise starts its ranks with its own mpirun,
    which reads the allocation. ``--kill-on-bad-exit=1``: without it Slurm
    leaves the other tasks of a step waiting for one that died.
    """
    first = _first_line(library)
    srun = "srun --kill-on-bad-exit=1 --mpi="
    if srun_plugins is None:
        return "mpiexec", f"{first}, not inside Slurm: its own mpiexec"
    plugins = {p.strip() for p in srun_plugins}
    pmix = sorted(p for p in plugins if p.startswith("pmix"))
    upper = library.upper()
    if "OPEN MPI" in upper:
        if pmix:
            return srun + pmix[0], f"{first} speaks PMIx; srun has {pmix[0]}"
        return "mpirun", f"{first} speaks PMIx and srun has no pmix plugin: Open MPI's mpirun"
    if "MPICH" in upper or "MVAPICH" in upper:
        if pmix and _mpich_has_pmix(library):
            return srun + pmix[0], f"{first} was built with PMIx; srun has {pmix[0]}"
        if "pmi2" in plugins:
            return srun + "pmi2", f"{first} speaks PMI-2; srun has pmi2"
        return "mpiexec", f"{first}: srun has no pmi2 plugin, so its own mpiexec (hydra)"
    return "mpiexec", f"{first}: unknown MPI, so its own mpiexec"


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


def srun_plugins() -> list[str] | None:
    """The MPI plugins ``srun --mpi=list`` offers, or None without Slurm."""
    if shutil.which("srun") is None:
        return None
    try:
        out = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # srun without a reachable Slurm (no slurm.conf): not inside Slurm
        return None
    return parse_mpi_list(out.stdout + out.stderr)


def parse_mpi_list(text: str) -> list[str]:
    """Plugin names from ``srun --mpi=list``: a header, one name per line (older Slurm
    prefixes each with ``srun:``), and (22.05) ``specific pmix plugin versions available:
    pmix_v4[,...]``."""
    names = []
    for line in text.splitlines():
        line = line.strip().removeprefix("srun:").strip()  # older Slurm prefixes every line
        if "versions available:" in line:
            names += [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
        elif line and " " not in line:
            names.append(line)
    return names


def installed_mpi() -> str:
    """The version string of the MPI library mpi4py loads, asked of mpi4py's own command line
    (no MPI_Init, and none of torch's import time: the Slurm templates call this per job)."""
    out = subprocess.run([sys.executable, "-m", "mpi4py", "--mpi-lib-version"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    return out.stdout.replace("\0", "").strip() if out.returncode == 0 else ""


def main(argv: list[str] | None = None) -> int:
    """Print the launch command the installed MPI speaks (stdout) and why (stderr)."""
    command, why = choose_launcher(installed_mpi(), srun_plugins())
    print(f"launcher: {command}  ({why})", file=sys.stderr)
    print(command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A one-machine Slurm for the tests: Debian's slurmctld, slurmd and munge, run as root.

Everything lives in a private directory (configuration, state, spool, logs,
munge key and socket, free ports), so a site's own Slurm or munge is never
touched; clients find it through ``SLURM_CONF``. The node declares more CPUs
than the machine has (``SlurmdParameters=config_overrides``) so that several
small jobs run side by side on two cores. :func:`why_not` says why it cannot
run here (not root, no apt and no Slurm); the tests then skip with that reason.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "libpmix2")
DAEMONS = ("munged", "slurmctld", "slurmd")
CPUS = 16  # declared: jobs of 2-4 one-CPU tasks run side by side


def why_not() -> str | None:
    """Why a local Slurm cannot run on this machine, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (slurmd runs the jobs' tasks as their users)"
    if all(shutil.which(d) for d in DAEMONS) and shutil.which("sbatch"):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


def install() -> None:
    """Install Debian's Slurm and munge where they are missing (apt, noninteractive)."""
    if all(shutil.which(d) for d in DAEMONS) and shutil.which("sbatch"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """munged, slurmctld and slurmd of a private cluster of one node; :meth:`stop` ends them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = socket.gethostname()
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if key != "SLURM_CONF":
                del self.env[key]  # a test run inside a Slurm job must not leak its job
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> LocalSlurm:
        root = self.root
        for sub in ("state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)  # munged wants its socket's directory reachable
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = root / "munge.sock"
        self._spawn("munged", ["munged", "-F", "-f", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={root / 'munged.pid'}",
                               f"--log-file={root / 'munged.log'}",
                               f"--seed-file={root / 'munged.seed'}"])  # fmt: skip
        self._wait(sock.exists, timeout, "munged did not create its socket")
        self.conf.write_text(self._config(sock))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run(["scontrol", "ping"]).returncode == 0, timeout,
                   "slurmctld does not answer")  # fmt: skip
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._idle, timeout, "the node never became idle")
        return self

    def _config(self, sock: Path) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=dsgdtest", f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", f"AuthInfo=socket={sock}", "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            # No cgroups needed: processes tracked by parentage, tasks not confined.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SlurmdParameters=config_overrides", "ReturnToService=2",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
            "KillWait=10", "MinJobAge=3600",  # finished jobs stay visible to scontrol
            # MPICH names its node's shared memory after the PMI job name, which srun makes
            # JOBID.STEP: a segment left by a killed job (here, of an earlier test cluster
            # whose ids started at the same number) makes a later step of the same name die
            # in MPI_Init ("Message truncated"). Ids that no earlier cluster used avoid it.
            f"FirstJobId={random.randint(10_000, 60_000_000)}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory=16000 State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])  # fmt: skip

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / f"{name}.out", "w")  # noqa: SIM115 - the daemon's lifetime
        self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                           env=self.env, cwd=self.root,
                                           start_new_session=True))  # fmt: skip

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"local Slurm: {what}\n{self.logs()}")

    def _idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-n", self.node, "-o", "%t"]).stdout.strip()
        if out.startswith(("down", "drain")):
            self.run(["scontrol", "update", f"nodename={self.node}", "state=resume"])
        return out.startswith(("idle", "mix", "alloc"))

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True,
                              text=True, timeout=kw.pop("timeout", 60), **kw)  # fmt: skip

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (the first record for an array's task)."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        line = out.splitlines()[0] if out.strip() else ""
        return dict(f.split("=", 1) for f in line.split() if "=" in f)

    def logs(self) -> str:
        tails = []
        for name in ("slurmctld.log", "slurmd.log", "munged.out", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.exists():
                tails.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(tails)

    def stop(self) -> None:
        """Cancel every job, then end the daemons this object started (by their pids)."""
        if self.procs and self.procs[0].poll() is None:
            self.run(["scancel", "--full", "--partition=test"], timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run(["squeue", "-h"]).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

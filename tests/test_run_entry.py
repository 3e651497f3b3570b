"""What ``dsgd_mpi.run`` does before MPI_Init, in this process (MPI itself stubbed out)."""

from __future__ import annotations

import signal

import pytest

from dsgd_mpi import checkpoint
from dsgd_mpi import run as run_mod

WHEEL = "MPICH Version:      5.0.2\nMPICH configure:    --with-device=ch4:ucx,ofi"


@pytest.fixture
def stubbed(monkeypatch):
    """MPI calls of main() recorded instead of made; the handlers main() installs restored."""
    calls: list[str] = []
    before = {s: signal.getsignal(s) for s in checkpoint.StopRequest.SIGNALS}
    monkeypatch.setattr(run_mod.mpi, "library_version", lambda full=False: WHEEL)
    monkeypatch.setattr(run_mod.mpi, "init", lambda: calls.append("init") or "WORLD")
    monkeypatch.setattr(run_mod.mpi, "finalize", lambda: calls.append("finalize"))
    monkeypatch.setattr(run_mod, "bind_gpu", lambda local: calls.append(f"gpu {local}"))
    yield calls
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_the_stop_handler_and_the_gpu_come_before_mpi_init_and_the_build(stubbed, monkeypatch):
    seen = {}

    def run_config(comm, path, overrides, stop):
        # Everything after MPI_Init (config, data, model, training) runs with it installed.
        seen.update(comm=comm, stop=stop, handlers=[signal.getsignal(s) for s in stop.SIGNALS])
        return 3

    monkeypatch.setattr(run_mod, "run_config", run_config)
    monkeypatch.setenv("SLURM_LOCALID", "2")
    for name in ("PMIX_NAMESPACE", "PMIX_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert run_mod.main(["cfg.yaml"]) == 3
    assert stubbed == ["gpu 2", "init", "finalize"]  # the agreed code leaves by Finalize
    stop = seen["stop"]
    assert seen["comm"] == "WORLD" and isinstance(stop, checkpoint.StopRequest)
    assert seen["handlers"] == [stop._handle] * len(stop.SIGNALS)
    signal.raise_signal(signal.SIGUSR1)  # a signal during the build is a request, not a kill
    assert stop.requested and stop.name == "SIGUSR1"


def test_a_pmix_launcher_is_refused_before_mpi_init(stubbed, monkeypatch, capsys):
    monkeypatch.setattr(run_mod, "run_config", lambda *a: pytest.fail("must not run"))
    monkeypatch.setenv("PMIX_NAMESPACE", "slurm.pmix.9.0")
    monkeypatch.setenv("PMIX_RANK", "1")
    assert run_mod.main(["cfg.yaml"]) == 2
    assert stubbed == []  # neither MPI_Init nor the GPU
    assert capsys.readouterr().err == ""  # said by the task the launcher calls 0, not by 1
    monkeypatch.setenv("PMIX_RANK", "0")
    assert run_mod.main(["cfg.yaml"]) == 2
    assert "launch error" in capsys.readouterr().err

"""Checkpoint files, the resume decision, stop signals and the watchdog: no MPI needed."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dsgd_mpi import checkpoint
from dsgd_mpi.watchdog import Watchdog


def test_latest_common_is_the_newest_step_every_rank_has():
    assert checkpoint.latest_common([[2, 4, 6], [2, 4, 6], [2, 4]]) == 4
    assert checkpoint.latest_common([[2, 4], [6]]) is None
    assert checkpoint.latest_common([[], [2]]) is None
    assert checkpoint.latest_common([[8, 2]]) == 8


def test_save_is_atomic_and_round_trips(tmp_path):
    state = {"step": 7, "model": {"w": torch.arange(5.0)}, "sums": [1.0, 2.0]}
    path = checkpoint.save(str(tmp_path), 7, 3, state)
    assert path.endswith(os.path.join("step000000007", "rank00003.pt"))
    assert not [p for p in (tmp_path / "step000000007").iterdir() if p.suffix == ".tmp"]
    back = checkpoint.load(str(tmp_path), 7, 3)
    assert back["step"] == 7 and torch.equal(back["model"]["w"], torch.arange(5.0))


def test_a_half_written_file_does_not_count(tmp_path):
    checkpoint.save(str(tmp_path), 4, 0, {"step": 4})
    (tmp_path / "step000000008").mkdir()
    (tmp_path / "step000000008" / "rank00000.pt.tmp").write_bytes(b"partial")
    assert checkpoint.steps_on_disk(str(tmp_path), 0) == [4]
    assert checkpoint.steps_on_disk(str(tmp_path), 1) == []
    assert checkpoint.steps_on_disk(str(tmp_path / "missing"), 0) == []


def test_prune_keeps_the_newest_steps_of_this_rank_only(tmp_path):
    d = str(tmp_path)
    for step in (2, 4, 6):
        for rank in (0, 1):
            checkpoint.save(d, step, rank, {"step": step})
    checkpoint.prune(d, rank=0, keep=2)
    assert checkpoint.steps_on_disk(d, 0) == [4, 6]
    assert checkpoint.steps_on_disk(d, 1) == [2, 4, 6]  # rank 1 prunes its own
    checkpoint.prune(d, rank=1, keep=2)
    assert sorted(os.listdir(d)) == ["step000000004", "step000000006"]  # empty folder removed


def test_config_mismatch_names_the_key_and_ignores_metrics_and_checkpoint():
    saved = "run: {name: a, seed: 1}\noptim: {lr: 0.1}\nmetrics: {log_every: 5}\n"
    assert checkpoint.config_mismatch(saved, saved) is None
    changed = saved.replace("log_every: 5", "log_every: 1") + "checkpoint: {every: 3}\n"
    assert checkpoint.config_mismatch(saved, changed) is None
    assert checkpoint.config_mismatch(saved, saved.replace("lr: 0.1", "lr: 0.2")) == "optim.lr"
    assert checkpoint.config_mismatch(saved, saved.replace("seed: 1", "seed: 1, epochs: 3")) == (
        "run.epochs"
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_request_remembers_the_signal_until_uninstalled(sig):
    before = signal.getsignal(sig)
    stop = checkpoint.StopRequest().install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), sig)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert stop.requested and stop.name == sig.name
    finally:
        stop.uninstall()
    assert signal.getsignal(sig) == before


def test_watchdog_names_the_rank_whose_process_dies():
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    messages = []
    dog = Watchdog({5: peer.pid}, me=0, on_death=messages.append).start()
    try:
        time.sleep(0.2)
        assert messages == []  # alive: quiet
        peer.kill()
        peer.wait()
        dog._thread.join(timeout=10)
        assert len(messages) == 1 and "rank 5" in messages[0] and str(peer.pid) in messages[0]
    finally:
        peer.kill()
        dog.stop()


def test_a_stopped_watchdog_stays_quiet_when_peers_exit():
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    messages = []
    dog = Watchdog({1: peer.pid}, me=0, on_death=messages.append).start()
    dog.stop()
    peer.kill()
    peer.wait()
    time.sleep(0.2)
    assert messages == []

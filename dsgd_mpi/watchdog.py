"""Name the rank that died.

A rank killed by a signal (OOM killer, ``kill -9``, a node fault) cannot say so
itself, and MPICH's launcher reports *a* PID of the job, not the rank that
failed (measured: it printed rank 0's PID when rank 2 and when rank 3 was
killed). So every rank watches the other ranks on its node through Linux pidfds
in a daemon thread: the first survivor to see a peer vanish prints which rank it
was and aborts the job, which also covers launchers that would not clean up.

Pure Python, no MPI: the caller supplies the peers and what to do on a death.
"""

from __future__ import annotations

import os
import select
import sys
import threading
from collections.abc import Callable, Mapping


class Watchdog:
    """Watches ``{rank: pid}`` (the other ranks on this node) in a daemon thread.

    ``on_death(message)`` runs at most once. :meth:`stop` disarms it; stop it on
    every rank *before* a final barrier, or a rank that finished first would look
    dead to one that has not finished yet.
    """

    def __init__(self, peers: Mapping[int, int], me: int, on_death: Callable[[str], None]):
        self.peers, self.me, self.on_death = dict(peers), me, on_death
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    def start(self) -> Watchdog:
        """Arm it; a no-op where pidfds are unavailable (not Linux >= 5.3)."""
        if not hasattr(os, "pidfd_open") or not self.peers:
            return self
        fds = {}
        host = os.uname().nodename
        for rank, pid in self.peers.items():
            try:
                # The message is ready before the death: the launcher may kill this
                # process milliseconds after a peer dies, so the thread must only write.
                fds[os.pidfd_open(pid)] = (
                    f"[rank {self.me}] rank {rank} (pid {pid} on {host}) died without "
                    "reporting an error (killed by a signal?); stopping the job"
                )
            except OSError:  # already gone or not permitted: nothing to watch
                continue
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(
            target=self._loop, args=(fds,), name="dsgd-watchdog", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        try:
            os.write(self._wake_w, b"x")
        except BrokenPipeError:  # the thread already saw a death and closed its end
            pass
        self._thread.join()
        os.close(self._wake_w)
        self._thread = None

    def _loop(self, fds: dict[int, str]) -> None:
        try:
            ready, _, _ = select.select([self._wake_r, *fds], [], [])
            dead = [fd for fd in ready if fd in fds]
            if self._wake_r in ready or not dead:
                return
            self.on_death(fds[dead[0]])
        finally:
            for fd in [self._wake_r, *fds]:
                os.close(fd)


def report_and(action: Callable[[], None]) -> Callable[[str], None]:
    """An ``on_death`` that writes the message to stderr, then runs ``action``."""

    def on_death(message: str) -> None:
        os.write(sys.stderr.fileno(), (message + "\n").encode())
        action()

    return on_death

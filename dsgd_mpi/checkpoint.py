"""Per-rank checkpoints on disk, and the stop request a signal raises.

Layout: ``DIR/step000000200/rank00003.pt``, one file per rank and step, so that
ranks on different nodes never write the same file and a half-written step is
visible as a missing rank file. Each file is written to a temporary name,
fsync'ed and renamed: a file that exists is complete. A step is complete when
every rank has its file; the run resumes from the latest complete step.

The files here are plain functions of paths; the one collective decision (which
step is complete on *all* ranks) takes ``comm`` explicitly. Old steps are pruned
only after every rank has finished writing the new one, so a crash at any
moment leaves at least one complete step behind.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import yaml

from dsgd_mpi.atomic import fsync_dir

_STEP_DIR = re.compile(r"^step(\d{9})$")
KEEP = 2  # complete steps kept per rank: the newest, and one to fall back on


def step_dir(directory: str, step: int) -> str:
    return os.path.join(directory, f"step{step:09d}")


def rank_file(directory: str, step: int, rank: int) -> str:
    return os.path.join(step_dir(directory, step), f"rank{rank:05d}.pt")


def steps_on_disk(directory: str, rank: int) -> list[int]:
    """Steps for which this rank's file exists, oldest first."""
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        match = _STEP_DIR.match(name)
        if match and os.path.exists(rank_file(directory, int(match[1]), rank)):
            steps.append(int(match[1]))
    return sorted(steps)


def latest_common(per_rank: Iterable[Iterable[int]]) -> int | None:
    """The newest step that every rank has, or None."""
    sets = [set(steps) for steps in per_rank]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def save(directory: str, step: int, rank: int, state: Mapping[str, Any]) -> str:
    """Write this rank's state for ``step`` atomically (temporary file, fsync, rename, fsync
    of the folder)."""
    path = rank_file(directory, step, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    fsync_dir(directory)
    return path


def load(directory: str, step: int, rank: int) -> dict[str, Any]:
    """This rank's state at ``step`` (tensors on CPU; ``load_state_dict`` moves them)."""
    # weights_only: our files hold tensors, numbers, strings and dicts; refusing
    # arbitrary pickled objects keeps a copied-in checkpoint from running code.
    return torch.load(rank_file(directory, step, rank), map_location="cpu", weights_only=True)


def prune(directory: str, rank: int, keep: int = KEEP) -> None:
    """Remove this rank's files of all but the ``keep`` newest steps (and emptied folders)."""
    for step in steps_on_disk(directory, rank)[:-keep] if keep else steps_on_disk(directory, rank):
        os.remove(rank_file(directory, step, rank))
        try:
            os.rmdir(step_dir(directory, step))
        except OSError:  # other ranks' files are still there: the last one out removes it
            pass
    if os.path.isdir(directory):
        fsync_dir(directory)


def complete_steps(directory: str, ranks: Iterable[int]) -> set[int]:
    """Steps for which every one of ``ranks`` has its file."""
    sets = [set(steps_on_disk(directory, r)) for r in ranks]
    return set.intersection(*sets) if sets else set()


def agree_on_resume(group, directory: str) -> int | None:
    """Collective: the latest step complete for every replica (the same on every process).

    Each process knows its own replicas' files; the newest common step is found
    with reductions only: propose each process's newest step, take the smallest
    proposal, and accept it if every process has it (otherwise look below it).
    """
    mine = complete_steps(directory, group.ranks)
    below = float("inf")
    while True:
        proposal = max((s for s in mine if s < below), default=-1)
        candidate = -int(group.max([[-proposal]])[0])
        if candidate < 0:
            return None
        if group.max([[0.0 if candidate in mine else 1.0]])[0] == 0:
            return candidate
        below = candidate


# Sections that may change between the interrupted and the resumed launch: they
# decide what is measured and saved, not what is computed.
MUTABLE = ("metrics", "checkpoint", "run.overwrite")


def _split(saved_yaml: str, current_yaml: str) -> tuple[dict, dict, dict, dict]:
    """(saved, current) without the mutable keys, then the mutable keys alone, as nested dicts."""
    saved, current = yaml.safe_load(saved_yaml) or {}, yaml.safe_load(current_yaml) or {}
    kept = ({}, {})
    for path in MUTABLE:
        section, _, key = path.partition(".")
        for source, out in zip((saved, current), kept, strict=True):
            if key:
                value = source.get(section, {}).pop(key, None)
                out.setdefault(section, {})[key] = value
            else:
                out[section] = source.pop(section, None)
    return saved, current, kept[0], kept[1]


def config_mismatch(saved_yaml: str, current_yaml: str) -> str | None:
    """The first dotted key whose value differs in a way that breaks resuming, or None."""
    saved, current, _, _ = _split(saved_yaml, current_yaml)
    return _first_difference(saved, current, "")


def changed_keys(saved_yaml: str, current_yaml: str) -> dict[str, list]:
    """The keys that may change between launches and did: ``{key: [before, now]}``."""
    _, _, before, now = _split(saved_yaml, current_yaml)
    out: dict[str, list] = {}
    _differences(before, now, "", out)
    return out


def _differences(a: Any, b: Any, prefix: str, out: dict[str, list]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            _differences(a.get(key), b.get(key), f"{prefix}{key}.", out)
    elif a != b:
        out[prefix.rstrip(".")] = [a, b]


def _first_difference(a: Any, b: Any, prefix: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return prefix.rstrip(".") if a != b else None


class StopRequest:
    """Remembers that SIGTERM or SIGUSR1 arrived; the trainer acts at a step boundary.

    A handler must not checkpoint by itself: the other ranks are mid-step and a
    checkpoint is only consistent when every rank writes the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "none"


class Checkpointer:
    """When to checkpoint or stop, agreed by all replicas; writing and pruning (collective).

    ``every`` steps, at the last step, and at the first step boundary after a stop
    signal on *any* process (one small reduction per step carries the flag).
    """

    def __init__(self, group, directory: str, every: int, stop: StopRequest | None = None) -> None:
        self.group, self.directory, self.every = group, directory, every
        self.stop = stop or StopRequest()
        self.last_step: int | None = None

    def due(self, step: int, final: bool) -> tuple[bool, bool]:
        """(save now, stop after saving); the same answer on every process."""
        stop = self.group.max([[1.0 if self.stop.requested else 0.0]])[0] > 0
        save = stop or bool(self.every) and (step % self.every == 0 or final)
        return save and step != self.last_step, stop

    def write(self, step: int, states: Mapping[int, Mapping[str, Any]]) -> None:
        """Every local replica's state (``{rank: state}``) for ``step``, then prune old steps."""
        error: OSError | None = None
        try:
            for rank, state in states.items():
                save(self.directory, step, rank, state)
        except OSError as exc:
            error = exc
        # Prune only once every replica has its file: until then the older step is the
        # newest complete one.
        if self.group.max([[1.0 if error else 0.0]])[0] > 0:
            if error is not None:
                raise OSError(f"checkpoint of step {step} not written: {error}") from error
            raise OSError(f"checkpoint of step {step} failed on another rank")
        self.last_step = step
        for rank in states:
            prune(self.directory, rank)

"""Small training runs that several test files assert on, made by ONE 4-rank MPI job.

Starting torch on 4 oversubscribed ranks costs more than any of these runs, so
they share a job: ``python -m dsgd_mpi.study PLAN`` runs them in order inside one
``mpiexec`` (reference runs before the runs that read them). Each test then opens
the HDF5 file and log of the run it is about. A failure in any run fails the job,
and every test that needs a run it did not write.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import h5py
import numpy as np
import yaml

from tests.mpi_util import check_ranks

N = 4
TINY = {
    "run": {"name": "tiny", "epochs": 2, "seed": 3},
    "data": {"name": "synthetic", "synthetic_size": 512, "batch_size": 16},
    "model": {"name": "mlp"},
    "optim": {"lr": 0.05, "base_batch": 64, "milestones": [0.5, 0.75]},
    "metrics": {"log_every": 2, "exact_every": 2, "eval_every": 1, "flush_every": 3},
}
EVERY_STEP = {"log_every": 1, "exact_every": 1, "eval_every": 1, "flush_every": 4}
#: Rounds allowed per step in the measures' runs.
MEASURE_ROUNDS = 4

#: The simulator's oracle runs (tests/test_sim.py): a checkpoint at the last step holds
#: every rank's parameters.
SIM_STEPS = 30
SIM_BASE = {
    "run": {"steps": SIM_STEPS, "seed": 7},
    "data": {"name": "synthetic", "synthetic_size": 1024, "batch_size": 16},  # 16 steps/epoch
    "model": {"name": "small_cnn"},
    "optim": {"lr": 0.05, "base_batch": 64, "milestones": [0.5]},
    "metrics": {"log_every": 1, "exact_every": 1, "eval_every": 1, "flush_every": 10},
    "checkpoint": {"every": SIM_STEPS},
}
#: ring with a controlled phase that needs repeated rounds; random matching with
#: plain gossip, then an exact (all-reduce) phase for the last steps.
SIM_CASES = {
    "ring": {"topology": {"name": "ring"}, "consensus": {"measure": "exact", "phases": [
        {"target": "constant", "reference": 1e-4, "max_rounds": 3}]},
        "metrics": {"sharpness_every": 100, "sharpness_samples": 48}},  # at the end: 12 a rank
    "matching": {"topology": {"name": "random_matching", "seed": 3}, "consensus": {"phases": [
        {"target": "none", "until_epoch": 1.5}, {"target": "exact"}]}},
}  # fmt: skip


def merged(base: dict, **sections) -> dict:
    out = yaml.safe_load(yaml.safe_dump(base))
    for key, value in sections.items():
        out.setdefault(key, {}).update(value)
    return out


def _control(name: str, phases: list[dict], **sections) -> dict:
    return merged(TINY, run={"epochs": 1, "name": name}, metrics=EVERY_STEP,
                  consensus={"phases": phases}, **sections)  # fmt: skip


def measure_run(topology: str, measure: str, out_dir: Path) -> dict:
    """A 16-step run under ``measure`` that logs the exact distance at every step.

    The exact run holds a target that binds; the sketch run a loose one, so that its
    steps end with a real distance to compare (not consensus to float noise).
    """
    reference = {"exact": 2e-5, "sketch": 1.0}[measure]
    cfg = merged(
        TINY,
        run={"name": f"{topology}_{measure}", "steps": 16, "seed": 4},
        data={"synthetic_size": 1024, "batch_size": 8},
        metrics={"log_every": 1, "exact_every": 1, "eval_every": 1, "flush_every": 64},
        topology={"name": topology},
        consensus={"measure": measure, "phases": [
            {"target": "constant", "reference": reference, "max_rounds": MEASURE_ROUNDS}]},
    )  # fmt: skip
    cfg["run"]["out_dir"] = str(out_dir)
    return cfg


def runs(root: Path) -> dict[str, dict]:
    """Every run of the shared job, in plan order (references first)."""
    fmnist = merged(TINY, run={"name": "fmnist", "epochs": 1},
                    data={"name": "fashion_mnist", "root": str(root / "fmnist")},
                    model={"name": "small_cnn"}, metrics={"eval_every": 0.5})  # fmt: skip
    reference = str(root / "runs" / "reference.h5")
    out = {
        "tiny": merged(TINY),
        "fmnist": fmnist,
        "seed_a": merged(TINY, run={"name": "seed_a", "epochs": 1}),
        "seed_b": merged(TINY, run={"name": "seed_b", "epochs": 1}),
        "loose": _control("loose", [{"target": "constant", "reference": 1e-2, "max_rounds": 12}]),
        "tight": _control("tight", [{"target": "constant", "reference": 1e-5, "max_rounds": 12}]),
        "exact": _control("exact", [{"target": "exact"}]),
        "adaptive": _control("adaptive", [{"target": "adaptive", "factor": 0.5, "max_rounds": 8}]),
        "reference": _control("reference", [{"target": "none"}]),
        "controlled": _control("controlled", [{"target": "constant", "factor": 0.25,
                                               "reference_run": reference, "max_rounds": 6}]),
        "local": _control("local", [{"target": "none"}], gossip={"local_steps": 3}),
        "ring_exact": measure_run("ring", "exact", root / "runs"),
        "random_matching_sketch": measure_run("random_matching", "sketch", root / "runs"),
    }
    for name, body in SIM_CASES.items():
        out[name] = merged(SIM_BASE, run={"name": name}, **body)
    for cfg in out.values():
        cfg["run"]["out_dir"] = str(root / "runs")
    return out


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write the standard IDX format (the Fashion-MNIST files), gzipped."""
    code = 0x08  # unsigned byte
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path, train: int = 256, test: int = 64) -> None:
    """Small learnable files in the real format: class k is brighter by 25 k."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, n)
        images = (labels[:, None, None] * 25 + rng.integers(0, 20, (n, 28, 28))).clip(0, 255)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


class SharedRuns:
    """The finished job: its run files, logs and configs."""

    def __init__(self, root: Path):
        self.root = root
        self.configs = runs(root)
        fake_fashion_mnist(root / "fmnist")
        lines = []
        for name, cfg in self.configs.items():
            path = root / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            lines.append(f"{path}\n")
        plan = root / "plan.txt"
        plan.write_text("".join(lines))
        self.stdout = check_ranks(N, ["-m", "dsgd_mpi.study", str(plan)], timeout=500)

    def h5(self, name: str) -> Path:
        return self.root / "runs" / f"{name}.h5"

    def log(self, name: str) -> str:
        return (self.root / "runs" / f"{name}.log").read_text()

    def table(self, name: str, group: str = "steps") -> dict[str, np.ndarray]:
        with h5py.File(self.h5(name), "r", locking=False) as f:
            return {k: v[()] for k, v in f[group].items()}

    def config_file(self, name: str) -> str:
        return str(self.root / f"{name}.yaml")

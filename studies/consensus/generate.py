"""Write the consensus-distance study's configs and plans from one place (issue 16).

    python -m studies.consensus.generate            # configs/study/{fmnist,cifar10}/, sweeps
    python -m studies.consensus.generate --quick D  # the smoke grid (a few steps) into D/
    python -m studies.consensus.generate [--quick D] --avg-sam RUNS [--seed S]  # claim 9's plans

One YAML per cell (an experiment without its seed) and one plan per backend and
world size: ``plan_sim_nN_sS.txt`` per seed (``python -m dsgd_mpi.study --sim N``) and
``plan_mpi_nN.txt`` (``mpiexec -n N python -m mpi4py -m dsgd_mpi.study``), a
line per run, ``CONFIG run.seed=S run.name=CELL_sS [references]``, the
uncontrolled reference runs before the controlled runs that read them. The
claim-1 cells run on both backends from the same YAML; the MPI runs are named
``CELL_mpi_sS``. Claim 9's C-SGD with Gaussian smoothing takes its
perturbation's trace from the D-SGD run of the same seed, so its plan is written after
that run finished (``--avg-sam``). Cells (``dec-phase-K``: the consensus
controlled in phase K, exact averaging in the others; phases are the intervals
between the lr decays; ``fF``: the exact distance held at F x the phase's
largest distance in the uncontrolled ``dec-phase-K_none`` run of that seed):

  ring_nN, complete_nN          D-SGD on a ring vs all-reduce C-SGD (n = 4, 16, 32)   1
  ring_nN_mpi, complete_nN_mpi  the same on MPI ranks (n = 4, 16)                     1
  dec-phase-1_{none,f0.5,f0.25,f0.125}                                               2
  dec-phase-2_{none,f0.5}, dec-phase-3_none                                           3
  guideline_f0.25 (phase 1 at 1/4, later free), whole_f0.25 (every phase at 1/4)      4
  target_{ring,onepeer}         rounds to meet one exact-distance rule, short runs    5
  zhu_{sb,lb}_{ring,csgd}       16 x 16 vs 16 x 128, steps fixed, momentum-free      6-8
  zhu_lb_avgsam                 C-SGD + isotropic smoothing at D-SGD's mean distance  9
                                (what the second edition ran under the name avg-SAM;
                                Zhu et al.'s average direction is optim.perturb avg_sam)
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dsgd_mpi import atomic

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2)
NEVER = 1_000_000.0
"""Epochs: an interval longer than any run, so the evaluation or sharpness comes at the end only."""

# Fashion-MNIST, small CNN, the whole grid on this 2-core machine (budget in README.md).
FMNIST: dict = {
    "dataset": "fmnist",
    "base": "configs/quickstart.yaml",
    "configs": "configs/study/fmnist",
    "out": "runs/study/fmnist",
    "data": {"name": "fashion_mnist", "root": "/usr/share/datasets/fashion-mnist"},
    # Kong et al.'s recipe (Nesterov 0.9, wd 1e-4, lr linearly scaled, decays at 50 % and
    # 75 %) at 4 per worker: 1.25 epochs = 1171 steps at n = 16, 5x the first edition's 234.
    # A step's cost is its samples (~1000/s per core here): 4 per worker buys the steps.
    # lr 0.05 per 128 samples as in the first edition (0.4 peak diverged on the ring there).
    "kong": {"epochs": 1.25, "batch": 4, "lr": 0.05, "base_batch": 128, "warmup_epochs": 0.125,
             "milestones": [0.5, 0.75]},  # fmt: skip
    # n = 32 and three MPI seeds do not fit the hour here (a 16-rank run of 1171 steps
    # takes ~4.5 min on 2 cores after ~2.5 min of start-up): the MPI cells run seed 0,
    # beside the simulator's 3 seeds.
    "sim_sizes": (4, 16),
    "mpi_sizes": (4, 16),
    "mpi_seeds": (0,),
    "big": 16,
    "phase1_factors": (0.5, 0.25, 0.125),
    "phase2_factors": (0.5,),
    "phase3_reference": True,  # dec-phase-3_none: whole_f0.25's phase-3 reference
    "max_rounds": 60,  # per step; a 16-ring shrinks Xi^2 by ~10 % a round in its slowest mode
    # Claim 5: the same exact-distance rule on both graphs, factor * lr^2 * EMA(|g|^2).
    "target": {"epochs": 0.25, "factor": 1.0, "max_rounds": 60},
    # Zhu et al.'s recipe: plain SGD, no weight decay, lr 0.1 per 64 samples per worker
    # scaled linearly, warmup from 0.1x over 10 % of the steps, decays at 40 % and 80 %,
    # gossip before the step; 16 x 4 vs 16 x 32 (Zhu's 8x ratio, 1024 vs 8192), 100 steps.
    "zhu": {"steps": 100, "small": 4, "large": 32, "lr": 0.1, "base_batch": 1024,
            "warmup_steps": 10, "sharpness_samples": 256},  # fmt: skip
    "metrics": {"log_every": 1, "exact_every": 1, "flush_every": 200},
    "seeds": SEEDS,
    "mpi_suffix": "_mpi",
}

# The smoke grid: every cell and plan of FMNIST on synthetic data, a few steps per run.
QUICK: dict = {
    **FMNIST,
    "dataset": "quick",
    "data": {"name": "synthetic", "synthetic_size": 256},  # the test set too: cheap evaluations
    "kong": {**FMNIST["kong"], "epochs": 3, "batch": 4, "warmup_epochs": 0.5},
    "target": {**FMNIST["target"], "epochs": 1},
    "big": 4,  # claims 2-9 on 4 workers: the sharpness's HVPs cost per worker (~120 of them)
    "zhu": {**FMNIST["zhu"], "steps": 8, "small": 4, "large": 16, "warmup_steps": 2,
            "sharpness_samples": 64},
    "seeds": (0, 1),
}

# CIFAR-10 / ResNet-20 at the papers' scale (Kong's cells only), MPI, for a cluster:
# jobs/sweeps/study_cifar10_{1,2}.txt. Zhu's cells at that scale are configs/zhu/.
CIFAR10: dict = {
    "dataset": "cifar10",
    "base": "configs/cifar10_resnet20_ring.yaml",
    "configs": "configs/study/cifar10",
    "out": "runs/study/cifar10",
    "data": {},
    "kong": {"epochs": 300, "batch": 32, "lr": 0.1, "base_batch": 64, "warmup_epochs": 5,
             "milestones": [0.5, 0.75]},  # fmt: skip
    "sim_sizes": (),
    "mpi_sizes": (16,),
    "big": 16,
    "phase1_factors": (0.5, 0.25, 0.125),
    "phase2_factors": (0.5,),
    "phase3_reference": True,
    "max_rounds": 60,
    "target": {"epochs": 10, "factor": 1.0, "max_rounds": 60},
    "zhu": None,
    "metrics": {"log_every": 10, "exact_every": 10, "flush_every": 500},
    "seeds": SEEDS,
    "mpi_suffix": "",
}


@dataclass(frozen=True)
class Cell:
    """One experiment of the grid; its runs are its seeds."""

    name: str
    """Run names are NAME_sS (NAME_mpi_sS on MPI when the cell also runs on the simulator)."""
    n: int
    body: dict
    """The config on top of the grid's base YAML."""
    refs: dict[int, str] = field(default_factory=dict)
    """Phase index -> the cell whose run of the same seed is that phase's reference."""
    backends: tuple[str, ...] = ("sim",)
    stage: int = 1
    """2: the plan is written once stage 1 finished (claim 9 reads a D-SGD run's distance)."""
    part: str = ""
    """A separate simulator plan per seed for cells that read no other cell's run, so that
    the plans balance over the cores."""


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and key in base else value
    return out


def run_file(s: dict, run: str) -> str:
    return f"{s['out']}/{run}.h5"


# ------------------------------------------------------------------------- cells


def kong(s: dict, topology: str, phases: list[dict], **over) -> dict:
    """Kong et al.'s recipe; every controlled phase compares the exact distance Xi^2."""
    k, m = s["kong"], s["metrics"]
    body = {
        "run": {"epochs": k["epochs"]},
        "data": {**s["data"], "batch_size": k["batch"]},
        "optim": {"lr": k["lr"], "base_batch": k["base_batch"],
                  "warmup_epochs": k["warmup_epochs"], "milestones": k["milestones"]},
        "topology": {"name": topology},
        "consensus": {"measure": "exact", "phases": phases},
        # The exact distance at every logged step: the references' maxima come from it.
        # x̄ only: 16 local test passes would cost more than a run's training here.
        "metrics": {**m, "eval_every": NEVER, "eval_local": False},
    }  # fmt: skip
    return merge(body, over)


def zhu(s: dict, batch: int, topology: str, sharpness: bool, **over) -> dict:
    z, m = s["zhu"], s["metrics"]
    body = {
        "run": {"steps": z["steps"]},
        "data": {**s["data"], "batch_size": batch, "augment": False},
        "optim": {"name": "sgd", "lr": z["lr"], "base_batch": z["base_batch"], "scale_lr": True,
                  "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "warmup_epochs": 0,
                  "warmup_steps": z["warmup_steps"], "warmup_from": 0.1,
                  "milestones": [0.4, 0.8], "decay": 0.1},
        "topology": {"name": topology},
        "gossip": {"order": "gossip_first"},
        "consensus": {"measure": "exact", "phases": [{"target": "none"}]},
        # Claim 8 reads the local models and their ensemble of the large-batch D-SGD runs only.
        "metrics": {**m, "eval_every": NEVER, "sharpness_every": NEVER if sharpness else 0,
                    "sharpness_samples": z["sharpness_samples"],
                    "eval_local": sharpness and topology != "complete"},
    }  # fmt: skip
    return merge(body, over)


def held(factor: float, s: dict) -> dict:
    """A phase whose Xi^2 is held at factor x its reference's largest one (the second
    edition's factors of Xi^2_max: 0.25 is Kong's 1/2 Xi_max)."""
    return {"target": "constant", "factor": factor, "factor_unit": "squared", "reference_run": "",
            "max_rounds": s["max_rounds"]}  # fmt: skip


def cells(s: dict) -> list[Cell]:
    """Every cell of a grid, references before the cells that read them."""
    out: list[Cell] = []
    free, exact = {"target": "none"}, {"target": "exact"}
    for n in sorted({*s["sim_sizes"], *s["mpi_sizes"]}):
        backends = tuple(b for b, sizes in (("sim", s["sim_sizes"]), ("mpi", s["mpi_sizes"]))
                         if n in sizes)  # fmt: skip
        for topo in ("ring", "complete"):
            # Uncontrolled and read by no control: the exact distance every 10 steps is enough
            # (on MPI ranks each measurement is a full-vector Allreduce, each row a reduction).
            sparse = {"consensus": {"measure": "estimate"},
                      "metrics": {"log_every": 10, "exact_every": 10}}  # fmt: skip
            body = kong(s, topo, [free], **sparse)
            out.append(Cell(f"{topo}_n{n}", n, body, backends=backends))
    n = s["big"]
    back = ("sim",) if s["sim_sizes"] else ("mpi",)
    layouts = {1: [free, exact, exact], 2: [exact, free, exact], 3: [exact, exact, free]}
    for k in (1, 2, 3) if s["phase3_reference"] else (1, 2):
        out.append(Cell(f"dec-phase-{k}_none_n{n}", n, kong(s, "ring", layouts[k]),
                        backends=back))  # fmt: skip
    for k, factors in ((1, s["phase1_factors"]), (2, s["phase2_factors"])):
        for f in factors:
            phases = [held(f, s) if p is free else p for p in layouts[k]]
            out.append(Cell(f"dec-phase-{k}_f{f:g}_n{n}", n, kong(s, "ring", phases),
                            {k - 1: f"dec-phase-{k}_none_n{n}"}, back))  # fmt: skip
    g = 0.25
    out.append(Cell(f"guideline_f{g:g}_n{n}", n, kong(s, "ring", [held(g, s), free, free]),
                    {0: f"dec-phase-1_none_n{n}"}, back))  # fmt: skip
    whole = 3 if s["phase3_reference"] else 2  # without dec-phase-3_none, phase 3 is free
    phases = [held(g, s) for _ in range(whole)] + [free] * (3 - whole)
    out.append(Cell(f"whole_f{g:g}_n{n}", n, kong(s, "ring", phases),
                    {k: f"dec-phase-{k + 1}_none_n{n}" for k in range(whole)}, back))  # fmt: skip
    t = s["target"]
    for short, topo in (("ring", "ring"), ("onepeer", "one_peer_exponential")):
        rule = {"target": "adaptive", "factor": t["factor"], "max_rounds": t["max_rounds"]}
        out.append(Cell(f"target_{short}_n{n}", n,
                        kong(s, topo, [rule], run={"epochs": t["epochs"]}), backends=back,
                        part="other"))  # fmt: skip
    if s["zhu"]:
        z = s["zhu"]
        for size, batch in (("sb", z["small"]), ("lb", z["large"])):
            for short, topo in (("ring", "ring"), ("csgd", "complete")):
                body = zhu(s, batch, topo, sharpness=size == "lb")
                out.append(Cell(f"zhu_{size}_{short}_n{n}", n, body, part="other"))
        body = zhu(s, z["large"], "complete", True,
                   optim={"perturb": "gaussian", "perturb_xi2": 0.0})  # fmt: skip
        out.append(Cell(f"zhu_lb_avgsam_n{n}", n, body, stage=2))
    return out


# ------------------------------------------------------------------- writing


def run_name(s: dict, cell: Cell, backend: str, seed: int) -> str:
    suffix = s["mpi_suffix"] if backend == "mpi" else ""
    return f"{cell.name}{suffix}_s{seed}"


def plan_line(s: dict, cell: Cell, backend: str, seed: int) -> str:
    words = [f"{s['configs']}/{cell.name}.yaml", f"run.seed={seed}",
             f"run.name={run_name(s, cell, backend, seed)}"]  # fmt: skip
    words += [f"consensus.phases.{k}.reference_run={run_file(s, f'{ref}_s{seed}')}"
              for k, ref in sorted(cell.refs.items())]  # fmt: skip
    return " ".join(words)


def config_text(s: dict, cell: Cell, base: dict) -> str:
    full = merge(base, {"run": {"name": f"{cell.name}_s0", "seed": 0, "out_dir": s["out"]}})
    full = copy.deepcopy(merge(full, cell.body))
    for k, ref in cell.refs.items():  # seed 0's reference; each plan line names its own
        full["consensus"]["phases"][k]["reference_run"] = run_file(s, f"{ref}_s0")
    plans = ", ".join(f"plan_{b}_n{cell.n}.txt" for b in cell.backends)
    how = "written by --avg-sam after its D-SGD runs" if cell.stage == 2 else f"in {plans}"
    header = (
        f"# {cell.name}: {s['dataset']} study, {cell.n} workers. Generated by\n"
        f"# studies/consensus/generate.py from {s['base']}; edit that script, not this file.\n"
        f"# Runs with its seeds {how}.\n"
    )
    return header + yaml.safe_dump(full, sort_keys=False)


def plan_name(backend: str, n: int, seed: int | None = None, part: str = "") -> str:
    """``plan_sim_nN_sS[_PART].txt``: the simulator's plans are per seed (a seed's
    references are its own) and part, so that single-thread processes can share the
    cores; ``plan_mpi_nN.txt``."""
    return (f"plan_{backend}_n{n}" + ("" if seed is None else f"_s{seed}")
            + (f"_{part}" if part else "") + ".txt")  # fmt: skip


def plan_text(s: dict, backend: str, n: int, lines: list[str], path: str) -> str:
    launch = (f"python -m dsgd_mpi.study --sim {n}" if backend == "sim"
              else f"mpiexec -n {n} python -m mpi4py -m dsgd_mpi.study")  # fmt: skip
    return (
        f"# {s['dataset']} study, {n} workers on {backend}: one run per line "
        f"(CONFIG [key.path=value ...]).\n"
        f"# Generated by studies/consensus/generate.py. References come first.\n"
        f"#   {launch} {path}\n" + "\n".join(lines) + "\n"
    )


def write(s: dict, root: Path = ROOT) -> dict[tuple[str, int], list[str]]:
    """The cell configs and stage-1 plans of a grid; returns its plan lines by (backend, n)."""
    folder = root / s["configs"]
    folder.mkdir(parents=True, exist_ok=True)
    for old in (*folder.glob("*.yaml"), *folder.glob("plan_*.txt")):
        old.unlink()
    base = yaml.safe_load((ROOT / s["base"]).read_text())
    plans: dict[tuple[str, int], list[str]] = {}
    files: dict[str, tuple[str, int, list[str]]] = {}
    for cell in cells(s):
        (folder / f"{cell.name}.yaml").write_text(config_text(s, cell, base))
        if cell.stage != 1:
            continue
        for backend in cell.backends:
            for seed in s["seeds"] if backend == "sim" else s.get("mpi_seeds", s["seeds"]):
                line = plan_line(s, cell, backend, seed)
                plans.setdefault((backend, cell.n), []).append(line)
                name = (plan_name("sim", cell.n, seed, cell.part) if backend == "sim"
                        else plan_name("mpi", cell.n))  # fmt: skip
                files.setdefault(name, (backend, cell.n, []))[2].append(line)
    for name, (backend, n, lines) in files.items():
        text = plan_text(s, backend, n, lines, f"{s['configs']}/{name}")
        (folder / name).write_text(text)
    return plans


def sweeps(s: dict, lines: list[str], root: Path = ROOT) -> None:
    """Two Slurm sweep files: the runs that read no reference, then the rest."""
    first = [ln for ln in lines if "reference_run=" not in ln]
    then = [ln for ln in lines if "reference_run=" in ln]
    sub = "sbatch --array=1-{k} jobs/sweep_array.sbatch"
    for name, chunk, note in (
        ("study_cifar10_1.txt", first, "uncontrolled runs and references"),
        ("study_cifar10_2.txt", then, "controlled runs: submit after study_cifar10_1 finished"),
    ):
        text = (
            f"# CIFAR-10 / ResNet-20 consensus-distance study (issue 16), 16 ranks: {note}.\n"
            f"# Generated by studies/consensus/generate.py. One run per line.\n"
            f"#   SWEEP=jobs/sweeps/{name} {sub.format(k=len(chunk))}\n"
        )
        if name.endswith("_2.txt"):
            text += (
                "#   (or chain: SWEEP=jobs/sweeps/study_cifar10_2.txt sbatch "
                "--dependency=afterok:JOBID_OF_PART_1 ...)\n"
            )
        (root / "jobs" / "sweeps" / name).write_text(text + "\n".join(chunk) + "\n")


# ------------------------------------------------------------- claim 9's plan


def mean_distance(path: str) -> float:
    """The D-SGD run's mean exact consensus distance Xi^2 over its logged steps."""
    import h5py
    import numpy as np

    with h5py.File(path, "r", locking=False) as f:
        if "finished" not in f.attrs:
            raise ValueError(f"{path} is not a finished run")
        exact = f["steps"]["consensus_exact"][()]
    exact = exact[np.isfinite(exact)]
    if not len(exact):
        raise ValueError(f"{path} logged no exact distance")
    return float(exact.mean())


def avg_sam_plans(s: dict, runs: str, seeds: tuple[int, ...] | None = None) -> dict[str, str]:
    """Claim 9's plans, one per seed (file name -> text; ``seeds``: these only, else the
    grid's): C-SGD + avg-SAM at the mean distance of that seed's D-SGD run.

    The perturbation's total variance is the whole-run mean of the exact
    distance of ``zhu_lb_ring`` of the same seed (read from ``runs``), fixed
    before the avg-SAM run starts: the rule was set before any result was seen.
    """
    n = s["big"]
    cell = next(c for c in cells(s) if c.stage == 2)
    plans = {}
    for seed in s["seeds"] if seeds is None else seeds:
        xi2 = mean_distance(f"{runs}/zhu_lb_ring_n{n}_s{seed}.h5")
        line = f"{plan_line(s, cell, 'sim', seed)} optim.perturb_xi2={xi2:.6g}"
        name = plan_name("avgsam", n, seed)
        plans[name] = plan_text(s, "sim", n, [line], f"{runs}/{name}")
    return plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.consensus.generate",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--quick", metavar="DIR", help="write the smoke grid into DIR/configs "
                        "(runs in DIR/runs) instead of configs/study")  # fmt: skip
    parser.add_argument("--avg-sam", metavar="RUNS", help="write claim 9's plan to "
                        "RUNS/plan_avgsam_nN_sS.txt from the finished D-SGD runs in RUNS")
    parser.add_argument("--seed", type=int, action="append", help="with --avg-sam: this "
                        "seed's plan only (repeatable); default every seed of the grid")
    args = parser.parse_args(argv)
    grid = FMNIST
    if args.quick:
        grid = {**QUICK, "configs": f"{args.quick}/configs", "out": f"{args.quick}/runs"}
    if args.avg_sam:
        try:
            seeds = None if args.seed is None else tuple(args.seed)
            plans = avg_sam_plans({**grid, "out": args.avg_sam}, args.avg_sam, seeds)
        except (OSError, KeyError, ValueError) as exc:
            print(f"generate error: {exc}", file=sys.stderr)
            return 2
        for name, text in plans.items():  # written while the study runs: atomically
            atomic.write_text(str(Path(args.avg_sam) / name), text)
            print(f"wrote {Path(args.avg_sam) / name}")
        return 0
    if args.quick:
        plans = write(grid, Path.cwd())
        print(f"wrote {grid['configs']}: {sum(map(len, plans.values()))} runs in "
              f"{len(plans)} plans")  # fmt: skip
        return 0
    for s in (FMNIST, CIFAR10):
        plans = write(s)
        if s is CIFAR10:
            sweeps(s, plans[("mpi", s["big"])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write the consensus-distance study's configs and plans from one place (third edition).

    python -m studies.consensus.generate            # configs/study/{fmnist,cifar10}/, sweeps
    python -m studies.consensus.generate --quick D  # the smoke grid (a few steps) into D/

One YAML per cell (an experiment without its seed) and one plan per backend, world
size and seed: ``plan_sim_nN_sS[_PART].txt`` (``python -m dsgd_mpi.study --sim N``),
``plan_mpi_nN.txt`` (``mpiexec -n N python -m mpi4py -m dsgd_mpi.study``) and
``plan_ref_nN.txt`` (``python -m dsgd_mpi.study --sim N --mode reference``), a line
per run, ``CONFIG run.seed=S run.name=CELL_sS [references]``, the uncontrolled
reference runs before the controlled runs that read them; ``plans.txt`` lists the
plans in the order `make study` starts them (the most expensive first, the MPI
plan last). Cells (``dec-phase-K``: the consensus controlled in phase K, exact
averaging in the others; phases are the intervals between the lr decays; ``fF``:
the exact distance Xi held at F x Xi_max, Kong's unit, Xi_max the largest distance
of the same phase in the uncontrolled ``dec-phase-K_none`` run of that seed):

  complete_n16, dec-phase-1_{none,f0.5,f0.25,f0.125}_n16                       claim 2
  dec-phase-2_{none,f0.5}_n16 (and dec-phase-3_none_n16, whole_f0.25's ref.)   claim 3
  guideline_f0.25_n16 (phase 1 at 1/4 Xi_max, later free), whole_f0.25_n16     claim 4
  zhu_{sb,lb}_{csgd,ring}_n16, zhu_lb_exp_n16   Zhu's batches and lrs at fixed   claim 6
                                                steps on a training subset
  zhu_ip_{csgd,ring,avgsam,gauss}_n16           trained to interpolation     claims 7-9
  zhu_sb_ring_n16 on MPI ranks (_mpi) and in the simulator's reference mode
  (_ref), seed 0                                                              claim 1-mpi

Claims 1, 5a and 5b carry the second edition's runs forward (claims.SECOND_EDITION).
The regimes were chosen by the pilots in studies/consensus/README.md.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
NEVER = 1_000_000.0
"""Epochs: an interval longer than any run, so the evaluation or sharpness comes at the end only."""

# Fashion-MNIST on this 2-core machine: the grid, its seeds and its cost (README.md).
FMNIST: dict = {
    "dataset": "fmnist",
    "base": "configs/quickstart.yaml",
    "configs": "configs/study/fmnist",
    "out": "runs/study/fmnist",
    "data": {"name": "fashion_mnist", "root": "/usr/share/datasets/fashion-mnist"},
    # Kong et al.'s recipe (Nesterov 0.9, wd 1e-4, lr linearly scaled, decays at 50 % and
    # 75 %) at 4 per worker, 1.25 epochs = 1171 steps at n = 16, as the second edition.
    "kong": {"epochs": 1.25, "batch": 4, "lr": 0.05, "base_batch": 128, "warmup_epochs": 0.125,
             "milestones": [0.5, 0.75]},  # fmt: skip
    "big": 16,
    "phase1_factors": (0.5, 0.25, 0.125),  # of Xi_max (Kong's unit); 1 x Xi_max is _none
    "phase2_factors": (0.5,),
    "max_rounds": 60,  # per step; 1/8 Xi_max took 12.3 rounds a step in phase 1 (pilot)
    # Zhu et al.'s recipe: plain SGD, no weight decay, lr 0.1 per 1024 samples scaled
    # linearly (0.8 at 8192), warmup from 0.1x over 10 % of the steps, decays x0.1 at 40 %
    # and 80 %, gossip before the step; the MLP on a seeded training subset (data.train_size).
    # "penalty": Zhu's own total batches 16 x 64 and 16 x 512 on 8192 samples (claim 6);
    # "interpolation": 16 x IP_BATCH on IP_SIZE samples, trained to interpolation (7-9).
    "zhu": {"model": "mlp", "lr": 0.1, "base_batch": 1024, "warmup": 0.1,
            "penalty": {"train_size": 8192, "small": 64, "large": 512, "steps": 200},
            "interpolation": {"train_size": 1024, "batch": 64, "steps": 1500},
            "sharpness_samples": 1024, "log_every": 10},  # fmt: skip
    "metrics": {"log_every": 1, "exact_every": 1, "flush_every": 200},
    "kong_seeds": (0, 1, 2),
    "zhu_seeds": (0, 1, 2, 3, 4),
    "ip_seeds": (0, 1, 2),
    "mpi": {"cell": "zhu_sb_ring", "seeds": (0,)},
}

# The smoke grid: every cell and plan of FMNIST on synthetic data, a few steps per run.
QUICK: dict = {
    **FMNIST,
    "dataset": "quick",
    "data": {"name": "synthetic", "synthetic_size": 256},  # the test set too: cheap evaluations
    "kong": {**FMNIST["kong"], "epochs": 3, "batch": 4, "warmup_epochs": 0.5},
    "big": 4,
    "zhu": {**FMNIST["zhu"], "penalty": {"train_size": 128, "small": 4, "large": 32,
                                         "steps": 10},
            "interpolation": {"train_size": 128, "batch": 8, "steps": 10},
            "sharpness_samples": 64, "log_every": 1},  # fmt: skip
    "kong_seeds": (0, 1),
    "zhu_seeds": (0, 1),
    "ip_seeds": (0, 1),
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
    "big": 16,
    "phase1_factors": (0.5, 0.25, 0.125),
    "phase2_factors": (0.5,),
    "max_rounds": 60,
    "zhu": None,
    "metrics": {"log_every": 10, "exact_every": 10, "flush_every": 500},
    "kong_seeds": (0, 1, 2),
    "backend": "mpi",
    "mpi": None,
    # No second edition to carry forward at this scale: claim 1's ring and claim 5b's cells.
    "own": {"target": {"epochs": 10, "factor": 1.0, "max_rounds": 60}},
}


@dataclass(frozen=True)
class Cell:
    """One experiment of the grid; its runs are its seeds."""

    name: str
    """Run names are NAME_sS (NAME_mpi_sS on MPI ranks, NAME_ref_sS in reference mode)."""
    n: int
    body: dict
    """The config on top of the grid's base YAML."""
    seeds: tuple[int, ...]
    refs: dict[int, str] = field(default_factory=dict)
    """Phase index -> the cell whose run of the same seed is that phase's reference."""
    backends: tuple[str, ...] = ("sim",)
    """sim (fast mode), mpi (MPI ranks), ref (the simulator's reference mode)."""
    part: str = ""
    """The simulator plans are per seed and part, so that they balance over the cores."""
    cost: float = 0.0
    """Estimated seconds of one run on one core (the pilots; README.md's budget)."""


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


def zhu(s: dict, regime: str, batch: int, topology: str, **over) -> dict:
    """Zhu et al.'s recipe in one of the two regimes, evaluated at the end of the first lr
    stage (40 % of the steps) and at the end."""
    z, m = s["zhu"], s["metrics"]
    r = z[regime]
    steps = r["steps"]
    spe = r["train_size"] // s["big"] // batch  # steps per epoch of each worker's shard
    first = round(0.4 * steps)
    body = {
        "run": {"steps": steps},
        "data": {**s["data"], "batch_size": batch, "augment": False,
                 "train_size": r["train_size"]},
        "model": {"name": z["model"]},
        "optim": {"name": "sgd", "lr": z["lr"], "base_batch": z["base_batch"], "scale_lr": True,
                  "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "warmup_epochs": 0,
                  "warmup_steps": round(z["warmup"] * steps), "warmup_from": 0.1,
                  "milestones": [0.4, 0.8], "decay": 0.1},
        "topology": {"name": topology},
        "gossip": {"order": "gossip_first"},
        "consensus": {"measure": "exact", "phases": [{"target": "none"}]},
        # An evaluation every `first` steps: at the end of lr stage 1, at 80 % and at the end.
        "metrics": {**m, "log_every": z["log_every"], "exact_every": z["log_every"],
                    "eval_every": first / spe, "sharpness_every": 0, "eval_local": False,
                    "sharpness_samples": z["sharpness_samples"]},
    }  # fmt: skip
    return merge(body, over)


def held(factor: float, s: dict) -> dict:
    """A phase whose distance Xi is held at factor x its reference's largest (Kong's unit)."""
    return {"target": "constant", "factor": factor, "factor_unit": "distance",
            "reference_run": "", "max_rounds": s["max_rounds"]}  # fmt: skip


def cells(s: dict) -> list[Cell]:
    """Every cell of a grid, references before the cells that read them."""
    out: list[Cell] = []
    free, exact = {"target": "none"}, {"target": "exact"}
    n, seeds = s["big"], s["kong_seeds"]
    back = (s.get("backend", "sim"),)

    def add(name: str, body: dict, refs: dict | None = None, cost: float = 50.0) -> None:
        out.append(Cell(name, n, body, seeds, refs or {}, back, "kong", cost))

    # Costs: seconds on one core beside another single-thread run (the pilots, README.md).
    add(f"complete_n{n}", kong(s, "complete", [free]), cost=55)
    layouts = {1: [free, exact, exact], 2: [exact, free, exact], 3: [exact, exact, free]}
    for k in (1, 2, 3):
        add(f"dec-phase-{k}_none_n{n}", kong(s, "ring", layouts[k]), cost=55)
    for k, factors in ((1, s["phase1_factors"]), (2, s["phase2_factors"])):
        for f in factors:
            phases = [held(f, s) if p is free else p for p in layouts[k]]
            add(f"dec-phase-{k}_f{f:g}_n{n}", kong(s, "ring", phases),
                {k - 1: f"dec-phase-{k}_none_n{n}"}, cost=60 + 2 / f)  # fmt: skip
    g = 0.25
    add(f"guideline_f{g:g}_n{n}", kong(s, "ring", [held(g, s), free, free]),
        {0: f"dec-phase-1_none_n{n}"}, cost=70)  # fmt: skip
    add(f"whole_f{g:g}_n{n}", kong(s, "ring", [held(g, s)] * 3),
        {k: f"dec-phase-{k + 1}_none_n{n}" for k in range(3)}, cost=85)  # fmt: skip
    if own := s.get("own"):
        add(f"ring_n{n}", kong(s, "ring", [free]))
        rule = {"target": "adaptive", "factor": own["target"]["factor"],
                "max_rounds": own["target"]["max_rounds"]}  # fmt: skip
        for short, topo in (("ring", "ring"), ("onepeer", "one_peer_exponential")):
            add(f"target_{short}_n{n}",
                kong(s, topo, [rule], run={"epochs": own["target"]["epochs"]}))  # fmt: skip
    if not s["zhu"]:
        return out
    z = s["zhu"]
    pen = z["penalty"]
    for size, batch, cost in (("sb", pen["small"], 20), ("lb", pen["large"], 45)):
        for short, topo in (("csgd", "complete"), ("ring", "ring"), ("exp", "exponential")):
            if short == "exp" and size == "sb":
                continue
            name = f"zhu_{size}_{short}_n{n}"
            backends = ("sim",)
            if s["mpi"] and name == f"{s['mpi']['cell']}_n{n}":
                backends = ("sim", "mpi", "ref")
            out.append(Cell(name, n, zhu(s, "penalty", batch, topo), s["zhu_seeds"],
                            backends=backends, part="zhu",
                            cost=cost * {"csgd": 1.0, "ring": 1.3, "exp": 1.45}[short]))
    ip = z["interpolation"]
    for short, topo, extra, cost in (
        ("csgd", "complete", {}, 95), ("ring", "ring", {"metrics": {"eval_local": True}}, 140),
        ("avgsam", "complete", {"optim": {"perturb": "avg_sam", "perturb_topology": "ring"}},
         235),
        ("gauss", "complete", {"optim": {"perturb": "gaussian", "perturb_topology": "ring",
                                         "perturb_xi2": None}}, 250),
    ):  # fmt: skip
        body = zhu(s, "interpolation", ip["batch"], topo, **extra)
        body["metrics"]["sharpness_every"] = NEVER  # lambda_max and the trace at the end
        out.append(Cell(f"zhu_ip_{short}_n{n}", n, body, s["ip_seeds"], part="ip", cost=cost))
    return out


# ------------------------------------------------------------------- writing

SUFFIX = {"sim": "", "mpi": "_mpi", "ref": "_ref"}


def seeds_of(s: dict, cell: Cell, backend: str) -> tuple[int, ...]:
    return s["mpi"]["seeds"] if backend in ("mpi", "ref") and s["mpi"] else cell.seeds


def run_name(cell: Cell, backend: str, seed: int) -> str:
    """NAME_sS; NAME_mpi_sS and NAME_ref_sS for a cell that also runs on the simulator."""
    suffix = SUFFIX[backend] if len(cell.backends) > 1 else ""
    return f"{cell.name}{suffix}_s{seed}"


def plan_line(s: dict, cell: Cell, backend: str, seed: int) -> str:
    words = [f"{s['configs']}/{cell.name}.yaml", f"run.seed={seed}",
             f"run.name={run_name(cell, backend, seed)}"]  # fmt: skip
    words += [f"consensus.phases.{k}.reference_run={run_file(s, f'{ref}_s{seed}')}"
              for k, ref in sorted(cell.refs.items())]  # fmt: skip
    return " ".join(words)


def config_text(s: dict, cell: Cell, base: dict) -> str:
    full = merge(base, {"run": {"name": f"{cell.name}_s0", "seed": 0, "out_dir": s["out"]}})
    full = copy.deepcopy(merge(full, cell.body))
    for k, ref in cell.refs.items():  # seed 0's reference; each plan line names its own
        full["consensus"]["phases"][k]["reference_run"] = run_file(s, f"{ref}_s0")
    header = (
        f"# {cell.name}: {s['dataset']} study, {cell.n} workers. Generated by\n"
        f"# studies/consensus/generate.py from {s['base']}; edit that script, not this file.\n"
        f"# Runs on {', '.join(cell.backends)} with seeds "
        f"{', '.join(map(str, cell.seeds))} (plans beside it).\n"
    )
    return header + yaml.safe_dump(full, sort_keys=False)


def plan_name(backend: str, n: int, seed: int | None = None, part: str = "") -> str:
    """``plan_sim_nN_sS_PART.txt``: the simulator's plans are per seed (a seed's references
    are its own) and part, so that single-thread processes can share the cores;
    ``plan_mpi_nN.txt``, ``plan_ref_nN.txt``."""
    return (f"plan_{backend}_n{n}" + ("" if seed is None else f"_s{seed}")
            + (f"_{part}" if part else "") + ".txt")  # fmt: skip


LAUNCH = {"sim": "python -m dsgd_mpi.study --sim {n}",
          "ref": "python -m dsgd_mpi.study --sim {n} --mode reference",
          "mpi": "mpiexec -n {n} python -m mpi4py -m dsgd_mpi.study"}  # fmt: skip


def plan_text(s: dict, backend: str, n: int, lines: list[str], path: str) -> str:
    return (
        f"# {s['dataset']} study, {n} workers on {backend}: one run per line "
        f"(CONFIG [key.path=value ...]).\n"
        f"# Generated by studies/consensus/generate.py. References come first.\n"
        f"#   {LAUNCH[backend].format(n=n)} {path}\n" + "\n".join(lines) + "\n"
    )


MPI_START = 45.0
"""Seconds for 16 MPI ranks to start on 2 cores (pilot: 76 s for start-up and a 35 s run)."""


def plans(s: dict) -> dict[str, tuple[str, int, list[str], float]]:
    """Plan file name -> (backend, n, lines, estimated core-seconds)."""
    out: dict[str, tuple[str, int, list[str], float]] = {}
    for cell in cells(s):
        for backend in cell.backends:
            for seed in seeds_of(s, cell, backend):
                name = (plan_name("sim", cell.n, seed, cell.part) if backend == "sim"
                        else plan_name(backend, cell.n))  # fmt: skip
                cost = cell.cost * (1.5 if backend == "ref" else 1.0)
                if backend == "mpi":  # 16 ranks on 2 cores: both cores, ~2x a simulator run
                    cost = 2 * (MPI_START + 1.5 * cell.cost)
                _, _, lines, total = out.get(name, (backend, cell.n, [], 0.0))
                out[name] = (backend, cell.n, [*lines, plan_line(s, cell, backend, seed)],
                             total + cost)  # fmt: skip
    return out


def order(found: dict[str, tuple[str, int, list[str], float]]) -> list[str]:
    """The order `make study` starts the plans: the longest first (greedy over the cores), the
    MPI plans last (their ranks take both cores beside the last simulator plan)."""
    return sorted(found, key=lambda k: (found[k][0] == "mpi", -found[k][3], k))


def budget(s: dict, cores: int = 2) -> dict[str, float]:
    """Estimated core-minutes per part and the wall-clock minutes on ``cores`` cores."""
    parts: dict[str, float] = {}
    for name, (backend, _, _, cost) in plans(s).items():
        part = backend if backend != "sim" else name.rsplit("_", 1)[-1].removesuffix(".txt")
        parts[part] = parts.get(part, 0.0) + cost / 60
    parts["wall (ideal packing)"] = sum(parts.values()) / cores
    return parts


def write(s: dict, root: Path = ROOT) -> dict[str, tuple[str, int, list[str], float]]:
    """The cell configs, the plans and plans.txt of a grid; returns the plans."""
    folder = root / s["configs"]
    folder.mkdir(parents=True, exist_ok=True)
    for old in (*folder.glob("*.yaml"), *folder.glob("plan_*.txt"), *folder.glob("plans.txt")):
        old.unlink()
    base = yaml.safe_load((ROOT / s["base"]).read_text())
    for cell in cells(s):
        (folder / f"{cell.name}.yaml").write_text(config_text(s, cell, base))
    found = plans(s)
    for name, (backend, n, lines, _) in found.items():
        (folder / name).write_text(plan_text(s, backend, n, lines, f"{s['configs']}/{name}"))
    listed = "\n".join(f"{s['configs']}/{name}" for name in order(found))
    (folder / "plans.txt").write_text(
        "# The plans in the order `make study` starts them (generate.py; longest first, MPI "
        "last).\n" + listed + "\n")  # fmt: skip
    return found


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
            f"# CIFAR-10 / ResNet-20 consensus-distance study (issue 26), 16 ranks: {note}.\n"
            f"# Generated by studies/consensus/generate.py. One run per line.\n"
            f"#   SWEEP=jobs/sweeps/{name} {sub.format(k=len(chunk))}\n"
        )
        if name.endswith("_2.txt"):
            text += (
                "#   (or chain: SWEEP=jobs/sweeps/study_cifar10_2.txt sbatch "
                "--dependency=afterok:JOBID_OF_PART_1 ...)\n"
            )
        (root / "jobs" / "sweeps" / name).write_text(text + "\n".join(chunk) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.consensus.generate",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--quick", metavar="DIR", help="write the smoke grid into DIR/configs "
                        "(runs in DIR/runs) instead of configs/study")  # fmt: skip
    parser.add_argument("--budget", action="store_true", help="print the estimated cost of "
                        "the Fashion-MNIST grid per part and stop")  # fmt: skip
    args = parser.parse_args(argv)
    if args.budget:
        for part, minutes in budget(FMNIST).items():
            print(f"{part:>22}: {minutes:6.1f} min")
        return 0
    if args.quick:
        grid = {**QUICK, "configs": f"{args.quick}/configs", "out": f"{args.quick}/runs"}
        found = write(grid, Path.cwd())
        print(f"wrote {grid['configs']}: {sum(len(p[2]) for p in found.values())} runs in "
              f"{len(found)} plans")  # fmt: skip
        return 0
    write(FMNIST)
    found = write(CIFAR10)
    sweeps(CIFAR10, found[plan_name("mpi", CIFAR10["big"])][2])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

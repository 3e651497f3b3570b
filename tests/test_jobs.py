"""Slurm job templates in jobs/: static checks, and real runs with fake srun / scontrol."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
TEMPLATES = sorted(JOBS.glob("*.sbatch"))
SWEEPS = sorted((JOBS / "sweeps").glob("*.txt"))
LAUNCH = "python -m mpi4py -m dsgd_mpi.run"

# Hyperparameter keys (bare or as the last part of a dotted override) that must not be set in
# a template: they belong in configs/ or on the sbatch command line.
HYPER_KEYS = (
    "lr|seed|epochs|batch_size|base_batch|momentum|nesterov|weight_decay|warmup_epochs"
    "|milestones|decay|scale_lr|local_steps|factor|reference|max_rounds|target|partition|alpha"
    "|width|topology|name"
)
HYPER_RE = re.compile(rf"(?<![\w.-])(?:[a-z_]+\.)*(?:{HYPER_KEYS})=")
OVERRIDE_RE = re.compile(r"(?<![\w.-])[a-z_]+\.[a-z_.]+=")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def sweep_runs(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [ln.split() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_templates_exist():
    names = {p.name for p in TEMPLATES}
    assert {
        "single_node.sbatch",
        "multi_node.sbatch",
        "sweep_array.sbatch",
        "requeue.sbatch",
    } <= names
    assert (JOBS / "README.md").is_file()
    assert {p.name for p in SWEEPS} >= {"kong_cifar10.txt", "quickstart_seeds.txt"}


@needs_bash
@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_static(path: Path):
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("#!") and "bash" in lines[0]
    subprocess.run(["bash", "-n", str(path)], check=True, capture_output=True)

    sbatch = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert sbatch, "no #SBATCH header"
    # Slurm stops reading #SBATCH lines at the first command: all headers come before it.
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    assert any("--output=logs/" in ln for ln in sbatch)

    usage = "\n".join(lines[:first_cmd])
    assert re.search(rf"sbatch (--\S+ )*jobs/{re.escape(path.name)}", usage), "no usage line"
    assert "LAUNCHER" in usage and "mpirun" in usage and "python -m dsgd_mpi.launch" in usage
    assert "#SBATCH --gpu-bind=single:1" in sbatch  # one GPU per task, the closest one

    assert "set -euo pipefail" in text
    assert 'source "${DSGD_VENV:-$SLURM_SUBMIT_DIR/.venv}/bin/activate"' in text
    # Threads follow each task's CPU set; a hard-coded 1 would waste --cpus-per-task.
    assert not re.search(r"^\s*export OMP_NUM_THREADS", text, re.M)
    # One line chooses the launcher, after the venv (the helper asks the installed MPI).
    chooser = 'LAUNCHER="${LAUNCHER:-$(python -m dsgd_mpi.launch)}"'
    assert text.count(chooser) == 1 and text.index("/bin/activate") < text.index(chooser)
    assert f"$LAUNCHER {LAUNCH}" in text

    # Resources and paths only.
    assert not HYPER_RE.search(text), HYPER_RE.search(text).group(0)
    code = "\n".join(ln for ln in lines if not ln.lstrip().startswith("#"))
    code = code.replace("[key.path=value ...]", "")  # the usage placeholder
    assert not OVERRIDE_RE.search(code), OVERRIDE_RE.search(code).group(0)

    # The config path is an argument: "$CONFIG" from $1, or the first word of a sweep line.
    if path.name == "sweep_array.sbatch":
        assert 'SWEEP="${SWEEP:-jobs/sweeps/kong_cifar10.txt}"' in text
        assert f'{LAUNCH} "${{args[@]}}"' in text
    else:
        assert 'CONFIG="${1:' in text
        assert f'{LAUNCH} "$CONFIG" "$@"' in text


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_files(path: Path):
    runs = sweep_runs(path)
    assert runs
    names = []
    for run in runs:
        config, overrides = run[0], run[1:]
        assert config.startswith("configs/") and (REPO / config).is_file(), config
        assert all("=" in o and not o.startswith("-") for o in overrides), run
        names += [o.split("=", 1)[1] for o in overrides if o.startswith("run.name=")]
    assert len(names) == len(runs) == len(set(names)), "every run needs its own run.name"


def test_kong_sweep_grid():
    runs = sweep_runs(JOBS / "sweeps" / "kong_cifar10.txt")
    grid = {(r[0], next(o for o in r if o.startswith("run.seed="))) for r in runs}
    assert len(grid) == len(runs) == 6
    configs = {c for c, _ in grid}
    assert configs == {
        "configs/cifar10_resnet20_ring.yaml",
        "configs/cifar10_resnet20_complete.yaml",
    }
    assert {s for _, s in grid} == {"run.seed=0", "run.seed=1", "run.seed=2"}
    header = (JOBS / "sweep_array.sbatch").read_text()
    assert f"#SBATCH --array=1-{len(runs)}" in header


# --- real runs in a sandbox -------------------------------------------------------------------

#: What a fake srun answers to --mpi=list (the templates ask it through dsgd_mpi.launch).
MPI_LIST = """if [[ "$1" == --mpi=list ]]; then
    printf 'MPI plugin types are...\\n\\tnone\\n\\tpmi2\\n\\tpmix\\n'; exit 0
fi
"""
FAKE = """#!/bin/bash
{mpi_list}printf '%s\\n' "$PWD" "$OMP_NUM_THREADS" "$@" > "{out}/{name}.args"
"""

FAKE_LONG_STEP = """#!/bin/bash
{mpi_list}printf '%s\\n' "$PWD" "$OMP_NUM_THREADS" "$@" > "{out}/srun.args"
trap 'echo USR1 >> "{out}/srun.signals"; exit 0' USR1
touch "{out}/srun.started"
for _ in $(seq 200); do sleep 0.05; done
echo timeout >> "{out}/srun.signals"
"""


def sandbox(tmp_path: Path, srun: str = FAKE) -> tuple[dict[str, str], Path]:
    out = tmp_path / "out"
    out.mkdir()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name, body in (("srun", srun), ("scontrol", FAKE)):
        p = fake_bin / name
        p.write_text(body.format(out=out, name=name, mpi_list=MPI_LIST))
        p.chmod(0o755)
    # A venv whose python is this one: the templates ask it for the launcher.
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    submit = tmp_path / "submit"
    submit.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("LAUNCHER", "SWEEP")
    }
    env.update(
        PATH=f"{fake_bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        DSGD_VENV=str(venv),
        SLURM_SUBMIT_DIR=str(submit),
        SLURM_JOB_ID="4242",
        SLURM_CPUS_PER_TASK="8",
        OMP_NUM_THREADS="99",
    )
    return env, out


def run_job(name: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(JOBS / name), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )


def recorded(out: Path, name: str) -> list[str]:
    return (out / f"{name}.args").read_text().splitlines()


def _default_launcher() -> list[str]:
    """What the templates' helper chooses for this install under the fake srun."""
    from dsgd_mpi import launch

    plugins = ["none", "pmi2", "pmix"]
    return launch.choose_launcher(launch.installed_mpi(), plugins)[0].split()


def expect_launch(rec: list[str], env: dict[str, str], argv: list[str]) -> None:
    pwd, omp, *args = rec
    assert pwd == env["SLURM_SUBMIT_DIR"]
    assert omp == "99"  # the user's own setting passes through
    launcher = _default_launcher()
    assert launcher[0] == "srun", launcher  # pmi2 (MPICH) or pmix (Open MPI): both here
    assert args == [*launcher[1:], "python", "-m", "mpi4py", "-m", "dsgd_mpi.run", *argv]


@needs_bash
def test_sweep_array_runs_the_selected_line(tmp_path):
    env, out = sandbox(tmp_path)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(
        "# a comment\n"
        "\n"
        "configs/quickstart.yaml run.seed=0 run.name=a\n"
        "   # indented comment\n"
        "\n"
        "configs/cifar10_resnet20_ring.yaml   run.seed=1\trun.name=b  data.download=true\n"
        "configs/quickstart.yaml run.seed=2 run.name=c\n"
    )
    env.update(SLURM_ARRAY_TASK_ID="2", SWEEP=str(sweep))
    res = run_job("sweep_array.sbatch", [], env)
    assert res.returncode == 0, res.stderr
    expect_launch(
        recorded(out, "srun"),
        env,
        ["configs/cifar10_resnet20_ring.yaml", "run.seed=1", "run.name=b", "data.download=true"],
    )
    assert not (out / "scontrol.args").exists()

    # Past the end of the sweep: a clear error, nothing launched.
    (out / "srun.args").unlink()
    env["SLURM_ARRAY_TASK_ID"] = "4"
    res = run_job("sweep_array.sbatch", [], env)
    assert res.returncode == 2
    assert "has 3 runs, no run 4" in res.stderr
    assert not (out / "srun.args").exists()


@needs_bash
def test_sweep_array_default_sweep_file(tmp_path):
    env, out = sandbox(tmp_path)
    env.update(SLURM_ARRAY_TASK_ID="5", SLURM_SUBMIT_DIR=str(REPO))
    res = run_job("sweep_array.sbatch", [], env)
    assert res.returncode == 0, res.stderr
    expected = sweep_runs(JOBS / "sweeps" / "kong_cifar10.txt")[4]
    expect_launch(recorded(out, "srun"), env, expected)


@needs_bash
@pytest.mark.parametrize("name", ["single_node.sbatch", "multi_node.sbatch"])
def test_single_and_multi_node_pass_config_and_overrides(tmp_path, name):
    env, out = sandbox(tmp_path)
    argv = ["configs/quickstart.yaml", "run.seed=3", "run.name=x y"]
    res = run_job(name, argv, env)
    assert res.returncode == 0, res.stderr
    expect_launch(recorded(out, "srun"), env, argv)


@needs_bash
def test_launcher_override_and_missing_config(tmp_path):
    env, out = sandbox(tmp_path)
    fake_mpirun = Path(env["PATH"].split(os.pathsep)[0]) / "mpirun"
    fake_mpirun.write_text(FAKE.format(out=out, name="mpirun", mpi_list=""))
    fake_mpirun.chmod(0o755)
    env["LAUNCHER"] = "mpirun --map-by ppr:4:node"
    res = run_job("single_node.sbatch", ["configs/quickstart.yaml"], env)
    assert res.returncode == 0, res.stderr
    assert recorded(out, "mpirun")[2:] == [
        "--map-by", "ppr:4:node", "python", "-m", "mpi4py", "-m", "dsgd_mpi.run",
        "configs/quickstart.yaml",
    ]  # fmt: skip
    assert not (out / "srun.args").exists()

    res = run_job("single_node.sbatch", [], env)
    assert res.returncode != 0 and "usage: sbatch jobs/single_node.sbatch" in res.stderr


@needs_bash
def test_requeue_forwards_usr1_and_requeues(tmp_path):
    env, out = sandbox(tmp_path, srun=FAKE_LONG_STEP)
    argv = ["configs/cifar10_resnet20_ring.yaml", "run.name=long"]
    proc = subprocess.Popen(
        ["bash", str(JOBS / "requeue.sbatch"), *argv],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not (out / "srun.started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)  # what Slurm does with --signal=B:USR1@120
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    expect_launch(recorded(out, "srun"), env, argv)
    assert (out / "srun.signals").read_text().split() == ["USR1"]
    assert recorded(out, "scontrol")[2:] == ["requeue", "4242"]
    assert "requeueing job 4242" in stdout


@needs_bash
def test_the_default_launcher_is_what_the_installed_mpi_speaks(tmp_path):
    env, out = sandbox(tmp_path)  # the template asks python -m dsgd_mpi.launch (fake srun)
    argv = ["configs/quickstart.yaml", "run.seed=3"]
    res = run_job("single_node.sbatch", argv, env)
    assert res.returncode == 0, res.stderr
    assert "launcher: srun" in res.stderr  # the helper says what it chose, and why
    expect_launch(recorded(out, "srun"), env, argv)


@needs_bash
def test_requeue_without_signal_passes_exit_status(tmp_path):
    env, out = sandbox(tmp_path, srun=FAKE + "exit 3\n")
    res = run_job("requeue.sbatch", ["configs/quickstart.yaml"], env)
    assert res.returncode == 3
    expect_launch(recorded(out, "srun"), env, ["configs/quickstart.yaml"])
    assert not (out / "scontrol.args").exists()


def test_array_sizes_printed_in_the_docs_come_from_the_sweep_files():
    """An --array range past the end of its sweep makes the extra tasks fail (exit 2), and
    --dependency=afterok on that array then never releases; a smaller one drops runs."""
    counts = {p.name: len(sweep_runs(p)) for p in SWEEPS}
    checked = 0
    for doc in (REPO / "README.md", JOBS / "README.md", *sorted((REPO / "docs").glob("*.md")),
                *TEMPLATES):  # fmt: skip
        for line in doc.read_text().splitlines():
            found = re.search(r"--array=1-(\d+)", line)
            if not found:
                continue
            named = re.findall(r"sweeps/([\w.]+\.txt)", line)
            sweep = named[0] if named else "kong_cifar10.txt"  # the template's default
            assert int(found[1]) == counts[sweep], f"{doc.name}: {line.strip()}"
            checked += 1
    assert checked >= 6

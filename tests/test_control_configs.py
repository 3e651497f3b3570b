"""The shipped consensus-control configs are valid, match their generator, and read
their references: each is checked against placeholder reference runs made from the
reference config its header names (no early return when the real runs are absent)."""

import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dsgd_mpi.config import ConfigError, check_world, load_config, to_yaml
from dsgd_mpi.control import reference_maxima
from dsgd_mpi.schedule import phases

ROOT = Path(__file__).resolve().parent.parent
CONTROL = ROOT / "configs" / "control"
FILES = sorted(CONTROL.glob("*.yaml"))


def test_generator_reproduces_the_committed_files():
    before = {p.name: p.read_text() for p in FILES}
    subprocess.run([sys.executable, str(CONTROL / "generate.py")], check=True)
    after = {p.name: p.read_text() for p in sorted(CONTROL.glob("*.yaml"))}
    assert after == before, "configs/control/*.yaml differ from generate.py's output"
    # (3 dec-phase x (none + 2 factors) + 2 guideline + adaptive + 1 sketch) x 3 settings
    assert len(FILES) == 13 * 3


def _world_size(path: Path) -> int:
    return int(re.search(r"_n(\d+)_", path.name).group(1))


def _placeholder(path: Path, reference_config: Path, n: int, maxima: dict, measure_ok=True,
                 peaks=True):
    """A finished run file of ``reference_config``, logged every 5 steps, whose phase k
    peaks at ``maxima[k]`` between two rows: the logged rows hold at most half of it,
    the ``*_max`` columns (unless ``peaks`` is false) the largest value since the last row."""
    cfg = load_config(str(reference_config), [] if measure_ok else ["consensus.measure=estimate"])
    spans = phases(cfg)
    epochs = np.linspace(0.05, cfg.run.epochs, 40)
    phase = np.array([next(s.index for s in spans if e <= s.end_epoch + 1e-9) for e in epochs])
    logged = np.array([maxima.get(int(p), 1.0) * (0.25 + 0.25 * (i % 2)) for i, p in
                       enumerate(phase)])  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs.update({"config": to_yaml(cfg), "world_size": n, "topology": "ring"})
        steps = f.create_group("steps")
        steps["step"], steps["epoch"], steps["phase"] = 5 * np.arange(1, 41), epochs, phase
        steps["consensus_estimate"] = logged * 3
        steps["consensus_measured"] = logged if measure_ok else logged * 3
        steps["consensus_exact"] = logged if measure_ok else np.full_like(logged, np.nan)
        if peaks:
            steps["consensus_estimate_max"] = logged * 6
            steps["consensus_measured_max"] = logged * 2 if measure_ok else logged * 6


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_control_config_reads_its_reference_in_the_same_measure(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(path), ["data.download=true"])
    header = path.read_text().split("\nrun:")[0]
    named = re.findall(r"configs/control/(\S+)\.yaml", header)
    assert named[-1] == path.stem, "the header's last command must run this config"
    n = _world_size(path)
    controlled = [p for p in cfg.consensus.phases if p.target == "constant"]
    if not controlled:  # references and adaptive presets need no reference file
        assert len(named) == 1
        check_world(cfg, n)
        assert reference_maxima(cfg, n) == {}
        return
    reference = CONTROL / f"{named[0]}.yaml"
    assert reference.exists() and cfg.consensus.measure in ("exact", "sketch")
    maxima = {k: 10.0 ** -(k + 2) for k in range(3)}
    for p in controlled:
        _placeholder(tmp_path / p.reference_run, reference, n, maxima)
    check_world(cfg, n)
    got = reference_maxima(cfg, n)
    for k, p in enumerate(cfg.consensus.phases):
        if p.target == "constant":
            assert got[k] == pytest.approx(maxima[k]), "not the phase's maximum of Xi^2"


def _refused_reference(tmp_path, monkeypatch, **placeholder) -> ConfigError:
    """The error of dec-phase-1_f0.25 reading a placeholder reference made thus."""
    monkeypatch.chdir(tmp_path)
    path = CONTROL / "fmnist_ring_n16_dec-phase-1_f0.25.yaml"
    cfg = load_config(str(path), ["data.download=true"])
    reference = CONTROL / "fmnist_ring_n16_dec-phase-1_none.yaml"
    _placeholder(tmp_path / cfg.consensus.phases[0].reference_run, reference, 16, {0: 1e-3},
                 **placeholder)  # fmt: skip
    with pytest.raises(ConfigError) as info:
        reference_maxima(cfg, 16)
    assert info.value.key == "consensus.phases.0.reference_run"
    return info.value


def test_a_reference_logged_every_fifth_step_without_step_maxima_is_refused(tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """Its rows miss the steps between them: their maximum would sit below Xi^2_max."""
    assert "every step" in str(_refused_reference(tmp_path, monkeypatch, peaks=False))


def test_an_estimate_only_reference_is_refused_for_an_exact_target(tmp_path, monkeypatch):
    error = _refused_reference(tmp_path, monkeypatch, measure_ok=False)
    assert "make the reference run" in str(error)


@pytest.mark.parametrize(
    "change, words",
    [
        (["run.epochs=3"], "run.epochs"),
        (["optim.milestones=[0.4,0.8]"], "optim.milestones"),
        (["data.batch_size=64"], "data.batch_size"),
        (["topology.name=torus"], "topology.name"),
        (["consensus.phases.0.until_epoch=0.5", "consensus.phases.1.until_epoch=1.5"],
         "phase layout"),
    ],
)
def test_a_reference_of_another_recipe_is_refused(tmp_path, monkeypatch, change, words):
    monkeypatch.chdir(tmp_path)
    path = CONTROL / "fmnist_ring_n16_dec-phase-1_f0.25.yaml"
    cfg = load_config(str(path), ["data.download=true"])
    other = tmp_path / "other.yaml"
    base = load_config(str(CONTROL / "fmnist_ring_n16_dec-phase-1_none.yaml"), change)
    other.write_text(to_yaml(base))
    _placeholder(tmp_path / cfg.consensus.phases[0].reference_run, other, 16, {0: 1e-3})
    with pytest.raises(ConfigError) as info:
        reference_maxima(cfg, 16)
    assert info.value.key == "consensus.phases.0.reference_run" and words in str(info.value)
    with pytest.raises(ConfigError, match="world_size"):
        _placeholder(tmp_path / cfg.consensus.phases[0].reference_run,
                     CONTROL / "fmnist_ring_n16_dec-phase-1_none.yaml", 8, {0: 1e-3})  # fmt: skip
        reference_maxima(cfg, 16)

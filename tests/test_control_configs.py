"""The shipped consensus-control configs are valid and match their generator."""

import subprocess
import sys
from pathlib import Path

import pytest

from dsgd_mpi.config import ConfigError, load_config

CONTROL = Path(__file__).resolve().parent.parent / "configs" / "control"
FILES = sorted(CONTROL.glob("*.yaml"))


def test_generator_reproduces_the_committed_files(tmp_path):
    before = {p.name: p.read_text() for p in FILES}
    subprocess.run([sys.executable, str(CONTROL / "generate.py")], check=True)
    after = {p.name: p.read_text() for p in sorted(CONTROL.glob("*.yaml"))}
    assert after == before, "configs/control/*.yaml differ from generate.py's output"
    assert len(FILES) == 27  # (3 dec-phase x 2 factors + 2 guideline + adaptive) x 3 settings


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_control_config_is_valid_up_to_its_reference_run(path, monkeypatch):
    monkeypatch.chdir(CONTROL.parent.parent)
    try:
        cfg = load_config(str(path))
    except ConfigError as exc:  # the reference run has not been produced on this machine
        assert exc.key.endswith("reference_run") and "no such file" in str(exc)
        return
    targets = [p.target for p in cfg.consensus.phases]
    assert len(targets) == 3
    if "adaptive" in targets:
        assert targets == ["adaptive"] * 3
    else:
        controlled = [p for p in cfg.consensus.phases if p.target == "constant"]
        assert len(controlled) == 1 and controlled[0].reference_run is not None

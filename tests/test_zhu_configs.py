"""Zhu et al.'s configs (configs/zhu/): generated from one script, valid, and each one runs.

The CIFAR-10 / ResNet-18 files need the data set and, for pretrained weights, the
internet; here they are validated. A Fashion-MNIST file is run for a few steps by
the simulator on generated files in the real IDX format (4 workers: its batch of
512 per worker is kept).
"""

import subprocess
import sys
from pathlib import Path

import pytest

from dsgd_mpi.config import check_world, load_config
from dsgd_mpi.sim.__main__ import main as sim_main
from tests.shared_runs import fake_fashion_mnist

ROOT = Path(__file__).resolve().parent.parent
ZHU = ROOT / "configs" / "zhu"
CONFIGS = sorted(ZHU.glob("*.yaml"))


def test_generator_reproduces_the_committed_files(tmp_path):
    before = {p.name: p.read_text() for p in CONFIGS}
    subprocess.run([sys.executable, str(ZHU / "generate.py")], check=True, cwd=ROOT)
    after = {p.name: p.read_text() for p in sorted(ZHU.glob("*.yaml"))}
    assert after == before, "configs/zhu/ differs from what generate.py writes"
    assert len(before) == 12


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_is_the_recipe_and_validates(path):
    cfg = load_config(str(path))
    assert cfg.gossip.order == "gossip_first"
    assert cfg.optim.momentum == 0 and cfg.optim.weight_decay == 0
    assert cfg.optim.warmup_steps == 60 and cfg.optim.warmup_from == pytest.approx(0.1)
    assert list(cfg.optim.milestones) == [0.4, 0.8]
    total = cfg.data.batch_size * 16
    assert str(total) in path.stem  # the file name says the total batch
    # lr 0.1 per 64 samples per worker at 16 workers, scaled linearly with the batch
    assert cfg.optim.scale_lr and cfg.optim.lr / cfg.optim.base_batch == pytest.approx(0.1 / 1024)
    if path.stem.startswith("cifar10"):
        assert cfg.model.name == "resnet18" and cfg.data.resize == 56 and cfg.run.steps == 6000
        assert not cfg.data.augment


def test_fashion_mnist_version_runs_a_few_steps(tmp_path):
    # One file in the suite (each run costs ~40 s here); every other file differs only
    # in topology and batch, which the configs test above checks.
    path = ZHU / "fmnist_small_cnn_ring_8192.yaml"
    data = tmp_path / "fmnist"
    fake_fashion_mnist(data, train=4 * 512, test=256)
    overrides = [f"data.root={data}", f"run.out_dir={tmp_path}", "run.steps=2",
                 "optim.warmup_steps=1", "metrics.sharpness_every=0", "metrics.log_every=1"]
    cfg = load_config(str(path), overrides)
    check_world(cfg, 4)
    assert sim_main([str(path), "--workers", "4", *overrides]) == 0
    assert (tmp_path / f"{cfg.run.name}.h5").exists()

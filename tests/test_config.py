"""Tests for dsgd_mpi.config: strict loading, overrides, errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dsgd_mpi.config import (
    Config,
    ConfigError,
    Phase,
    check_world,
    load_config,
    reference,
    to_yaml,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


# (id, yaml text, overrides, expected dotted key)
BAD = [
    ("unknown top key", "bogus: {a: 1}\n", (), "bogus"),
    ("unknown nested key", "optim: {lrr: 0.1}\n", (), "optim.lrr"),
    ("str for int", "data: {batch_size: '32'}\n", (), "data.batch_size"),
    ("float for int", "data: {batch_size: 32.0}\n", (), "data.batch_size"),
    ("bool for int", "run: {seed: true}\n", (), "run.seed"),
    ("negative lr", "optim: {lr: -0.1}\n", (), "optim.lr"),
    ("zero batch", "data: {batch_size: 0}\n", (), "data.batch_size"),
    ("zero epochs", "run: {epochs: 0}\n", (), "run.epochs"),
    ("nan lr", "optim: {lr: .nan}\n", (), "optim.lr"),
    ("milestones not increasing", "optim: {milestones: [0.75, 0.5]}\n", (), "optim.milestones"),
    ("milestone >= 1", "optim: {milestones: [0.5, 1.0]}\n", (), "optim.milestones"),
    ("milestones not a list", "optim: {milestones: 0.5}\n", (), "optim.milestones"),
    ("decay 0", "optim: {decay: 0}\n", (), "optim.decay"),
    ("momentum 1", "optim: {momentum: 1}\n", (), "optim.momentum"),
    ("bad optimizer", "optim: {name: lamb}\n", (), "optim.name"),
    ("bad topology name", "topology: {name: star}\n", (), "topology.name"),
    ("bad device_buffers", "gossip: {device_buffers: maybe}\n", (), "gossip.device_buffers"),
    ("yes is not a bool", "data: {reshuffle: yes}\n", (), "data.reshuffle"),
    ("section not a mapping", "optim: 5\n", (), "optim"),
    ("duplicate key", "optim:\n  lr: 0.1\n  lr: 0.2\n", (), "optim.lr"),
    (
        "phases not increasing",
        "consensus: {phases: [{until_epoch: 2}, {until_epoch: 1}, {}]}\n",
        (),
        "consensus.phases.1.until_epoch",
    ),
    (
        "null until_epoch before the last phase",
        "consensus: {phases: [{}, {until_epoch: 1}]}\n",
        (),
        "consensus.phases.0.until_epoch",
    ),
    (
        "phase ends after the run",
        "run: {epochs: 3}\nconsensus: {phases: [{until_epoch: 5}, {}]}\n",
        (),
        "consensus.phases.0.until_epoch",
    ),
    (
        "last phase ends early",
        "run: {epochs: 3}\nconsensus: {phases: [{until_epoch: 2}]}\n",
        (),
        "consensus.phases.0.until_epoch",
    ),
    ("no phases", "consensus: {phases: []}\n", (), "consensus.phases"),
    (
        "constant without reference",
        "consensus: {phases: [{target: constant}]}\n",
        (),
        "consensus.phases.0.reference",
    ),
    (
        "constant with both references",
        "consensus: {phases: [{target: constant, reference: 1.0, reference_run: x.h5}]}\n",
        (),
        "consensus.phases.0.reference",
    ),
    (
        "reference without constant",
        "consensus: {phases: [{target: adaptive, reference: 1.0}]}\n",
        (),
        "consensus.phases.0.reference",
    ),
    ("factor <= 0", "consensus: {phases: [{factor: 0}]}\n", (), "consensus.phases.0.factor"),
    (
        "factor_unit without constant",
        "consensus: {phases: [{target: adaptive, factor_unit: squared}]}\n",
        (),
        "consensus.phases.0.factor_unit",
    ),
    (
        "factor_unit unknown",
        "consensus: {phases: [{target: constant, reference: 1.0, factor_unit: root}]}\n",
        (),
        "consensus.phases.0.factor_unit",
    ),
    (
        "a fixed trace for avg_sam",
        "topology: {name: complete}\noptim: {perturb: avg_sam, perturb_xi2: 0.1}\n",
        (),
        "optim.perturb_xi2",
    ),
    (
        "a carried graph that is not a topology",
        "topology: {name: complete}\noptim: {perturb: avg_sam, perturb_topology: star}\n",
        (),
        "optim.perturb_topology",
    ),
    (
        "max_rounds 0",
        "consensus: {phases: [{max_rounds: 0}]}\n",
        (),
        "consensus.phases.0.max_rounds",
    ),
    ("ema 1", "consensus: {phases: [{ema: 1}]}\n", (), "consensus.phases.0.ema"),
    ("bad target", "consensus: {phases: [{target: some}]}\n", (), "consensus.phases.0.target"),
    ("unknown phase key", "consensus: {phases: [{foo: 1}]}\n", (), "consensus.phases.0.foo"),
    ("negative exact_every", "metrics: {exact_every: -1}\n", (), "metrics.exact_every"),
    ("train_size 0", "data: {train_size: 0}\n", (), "data.train_size"),
    ("override train_size not a number", "", ("data.train_size=many",), "data.train_size"),
    ("override unknown key", "", ("optim.lrr=0.2",), "optim.lrr"),
    ("override unknown section", "", ("optimizer.lr=0.2",), "optimizer"),
    ("override without '='", "", ("optim.lr",), "optim.lr"),
    ("override without section", "", ("lr=0.2",), "lr"),
    ("override bad type", "", ("optim.lr=abc",), "optim.lr"),
    ("override bad int", "", ("data.batch_size=1.5",), "data.batch_size"),
    ("override below a leaf", "", ("optim.lr.x=1",), "optim.lr.x"),
    ("override index out of range", "", ("consensus.phases.3.target=exact",), "consensus.phases.3"),
    ("override bad phase key", "", ("consensus.phases.0.bogus=1",), "consensus.phases.0.bogus"),
]


@pytest.mark.parametrize(
    ("text", "overrides", "key"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_input_names_the_key(tmp_path: Path, text: str, overrides: tuple, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


def test_bad_value_is_shown() -> None:
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be > 0 \(got -0\.1\)$"):
        load_config(None, ["optim.lr=-0.1"])
    with pytest.raises(ConfigError, match="star"):
        load_config(None, ["topology.name=star"])


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match="valid keys: .*base_batch"):
        load_config(None, ["optim.lrr=1"])


def test_check_world_bipartite_odd_n() -> None:
    cfg = load_config(None, ["topology.name=bipartite_exponential", "data.name=synthetic"])
    check_world(cfg, 4)
    with pytest.raises(ConfigError) as info:
        check_world(cfg, 3)
    assert info.value.key == "topology.name"
    assert "topology.name" in str(info.value)


def test_check_world_missing_reference_run(tmp_path: Path) -> None:
    # A file check, so rank 0's check_world makes it, not the parsing every rank does.
    text = "consensus: {phases: [{target: constant, reference_run: /no/such/run.h5}]}\n"
    cfg = load_config(write(tmp_path, text), ["data.name=synthetic"])
    with pytest.raises(ConfigError) as info:
        check_world(cfg, 4)
    assert info.value.key == "consensus.phases.0.reference_run"
    assert "no such file" in str(info.value)


def test_check_world_missing_data_root(tmp_path: Path) -> None:
    cfg = load_config(None, [f"data.root={tmp_path / 'missing'}"])
    with pytest.raises(ConfigError) as info:
        check_world(cfg, 4)
    assert info.value.key == "data.root"
    assert "data.root" in str(info.value)
    # Fine when the data set is synthetic, will be downloaded, or the root exists.
    check_world(load_config(None, [f"data.root={tmp_path / 'missing'}", "data.download=true"]), 4)
    check_world(load_config(None, ["data.name=synthetic", "data.root=/no/such/dir"]), 4)
    check_world(load_config(None, [f"data.root={tmp_path}"]), 4)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "optim: {lr: [1}\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.run.epochs == 3 and cfg.optim.lr == 0.1 and cfg.optim.base_batch == 64
    assert cfg.optim.milestones == (0.5, 0.75)
    assert cfg.topology.name == "ring" and cfg.gossip.device_buffers == "auto"
    assert cfg.consensus.phases == (Phase(),)
    assert cfg.consensus.phases[0].until_epoch is None
    assert cfg.consensus.phases[0].target == "none"
    assert cfg.checkpoint.dir is None


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing here\n")) == Config()


def test_frozen() -> None:
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_overrides_apply(tmp_path: Path) -> None:
    path = write(tmp_path, "optim: {lr: 0.3, momentum: 0.5}\n")
    cfg = load_config(
        path, ["optim.lr=0.2", "optim.milestones=[0.3, 0.6, 0.9]", "topology.name=torus"]
    )
    assert cfg.optim.lr == 0.2
    assert cfg.optim.momentum == 0.5  # from the file, untouched
    assert cfg.optim.milestones == (0.3, 0.6, 0.9)
    assert cfg.topology.name == "torus"
    # Later overrides win; values are YAML, so `on` stays a string.
    cfg = load_config(None, ["optim.lr=0.2", "optim.lr=0.4", "gossip.device_buffers=on"])
    assert cfg.optim.lr == 0.4 and cfg.gossip.device_buffers == "on"


def test_override_into_phases(tmp_path: Path) -> None:
    cfg = load_config(None, ["consensus.phases.0.target=exact"])
    assert cfg.consensus.phases[0].target == "exact"
    path = write(tmp_path, "consensus: {phases: [{until_epoch: 1}, {target: exact}]}\n")
    cfg = load_config(path, ["consensus.phases.1.max_rounds=4", "consensus.phases.0.factor=2"])
    assert cfg.consensus.phases[1].max_rounds == 4 and cfg.consensus.phases[1].target == "exact"
    assert cfg.consensus.phases[0].factor == 2.0 and cfg.consensus.phases[0].until_epoch == 1.0
    cfg = load_config(None, ["consensus.phases=[{until_epoch: 1.5, target: exact}, {}]"])
    assert [p.target for p in cfg.consensus.phases] == ["exact", "none"]


def test_an_override_changes_one_phase_of_phases_written_with_a_yaml_alias(tmp_path: Path):
    """``- *p`` repeats a phase; YAML loads the repeats as one shared object, so before this
    was fixed an override of one phase's reference_run set all three (the study's
    whole_f0.25 read phase 3's reference in every phase)."""
    text = ("consensus:\n  phases:\n  - &p {target: constant, factor: 0.25, reference: 1.0}\n"
            "  - *p\n  - *p\n")  # fmt: skip
    cfg = load_config(write(tmp_path, text), [f"consensus.phases.{i}.reference={i + 2}"
                                              for i in range(3)])  # fmt: skip
    assert [p.reference for p in cfg.consensus.phases] == [2.0, 3.0, 4.0]
    assert {p.factor for p in cfg.consensus.phases} == {0.25}


def test_override_can_fix_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "optim: {lr: -1}\n")
    assert load_config(path, ["optim.lr=0.5"]).optim.lr == 0.5


def test_exponent_floats(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "optim: {weight_decay: 1e-4, lr: 5E-2}\n"))
    assert isinstance(cfg.optim.weight_decay, float) and cfg.optim.weight_decay == 1e-4
    assert cfg.optim.lr == 0.05
    assert load_config(None, ["optim.weight_decay=5e-4"]).optim.weight_decay == 5e-4


def test_int_accepted_for_float() -> None:
    cfg = load_config(None, ["optim.lr=1", "run.epochs=2"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


def test_constant_with_reference(tmp_path: Path) -> None:
    run = tmp_path / "ref.h5"
    run.write_bytes(b"")
    cfg = load_config(None, [f"consensus.phases=[{{target: constant, reference_run: '{run}'}}]"])
    assert cfg.consensus.phases[0].reference_run == str(run)
    cfg = load_config(None, ["consensus.phases=[{target: constant, reference: 1e-3, factor: 0.5}]"])
    assert cfg.consensus.phases[0].reference == 1e-3


def roundtrip(tmp_path: Path, cfg: Config) -> Config:
    return load_config(write(tmp_path, to_yaml(cfg)))


def test_to_yaml_roundtrips(tmp_path: Path) -> None:
    assert roundtrip(tmp_path, Config()) == Config()
    cfg = load_config(
        None,
        [
            "run.name='1e5'",  # would be a float if written unquoted
            "run.epochs=10",
            "gossip.device_buffers=off",
            "optim.weight_decay=5e-4",
            "optim.milestones=[0.25, 0.5, 0.75]",
            "consensus.phases=[{until_epoch: 2.5, target: adaptive, factor: 0.5}, {target: exact}]",
            "checkpoint.dir=/tmp/ck",
        ],
    )
    assert cfg.run.name == "1e5"
    assert roundtrip(tmp_path, cfg) == cfg


@pytest.mark.parametrize(
    "name", ["quickstart", "cifar10_resnet20_ring", "cifar10_resnet20_complete"]
)
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(str(CONFIGS / f"{name}.yaml"))
    assert cfg.run.name == name
    assert cfg.optim.weight_decay == 1e-4
    if name.startswith("cifar10"):
        assert cfg.data.name == "cifar10" and cfg.model.name == "resnet20"
        assert cfg.run.epochs == 300 and cfg.optim.warmup_epochs == 5
        assert cfg.topology.name == name.rsplit("_", 1)[1]


def test_reference_lists_every_key() -> None:
    table = reference()
    for key in ("run.epochs", "optim.lr", "consensus.phases.N.until_epoch", "checkpoint.dir"):
        assert f"| `{key}` |" in table
    assert "Base learning rate" in table
    lines = table.strip().splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in lines)


def test_config_accepts_exactly_the_topologies_topology_py_defines() -> None:
    import typing

    from dsgd_mpi.schema import TopologyName
    from dsgd_mpi.topology import NAMES

    assert typing.get_args(TopologyName) == NAMES
    for name in NAMES:
        assert load_config(None, [f"topology.name={name}"]).topology.name == name

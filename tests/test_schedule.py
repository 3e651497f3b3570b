"""Tests for dsgd_mpi.schedule: pure lr and phase schedules."""

from __future__ import annotations

import math

import pytest

from dsgd_mpi.config import load_config
from dsgd_mpi.schedule import (
    lr_at,
    milestone_epochs,
    peak_lr,
    phase_at,
    phases,
    step_epoch,
    total_batch,
    total_steps,
)


def test_total_batch_and_scaled_lr() -> None:
    cfg = load_config(None, ["data.batch_size=32", "optim.lr=0.1", "optim.base_batch=64"])
    assert total_batch(cfg, 16) == 512
    assert peak_lr(cfg, 16) == pytest.approx(0.8)
    assert peak_lr(cfg, 1) == pytest.approx(0.05)
    unscaled = load_config(None, ["optim.scale_lr=false"])
    assert peak_lr(unscaled, 16) == 0.1
    with pytest.raises(ValueError):
        total_batch(cfg, 0)


def test_total_steps() -> None:
    cfg = load_config(None, ["data.batch_size=32"])
    assert total_steps(cfg, 97) == 97 * 3
    half = load_config(None, ["run.epochs=0.5"])
    assert total_steps(half, 200) == 100
    assert total_steps(load_config(None, ["run.epochs=0.001"]), 10) == 1  # at least one step
    with pytest.raises(ValueError):
        total_steps(cfg, 0)


def test_step_epoch_is_never_zero() -> None:
    assert step_epoch(0, 100) == 0.01
    assert step_epoch(99, 100) == 1.0
    with pytest.raises(ValueError):
        step_epoch(-1, 100)


def test_warmup_ramps_linearly_to_peak() -> None:
    cfg = load_config(None, ["optim.warmup_epochs=5", "run.epochs=300"])
    peak = peak_lr(cfg, 16)
    spe = 97
    lrs = [lr_at(cfg, 16, step_epoch(s, spe)) for s in range(5 * spe + 3)]
    assert 0 < lrs[0] < peak / 100
    assert all(b > a for a, b in zip(lrs[: 5 * spe], lrs[1 : 5 * spe], strict=False))
    assert lrs[5 * spe - 1] == pytest.approx(peak)  # the last warmup step reaches the peak
    assert all(lr == pytest.approx(peak) for lr in lrs[5 * spe - 1 :])
    assert lr_at(cfg, 16, 2.5) == pytest.approx(peak / 2)


def test_no_warmup_starts_at_peak() -> None:
    cfg = load_config(None)
    assert lr_at(cfg, 4, step_epoch(0, 100)) == pytest.approx(peak_lr(cfg, 4))


def test_decay_at_milestones() -> None:
    cfg = load_config(None, ["run.epochs=300", "optim.milestones=[0.5, 0.75]", "optim.decay=0.1"])
    peak = peak_lr(cfg, 16)
    spe = 97
    last_before = 150 * spe - 1  # ends exactly on epoch 150
    assert lr_at(cfg, 16, step_epoch(last_before, spe)) == pytest.approx(peak)
    assert lr_at(cfg, 16, step_epoch(last_before + 1, spe)) == pytest.approx(peak * 0.1)
    assert lr_at(cfg, 16, 225.0) == pytest.approx(peak * 0.1)
    assert lr_at(cfg, 16, 225.0 + 1 / spe) == pytest.approx(peak * 0.01)
    assert lr_at(cfg, 16, 300.0) == pytest.approx(peak * 0.01)


def test_decay_boundary_survives_float_noise() -> None:
    # 0.3 * 10 is not exactly 3 in binary; the step ending on epoch 3 is still undecayed.
    cfg = load_config(None, ["run.epochs=10", "optim.milestones=[0.3]"])
    for spe in (7, 10, 390):
        assert lr_at(cfg, 1, step_epoch(3 * spe - 1, spe)) == pytest.approx(peak_lr(cfg, 1))
        assert lr_at(cfg, 1, step_epoch(3 * spe, spe)) == pytest.approx(peak_lr(cfg, 1) * 0.1)


def test_default_single_phase() -> None:
    cfg = load_config(None)
    (span,) = phases(cfg)
    assert span.index == 0 and span.start_epoch == 0.0 and span.end_epoch == cfg.run.epochs
    assert span.target == "none"
    assert phase_at((span,), 0.0) is span
    assert phase_at((span,), 1e6) is span


PHASED = [
    "run.epochs=300",
    "consensus.phases=[{until_epoch: 150, target: adaptive, factor: 0.5, max_rounds: 8},"
    " {until_epoch: 225, target: exact}, {target: none}]",
]


def test_phases_cover_the_run() -> None:
    cfg = load_config(None, PHASED)
    spans = phases(cfg)
    assert [s.index for s in spans] == [0, 1, 2]
    assert spans[0].start_epoch == 0.0
    assert spans[-1].end_epoch == cfg.run.epochs
    for a, b in zip(spans, spans[1:], strict=False):
        assert a.end_epoch == b.start_epoch  # no gap, no overlap
        assert a.start_epoch < a.end_epoch
    assert [s.target for s in spans] == ["adaptive", "exact", "none"]
    assert spans[0].factor == 0.5 and spans[0].max_rounds == 8 and spans[0].ema == 0.9


def test_last_phase_with_explicit_end() -> None:
    cfg = load_config(
        None, ["run.epochs=10", "consensus.phases=[{until_epoch: 4}, {until_epoch: 10}]"]
    )
    assert [(s.start_epoch, s.end_epoch) for s in phases(cfg)] == [(0.0, 4.0), (4.0, 10.0)]


def test_phase_at() -> None:
    cfg = load_config(None, PHASED)
    spans = phases(cfg)
    spe = 97
    assert phase_at(spans, step_epoch(0, spe)).index == 0
    assert phase_at(spans, 150.0).index == 0  # the step ending on the boundary
    assert phase_at(spans, 150.0 + 1 / spe).index == 1
    assert phase_at(spans, 225.0).index == 1
    assert phase_at(spans, 225.0 + 1 / spe).index == 2
    assert phase_at(spans, 300.0).index == 2
    assert phase_at(spans, 300.5).index == 2  # a trailing partial step
    for s in range(300 * spe):
        e = step_epoch(s, spe)
        span = phase_at(spans, e)
        assert span.start_epoch < e <= span.end_epoch + 1e-9
    with pytest.raises(ValueError):
        phase_at(spans, -1.0)
    with pytest.raises(ValueError):
        phase_at((), 1.0)


def test_phases_follow_lr_decays() -> None:
    # Phase boundaries at the milestone epochs coincide with the lr decays.
    cfg = load_config(None, ["run.epochs=300", "optim.milestones=[0.5, 0.75]"])
    bounds = milestone_epochs(cfg)
    assert bounds == (150.0, 225.0)
    phased = ", ".join(f"{{until_epoch: {b}}}" for b in bounds)
    cfg = load_config(None, ["run.epochs=300", f"consensus.phases=[{phased}, {{}}]"])
    spans = phases(cfg)
    spe = 97
    for s in range(0, 300 * spe, 13):
        e = step_epoch(s, spe)
        level = round(math.log10(lr_at(cfg, 16, e) / peak_lr(cfg, 16)))
        assert phase_at(spans, e).index == -level


def test_phases_without_boundaries_follow_the_lr_decays():
    from dsgd_mpi.config import ConfigError, load_config

    cfg = load_config(
        None,
        [
            "run.epochs=8",
            "optim.milestones=[0.5,0.75]",
            "consensus.phases=[{target: none}, {target: exact}, {target: none}]",
        ],
    )
    spans = phases(cfg)
    assert [(s.start_epoch, s.end_epoch) for s in spans] == [(0.0, 4.0), (4.0, 6.0), (6.0, 8.0)]
    assert [s.target for s in spans] == ["none", "exact", "none"]
    with pytest.raises(ConfigError) as err:
        load_config(
            None,
            ["optim.milestones=[0.5,0.75]", "consensus.phases=[{target: none}, {target: exact}]"],
        )
    assert err.value.key == "consensus.phases" and "3 phases" in str(err.value)

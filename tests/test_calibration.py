"""Tests for dsgd_mpi.evaluation.calibration: hand-worked values, additivity, statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsgd_mpi.evaluation.calibration import NUM_BINS, PROB_FLOOR, Calibration


def _two_class(conf_and_correct: list[tuple[float, bool]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class probabilities with class 0 on top at confidence c; label 0 iff correct."""
    conf = torch.tensor([c for c, _ in conf_and_correct], dtype=torch.float64)
    probs = torch.stack([conf, 1 - conf], dim=1)
    labels = torch.tensor([0 if ok else 1 for _, ok in conf_and_correct])
    return probs, labels


# Worked by hand with 15 bins of width 1/15:
#   0.90 (right), 0.90 (wrong) -> bin (0.867, 0.933]: n=2, acc 0.5, conf 0.9 -> |.5-.9|*2 = 0.80
#   0.62 (right)               -> bin (0.600, 0.667]: n=1, acc 1,   conf .62 -> 0.38
#   0.55 (right)               -> bin (0.533, 0.600]: n=1, acc 1,   conf .55 -> 0.45
# ECE = (0.80 + 0.38 + 0.45) / 4 = 0.4075; accuracy 3/4;
# NLL = -(ln .9 + ln .1 + ln .62 + ln .55) / 4 (the wrong one has p(label) = 0.1).
HAND = [(0.9, True), (0.9, False), (0.62, True), (0.55, True)]


def test_hand_worked_example() -> None:
    cal = Calibration()
    cal.add(*_two_class(HAND))
    assert cal.count == 4
    assert cal.accuracy == pytest.approx(0.75)
    assert cal.ece == pytest.approx(0.4075)
    assert cal.nll == pytest.approx(-(math.log(0.9 * 0.1 * 0.62 * 0.55)) / 4)


def test_reliability_bins_of_hand_example() -> None:
    cal = Calibration()
    cal.add(*_two_class(HAND))
    conf, acc, count = cal.reliability()
    assert count.shape == conf.shape == acc.shape == (NUM_BINS,)
    assert count[13] == 2 and count[9] == 1 and count[8] == 1 and count.sum() == 4
    assert conf[13] == pytest.approx(0.9) and acc[13] == pytest.approx(0.5)
    assert conf[9] == pytest.approx(0.62) and acc[9] == 1.0
    assert conf[8] == pytest.approx(0.55) and acc[8] == 1.0
    empty = count == 0
    assert np.isnan(conf[empty]).all() and np.isnan(acc[empty]).all()


def test_bin_edges_are_right_closed() -> None:
    """Guo et al.'s bins are (lo, hi]: 2/3 falls in bin 9, 1.0 in the last, 1/2 in bin 7."""
    cal = Calibration()
    cal.add(*_two_class([(2 / 3, True), (1.0, True), (0.5, False)]))
    count = cal.reliability()[2]
    assert count[9] == 1 and count[14] == 1 and count[7] == 1


def test_nll_matches_cross_entropy_of_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 7, generator=gen)
    labels = torch.randint(0, 7, (200,), generator=gen)
    cal = Calibration()
    cal.add(logits.softmax(1), labels)
    assert cal.nll == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert cal.accuracy == pytest.approx((logits.argmax(1) == labels).double().mean().item())


def test_zero_probability_on_the_label_is_floored() -> None:
    cal = Calibration()
    cal.add(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([1, 0]))
    assert math.isfinite(cal.nll)
    assert cal.nll == pytest.approx(-math.log(PROB_FLOOR) / 2)


def test_sums_add_across_batches_and_ranks() -> None:
    """What the ranks do: disjoint parts summed equal the whole, whatever the batching."""
    gen = torch.Generator().manual_seed(1)
    probs = torch.randn(300, 10, generator=gen).mul(2).softmax(1)
    labels = torch.randint(0, 10, (300,), generator=gen)
    whole = Calibration()
    whole.add(probs, labels)
    parts = [Calibration(), Calibration(), Calibration()]
    for i, (p, y) in enumerate(zip(probs.split(32), labels.split(32), strict=True)):
        parts[i % 3].add(p, y)
    summed = Calibration.from_vector(sum(part.vector() for part in parts))
    np.testing.assert_allclose(summed.vector(), whole.vector(), rtol=1e-12, atol=1e-12)
    assert summed.count == 300
    assert summed.ece == pytest.approx(whole.ece, rel=1e-12)
    assert summed.nll == pytest.approx(whole.nll, rel=1e-12)
    assert summed.accuracy == whole.accuracy


def test_vector_layout_and_roundtrip() -> None:
    cal = Calibration()
    cal.add(*_two_class(HAND))
    v = cal.vector()
    assert v.dtype == np.float64 and v.shape == (cal.vector_length,) == (3 + 3 * NUM_BINS,)
    assert v[2] == 4  # count, third entry
    back = Calibration.from_vector(torch.from_numpy(v))
    assert back.num_bins == NUM_BINS and back.ece == cal.ece
    v[:] = 0  # the rebuilt accumulator must not alias the caller's array
    assert Calibration.from_vector(cal.vector()).count == 4
    with pytest.raises(ValueError, match="Calibration vector"):
        Calibration.from_vector(np.zeros(10))


def test_empty_accumulator() -> None:
    cal = Calibration()
    assert cal.count == 0
    assert math.isnan(cal.accuracy) and math.isnan(cal.nll) and math.isnan(cal.ece)
    assert cal.vector().shape == (cal.vector_length,) and not cal.vector().any()


def test_calibrated_predictions_have_small_ece_and_overconfident_large() -> None:
    """Statistics, not arithmetic: right with probability c -> ECE ~ 0; c^2 -> ECE ~ E[c - c^2]."""
    gen = torch.Generator().manual_seed(2)
    n = 200_000
    conf = 0.5 + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    honest, overconfident = Calibration(), Calibration()
    honest.add(*_labelled(conf, u < conf))
    overconfident.add(*_labelled(conf, u < conf**2))
    assert honest.ece < 0.01
    # E[c - c^2] for c ~ U(0.5, 1) is 0.75 - 7/12 = 1/6; binning can only lower it slightly.
    assert overconfident.ece == pytest.approx(1 / 6, abs=0.01)


def _labelled(conf: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.stack([conf, 1 - conf], dim=1)
    return probs, (~right).long()


def test_add_never_reads_the_device() -> None:
    """On the meta device any host copy (.item(), float(), numpy) raises: add must do none."""
    cal = Calibration()
    probs = torch.randn(16, 10, device="meta").softmax(1)
    labels = torch.zeros(16, dtype=torch.long, device="meta")
    cal.add(probs, labels)
    cal.add(probs, labels)
    with pytest.raises(NotImplementedError):
        cal.vector()


def test_float32_probs_and_other_bin_counts() -> None:
    cal = Calibration(num_bins=10)
    probs, labels = _two_class(HAND)
    cal.add(probs.float(), labels)
    assert cal.vector_length == 33
    assert cal.accuracy == 0.75
    assert Calibration.from_vector(cal.vector()).num_bins == 10


def test_bad_shapes() -> None:
    with pytest.raises(ValueError, match="probs must be"):
        Calibration().add(torch.ones(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="probs must be"):
        Calibration().add(torch.ones(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_bins"):
        Calibration(num_bins=0)

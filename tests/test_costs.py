"""Costs that must not be paid when nothing needs them, and clocks that charge the right
phase. Counted, not timed: no wall-clock threshold here (see ``dsgd_mpi.bench``)."""

from __future__ import annotations

import math

import pytest
import torch

from dsgd_mpi import consensus as consensus_mod
from dsgd_mpi.consensus import Consensus, Measure
from dsgd_mpi.replica import Buffers
from dsgd_mpi.schedule import PhaseSpan
from dsgd_mpi.sim.group import SimGroup
from dsgd_mpi.topology import Topology

N, D = 4, 1000


class CountingGroup(SimGroup):
    """The simulator's group, counting the elements of its vector reductions (x̄ of the
    exact measure: D; S x̄ of the sketch: k)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.reduced = 0

    def sum_(self, parts, out, identical=False):
        self.reduced += out.numel()
        return super().sum_(parts, out, identical)


def _setup(measure: str):
    group = CountingGroup(N)
    g = torch.Generator().manual_seed(0)
    flats = [torch.randn(D, generator=g) for _ in range(N)]
    buffers = Buffers(flats)
    topology = Topology("ring", N)
    return group, buffers, Consensus(group, buffers, topology, Measure(measure, group, buffers))


NONE = PhaseSpan(0, 0.0, 1.0, "none", 1.0, None, None, 1, 0.9)
CONSTANT = PhaseSpan(0, 0.0, 1.0, "constant", 1.0, 1e-9, None, 3, 0.9)


@pytest.mark.parametrize("measure", ["exact", "sketch", "estimate"])
def test_an_uncontrolled_step_without_a_row_skips_the_measure(measure):
    group, buffers, consensus = _setup(measure)
    before = [f.clone() for f in buffers.flats]
    skipped = consensus.communicate(NONE, target=math.inf, step=0, measure=False)
    assert group.reduced == 0  # no x̄, no sketch of x̄
    assert math.isnan(skipped.measured) and skipped.rounds == 1
    # The same round measured (a fresh copy of the replicas) moves them the same way.
    group2, buffers2, consensus2 = _setup(measure)
    for f, b in zip(buffers2.flats, before, strict=True):
        f.copy_(b)
    measured = consensus2.communicate(NONE, target=math.inf, step=0, measure=True)
    # The fused kernel that also measures may round the estimate differently.
    assert skipped.estimate == pytest.approx(measured.estimate, rel=1e-12)
    for a, b in zip(buffers.flats, buffers2.flats, strict=True):
        assert torch.equal(a, b)
    assert math.isfinite(measured.measured)
    assert group2.reduced == {"exact": D, "sketch": 4096, "estimate": 0}[measure]


def test_a_controlled_phase_measures_whatever_the_caller_says():
    group, _, consensus = _setup("exact")
    out = consensus.communicate(CONSTANT, target=1e-9, step=0, measure=False)
    assert group.reduced == D and math.isfinite(out.measured) and out.rounds == 3


def test_the_clock_waits_for_the_gpu_before_reading_the_time(monkeypatch):
    """GPU kernels are asynchronous: a clock that does not wait for them charges the
    compute of a step to its gossip (the first thing that synchronizes)."""
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    consensus_mod.clock(torch.device("cpu"))
    assert waited == []
    consensus_mod.clock(torch.device("cuda", 1))
    assert waited == [torch.device("cuda", 1)]

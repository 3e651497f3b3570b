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
def test_an_uncontrolled_step_measures_once_a_step_and_no_more(measure):
    """Every step of a none phase is measured: its largest value over every step is what a
    later run's constant target reads (consensus_measured_max). The price is one vector
    reduction a step (x̄: d floats, S x̄: k), none under the estimate."""
    group, _, consensus = _setup(measure)
    out = consensus.communicate(NONE, target=math.inf, step=0)
    assert math.isfinite(out.measured) and out.rounds == 1
    assert group.reduced == {"exact": D, "sketch": 4096, "estimate": 0}[measure]


def test_a_controlled_phase_reduces_x_bar_once_a_step_whatever_its_rounds():
    group, _, consensus = _setup("exact")
    out = consensus.communicate(CONSTANT, target=1e-9, step=0)
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

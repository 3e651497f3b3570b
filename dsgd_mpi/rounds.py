"""One gossip round, planned and mixed the same way for every backend.

A replica's part of round t: its exchanges (whom it sends to, whom it hears,
with what weight) from the topology, the bytes it sends, and the mixing pass
over the buffer's chunks, each chunk mixed by :func:`dsgd_mpi.mixing.mix`
with the measure's arguments (x̄'s slice for the exact measure, the buckets
for the sketch) once the neighbours' pieces are there. The MPI Gossiper and
the simulator differ only in how those pieces arrive: ``fetch(c, lo, hi)``
returns them for chunk ``c`` (after its requests complete, or copied from the
other replicas' buffers as they were before the round).

Pure: no MPI, so the simulator uses it without importing mpi4py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from dsgd_mpi import mixing
from dsgd_mpi.topology import Exchange, Topology

#: The pieces of chunk c (bounds lo, hi) from each exchange, in exchange order.
Fetch = Callable[[int, int, int], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class RoundPlan:
    """Replica ``rank``'s part of one round."""

    exchanges: tuple[Exchange, ...]
    bytes_sent: int
    """What this replica sends in the round: its whole buffer once per exchange."""

    @property
    def weights(self) -> list[float]:
        return [e.weight for e in self.exchanges]


def plan(topology: Topology, rank: int, t: int, numel: int) -> RoundPlan:
    """The exchanges of ``rank`` at global round ``t`` for a buffer of ``numel`` floats."""
    exchanges = tuple(topology.exchanges(rank, t))
    return RoundPlan(exchanges, 4 * numel * len(exchanges))


def measure_of(xbar: torch.Tensor | None, sketch: torch.Tensor | None, seed: int) -> dict:
    """The measure a round accumulates: ``xbar`` (exact), ``sketch`` buckets (sketch)."""
    out: dict = {}
    if xbar is not None:
        out["xbar"] = xbar
    if sketch is not None:
        out["sketch"], out["seed"] = sketch, seed
    return out


def kernel_args(measure: Mapping, lo: int, hi: int) -> dict:
    """The measure's slice of the measured chunk [lo, hi), for the mixing kernels."""
    args: dict = {}
    if measure.get("xbar") is not None:
        args["xbar"] = measure["xbar"][lo:hi]
    if measure.get("sketch") is not None:
        args["sketch"] = (measure["sketch"], lo, measure.get("seed", 0))
    return args


def mix_chunks(
    x: torch.Tensor, chunks: Sequence[tuple[int, int, bool]], weights: Sequence[float],
    scratch: torch.Tensor, fetch: Fetch, measure: Mapping,
) -> tuple[float, float]:  # fmt: skip
    """Mix ``x`` in place chunk by chunk; returns ``||x' - x||^2`` and the measure's share
    over the measured chunks. A round without exchanges leaves x as it is (x + 0) and
    still measures it. The sketch's buckets are overwritten with S x'."""
    if measure.get("sketch") is not None:
        measure["sketch"].zero_()
    estimate = distance = 0.0
    for c, (lo, hi, measured) in enumerate(chunks):
        received = fetch(c, lo, hi)
        args = kernel_args(measure, lo, hi) if measured else {}
        if not received and not args:
            continue
        e, d = mixing.mix(x[lo:hi], received, weights, scratch[: hi - lo], **args)
        if measured:
            estimate, distance = estimate + e, distance + d
    return estimate, distance

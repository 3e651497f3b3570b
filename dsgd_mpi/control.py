"""Consensus targets per phase (DESIGN.md "Targets").

Every rank must compute the *same* target, or ranks would leave the gossip loop
after different numbers of rounds and deadlock; so every input here is either
from the config, from a reference file read by rank 0 and broadcast, or reduced
over ranks before it arrives.

    none      inf: one round per step
    constant  factor * reference  (a number, or the phase's largest distance
              in an uncontrolled reference run's HDF5 file)
    adaptive  factor * lr^2 * EMA(mean over ranks of ||g_i||^2), EMA within the phase
    exact     0: all-reduce average (C-SGD) for the phase
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dsgd_mpi.config import Config, ConfigError
from dsgd_mpi.schedule import PhaseSpan, phases


class TargetPolicy:
    def __init__(self, spans: Sequence[PhaseSpan], reference_maxima: dict[int, float]) -> None:
        self.spans = tuple(spans)
        self.reference_maxima = dict(reference_maxima)
        self._ema: dict[int, float] = {}

    def needs_gradient_norm(self, phase: PhaseSpan) -> bool:
        return phase.target == "adaptive"

    def observe(self, phase: PhaseSpan, mean_sq_grad: float) -> None:
        """Feed this step's rank-averaged ||g||^2 into the phase's EMA."""
        old = self._ema.get(phase.index)
        self._ema[phase.index] = (
            mean_sq_grad if old is None else phase.ema * old + (1 - phase.ema) * mean_sq_grad
        )

    def target(self, phase: PhaseSpan, lr: float) -> float:
        if phase.target == "none":
            return math.inf
        if phase.target == "exact":
            return 0.0
        if phase.target == "adaptive":
            return phase.factor * lr**2 * self._ema.get(phase.index, math.inf)
        reference = phase.reference
        if reference is None:
            reference = self.reference_maxima[phase.index]
        return phase.factor * reference

    def state(self) -> dict:
        return {"ema": dict(self._ema)}

    def load_state(self, state: dict) -> None:
        self._ema = {int(k): float(v) for k, v in state["ema"].items()}


def reference_maxima(cfg: Config, world_size: int) -> dict[int, float]:
    """Largest consensus distance of each phase in the reference runs (rank 0 only).

    Uses the reference run's *estimate*, the quantity the control loop compares
    with its target (taking the exact distance instead gave targets in other
    units: on a 16-ring the exact distance stayed ~4x above a target the
    estimate met). The reference must come from the same topology and world size.
    Raises ConfigError naming ``consensus.phases.K.reference_run``.
    """
    import h5py

    out: dict[int, float] = {}
    for span in phases(cfg):
        if span.target != "constant" or span.reference is not None:
            continue
        key = f"consensus.phases.{span.index}.reference_run"
        try:
            with h5py.File(span.reference_run, "r", locking=False) as f:
                attrs = dict(f.attrs)
                steps = f["steps"]
                epoch = steps["epoch"][:]
                estimate = steps["consensus_estimate"][:]
        except (OSError, KeyError) as exc:
            raise ConfigError(
                key, f"cannot read a run's steps from {span.reference_run}: {exc}"
            ) from None
        for attr, want in (("topology", cfg.topology.name), ("world_size", world_size)):
            got = attrs.get(attr)
            got = got.decode() if isinstance(got, bytes) else got
            if got is None or str(got) != str(want):
                raise ConfigError(key, f"reference run has {attr}={got}, this run has {want}")
        inside = (epoch > span.start_epoch) & (epoch <= span.end_epoch + 1e-9)
        values = estimate[inside]
        values = values[~np.isnan(values)]
        if values.size == 0:
            raise ConfigError(key, f"reference run logged no consensus distance in epochs "
                                   f"({span.start_epoch:g}, {span.end_epoch:g}]")  # fmt: skip
        out[span.index] = float(values.max())
    return out

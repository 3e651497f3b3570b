"""Consensus targets per phase (DESIGN.md "Targets").

Every rank must compute the *same* target, or ranks would leave the gossip loop
after different numbers of rounds and deadlock; so every input here is either
from the config, from a reference file read by rank 0 and broadcast, or reduced
over ranks before it arrives.

    none      inf: one round per step
    constant  factor^2 * reference  (Kong's unit: Xi <= factor * Xi_max), or with
              factor_unit: squared, factor * reference; the reference is a number
              or the phase's largest value of the measure over every step of an
              uncontrolled reference run's HDF5 file, in the measure's squared unit
    adaptive  factor * lr^2 * EMA(mean over ranks of ||g_i||^2), EMA within the phase
    exact     0: all-reduce average (C-SGD) for the phase

Every target is in the measure's squared unit (Xi^2, or e2 for the estimate),
the unit of ``/steps/target``; :func:`describe` says each phase's in words.
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
        return phase.scale * reference

    def state(self) -> dict:
        return {"ema": dict(self._ema)}

    def load_state(self, state: dict) -> None:
        self._ema = {int(k): float(v) for k, v in state["ema"].items()}


def describe(span: PhaseSpan, measure: str) -> str:
    """One phase's target in words, with its unit: what the run file records."""
    q = "e" if measure == "estimate" else "Xi"
    if span.target == "none":
        return "none: one gossip round a step"
    if span.target == "exact":
        return "exact: all-reduce average (C-SGD)"
    if span.target == "adaptive":
        return f"adaptive: {q}^2 <= {span.factor:g} lr^2 EMA(mean |g_i|^2)"
    given = span.reference is not None
    ref = f"x {span.reference:g}" if given else f"{q}^2_max"
    if span.factor_unit == "distance":
        root = f"x sqrt({span.reference:g})" if given else f"{q}_max"
        return f"constant: {q} <= {span.factor:g} {root} ({q}^2 <= {span.scale:g} {ref})"
    return f"constant: {q}^2 <= {span.factor:g} {ref}"


def target_unit(measure: str) -> str:
    """The unit of ``/steps/target`` (and of the measure it is compared with)."""
    if measure == "estimate":
        return "e2: squared movement of a round, (1/n) sum_i |x_i' - x_i|^2"
    return "Xi^2: squared consensus distance, (1/n) sum_i |x_i - xbar|^2"


#: Keys a reference run must share with the run that takes its maxima as targets.
SAME_RECIPE = (("run", "epochs"), ("optim", "milestones"), ("data", "batch_size"),
               ("topology", "name"))  # fmt: skip


def reference_maxima(cfg: Config, world_size: int) -> dict[int, float]:
    """Largest value of the run's consensus measure in each phase of its reference runs.

    Rank 0 only. The maximum is of the *same measure* the control loop compares
    with its target (``consensus.measure``): the estimate e2, or the distance
    Xi^2 (an exact run's measured values, or the exact distance logged at every
    step of the phase; a sketched target compares with either). A reference of
    another world size, recipe or phase layout, or one that did not log the
    measure at every logged step of the phase, is refused before training with a
    ConfigError naming ``consensus.phases.K.reference_run``.
    """
    import h5py
    import yaml

    out: dict[int, float] = {}
    spans = phases(cfg)
    for span in spans:
        if span.target != "constant" or span.reference is not None:
            continue
        key = f"consensus.phases.{span.index}.reference_run"
        try:
            with h5py.File(span.reference_run, "r", locking=False) as f:
                attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in f.attrs.items()}
                columns = {k: f["steps"][k][()] for k in f["steps"]}
        except (OSError, KeyError) as exc:
            raise ConfigError(
                key, f"cannot read a run's steps from {span.reference_run}: {exc}"
            ) from None
        if str(attrs.get("world_size")) != str(world_size):
            raise ConfigError(key, f"reference run has world_size={attrs.get('world_size')}, "
                                   f"this run has {world_size}")  # fmt: skip
        ref_cfg = yaml.safe_load(str(attrs.get("config", ""))) or {}
        _same_recipe(cfg, ref_cfg, spans, key)
        if "epoch" not in columns:
            raise ConfigError(key, f"{span.reference_run} has no /steps/epoch")
        epoch = columns["epoch"]
        inside = (epoch > span.start_epoch + 1e-9) & (epoch <= span.end_epoch + 1e-9)
        if not inside.any():
            raise ConfigError(key, f"reference run logged no step in epochs "
                                   f"({span.start_epoch:g}, {span.end_epoch:g}]")  # fmt: skip
        values = _reference_values(cfg.consensus.measure, ref_cfg, columns, inside, key,
                                   span.reference_run)  # fmt: skip
        out[span.index] = float(values.max())
    return out


def _same_recipe(cfg: Config, ref: dict, spans, key: str) -> None:
    here = {
        "run": {"epochs": cfg.run.epochs}, "optim": {"milestones": list(cfg.optim.milestones)},
        "data": {"batch_size": cfg.data.batch_size}, "topology": {"name": cfg.topology.name},
    }  # fmt: skip
    for section, name in SAME_RECIPE:
        mine, theirs = here[section][name], (ref.get(section) or {}).get(name)
        if theirs is None or (list(theirs) if isinstance(theirs, list) else theirs) != mine:
            raise ConfigError(key, f"reference run has {section}.{name}={theirs}, this run has "
                                   f"{mine}: make the reference with the same recipe")  # fmt: skip
    mine, theirs = [s.end_epoch for s in spans], _phase_ends(ref)
    if len(mine) != len(theirs) or not np.allclose(mine, theirs):
        raise ConfigError(
            key, f"reference run's phases end at epochs {theirs}, this run's at {mine}: "
            "the reference must have the same phase layout",
        )  # fmt: skip


def _phase_ends(ref: dict) -> list[float]:
    """Where the phases of a reference run's config end, in epochs (as ``phases`` does)."""
    epochs = float(ref["run"]["epochs"])
    ps = (ref.get("consensus") or {}).get("phases") or [{}]
    if len(ps) > 1 and all(p.get("until_epoch") is None for p in ps):
        return [m * epochs for m in ref["optim"]["milestones"]] + [epochs]
    return [float(p.get("until_epoch") or epochs) for p in ps[:-1]] + [epochs]


def _reference_values(measure: str, ref: dict, columns: dict, inside: np.ndarray, key: str,
                      path: str) -> np.ndarray:  # fmt: skip
    """The reference's values of ``measure`` covering every step of the phase, or refuse.

    Rows carry the largest value of every step since the previous row (a row ends
    each phase), so their maximum is the phase's; a file without those columns
    serves only if it logged the measure at every step.
    """
    ref_measure = (ref.get("consensus") or {}).get("measure", "estimate")
    if measure == "estimate":
        candidates = ["consensus_estimate_max", "consensus_estimate"]
    elif ref_measure in ("exact", "sketch") and measure in ("exact", "sketch"):
        candidates = ["consensus_measured_max", "consensus_measured", "consensus_exact"]
    else:
        candidates = ["consensus_exact"]
    every_step = _every_step(columns, inside)
    for name in candidates:
        values = columns.get(name)
        if values is None or not np.isfinite(values[inside]).all():
            continue
        if name.endswith("_max") or every_step:
            return values[inside]
    wanted = "the estimate" if measure == "estimate" else "the exact distance"
    raise ConfigError(
        key,
        f"{path} does not hold {wanted} over every step of this phase (its measure: "
        f"{ref_measure}); make the reference run with this version, "
        f"consensus.measure={measure} and target none in this phase (or log every step)",
    )


def _every_step(columns: dict, inside: np.ndarray) -> bool:
    """Whether the rows of the phase, with the rows on either side, are consecutive steps
    from step 1 or from the last step of the previous phase."""
    steps = columns.get("step")
    index = np.flatnonzero(inside)
    if steps is None or not len(index):
        return False
    lo, hi = index[0], index[-1]
    window = steps[max(lo - 1, 0) : hi + 2]
    return bool((lo > 0 or steps[0] == 1) and (np.diff(window) == 1).all())

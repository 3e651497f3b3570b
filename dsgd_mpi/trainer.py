"""The training loop: local update, gossip until the phase's target, log, evaluate.

One step (DESIGN.md): each replica's gradient on its own batch and optimizer
step (``gossip.local_steps`` of them between communications), then gossip
rounds until the consensus measure meets the current phase's target or
``max_rounds`` is reached; ``topology: complete`` and ``target: exact`` phases
average exactly with an Allreduce (C-SGD). The same loop drives the MPI ranks
(one replica each) and the one-process simulator (all of them): every
collective goes through ``group``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from dsgd_mpi import checkpoint, schedule
from dsgd_mpi import config as config_mod
from dsgd_mpi.config import Config
from dsgd_mpi.consensus import Communication, Consensus, Diverged, Measure, clock
from dsgd_mpi.control import TargetPolicy
from dsgd_mpi.evaluation.evaluate import Evaluator
from dsgd_mpi.group import Group
from dsgd_mpi.metrics import MetricsWriter
from dsgd_mpi.perturb import Perturbation
from dsgd_mpi.replica import Replicas
from dsgd_mpi.topology import Topology

#: Running totals logged with every row (whole-run communication cost).
TOTALS = ("gossip_rounds", "bytes_sent", "time_compute", "time_gossip", "time_allreduce")
#: Largest value of every step since the previous row (rows end each phase): a reference
#: run's phase maximum is over every step, not only the logged ones.
PEAKS = ("consensus_estimate", "consensus_measured")


class Trainer:
    def __init__(
        self,
        cfg: Config,
        group: Group,
        replicas: Replicas,
        evaluator: Evaluator,
        writer: MetricsWriter,
        log: Callable[[str], None],
        policy: TargetPolicy,
        timeline: schedule.Timeline,
        checkpoints: checkpoint.Checkpointer,
        perturbation: Perturbation | None = None,
    ) -> None:
        self.cfg, self.group, self.replicas, self.evaluator = cfg, group, replicas, evaluator
        self.perturbation = perturbation or Perturbation()
        self.writer, self.log, self.policy, self.checkpoints = writer, log, policy, checkpoints
        self.n = group.size
        topology = Topology(cfg.topology.name, self.n, seed=cfg.topology.seed)
        c = cfg.consensus
        measure = Measure(c.measure, group, replicas, c.sketch_size, cfg.run.seed)
        self.consensus = Consensus(group, replicas, topology, measure)
        self.timeline = timeline
        self.spe = timeline.steps_per_epoch
        self.total_steps = timeline.total_steps
        self.step = 0
        self.totals = dict.fromkeys(TOTALS, 0.0)
        self.peaks = dict.fromkeys(PEAKS, math.nan)
        self.clock = time.perf_counter()
        self.last_eval: dict = {}

    # -- the story -------------------------------------------------------------
    def run(self) -> dict | None:
        """Train to the end (returns the last evaluation) or until a stop signal (None)."""
        self.replicas.start(self.step)
        self.perturbation.start(self.step)
        while self.step < self.total_steps:
            self.train_step()
            self._maybe_evaluate()
            save, stop = self.checkpoints.due(self.step, final=self.step == self.total_steps)
            if save:
                self.save_checkpoint()
            if stop:
                self.writer.close(finished=False)
                return None
        self.writer.close(finished=True)
        return self.last_eval

    def train_step(self) -> None:
        """One step: gradients, update and communication, a log row when due.

        D-SGD: local_first mixes the updated parameters (Kong et al.); gossip_first
        mixes x^t, then applies the gradient taken at x^t (Zhu et al.). C-SGD (an
        exact phase, or complete), in either order: the replicas agree before the
        gradient (an average first, if gossip was the last communication), so every
        gradient is taken at x̄; the average after the update makes them agree again.
        """
        phase, lr = self.timeline.phase(self.step), self.timeline.lr(self.step)
        communicating = (self.step + 1) % self.cfg.gossip.local_steps == 0
        averaging = communicating and self.consensus.averages(phase)
        first = communicating and not averaging and self.cfg.gossip.order == "gossip_first"
        device = self.replicas.flats[0].device
        t0 = clock(device)  # GPU work queued before is not this step's
        stats = Communication()
        if averaging and not self._agreeing(self.step):
            stats = self.consensus.average()
        adaptive = self.policy.needs_gradient_norm(phase)
        eps = self.perturbation.draw(self.step)  # avg-SAM: from the D-SGD run carried beside
        self.replicas.gradients(self.step, grad_norm=adaptive, eps=eps)
        self.perturbation.step(self.step, lr)
        if adaptive:  # the target must be the same on every replica: reduce first
            self.policy.observe(phase, float(self.group.sum(self.replicas.grad_sq())[0]) / self.n)
        logged = self._row_due(phase, self.step + 1)
        if first:
            stats = stats.then(self.communicate(phase, self.policy.target(phase, lr), logged))
        self.replicas.apply(lr)
        if communicating and not first:
            stats = stats.then(self.communicate(phase, self.policy.target(phase, lr), logged))
        elif first:
            stats.distance = math.nan  # the update moved the replicas since it was measured
        time_compute = clock(device) - t0 - stats.time_gossip - stats.time_allreduce
        self.step += 1
        self._account(stats, time_compute)
        if logged:
            self.log_step(self.timeline.epoch(self.step - 1), phase.index, lr, stats, time_compute)

    def _agreeing(self, step: int) -> bool:
        """Whether the replicas' last communication before ``step`` made them equal: an
        exact average, or none yet (they start equal). Local steps since then are local
        SGD's own drift. A function of the step, so a resumed run decides the same."""
        last = step // self.cfg.gossip.local_steps * self.cfg.gossip.local_steps - 1
        return last < 0 or self.consensus.averages(self.timeline.phase(last))

    def communicate(self, phase: schedule.PhaseSpan, target: float,
                    logged: bool = False) -> Communication:  # fmt: skip
        try:
            return self.consensus.communicate(phase, target, self.step, record=logged)
        except Diverged as exc:
            raise FloatingPointError(
                f"parameters diverged at step {self.step + 1}: {exc}. "
                f"Last good checkpoint: {self._last_good()}"
            ) from None

    def _row_due(self, phase: schedule.PhaseSpan, step: int) -> bool:
        """Whether ``step`` (steps done) gets a row: on log_every and exact_every steps, at
        the end of the run and of each phase."""
        m = self.cfg.metrics
        exact_due = bool(m.exact_every) and step % m.exact_every == 0
        last = step == self.total_steps
        phase_ends = not last and self.timeline.phase(step).index != phase.index
        return step % m.log_every == 0 or exact_due or last or phase_ends

    def _maybe_evaluate(self) -> None:
        """Every ``eval_every`` epochs (fractions allowed, as steps), at the end of the run,
        and whenever the sharpness is due (``sharpness_every`` epochs, 0: never)."""
        m, last = self.cfg.metrics, self.step == self.total_steps
        sharpness = bool(m.sharpness_every) and (last or self._due(m.sharpness_every))
        if not (last or sharpness or self._due(m.eval_every)):
            return
        row = self.evaluator(self.step, self.timeline.epoch(self.step - 1), sharpness)
        self.writer.log_eval(row)
        self.last_eval = {k: v for k, v in row.items() if np.ndim(v) == 0}
        sharp = ""
        if sharpness:
            sharp = (f"  lambda_max {row['sharpness_lambda_max']:.4g} "
                     f"trace {row['sharpness_trace']:.4g}")  # fmt: skip
        local = ""
        if m.eval_local:
            local = (f"  local models: {100 * row['local_acc_min']:.1f}-"
                     f"{100 * row['local_acc_max']:.1f}%  ensemble "
                     f"{100 * row['ensemble_acc']:.2f}% ECE {row['ensemble_ece']:.3f}")  # fmt: skip
        self.log(
            f"eval   epoch {row['epoch']:6.2f}  averaged model: test acc "
            f"{100 * row['test_acc']:.2f}%  loss {row['test_loss']:.4f}  ECE "
            f"{row['test_ece']:.3f}{local}{sharp}"
        )

    def _due(self, every_epochs: float) -> bool:
        return self.step % max(1, round(every_epochs * self.spe)) == 0

    # -- measurement -----------------------------------------------------------
    def _account(self, stats: Communication, time_compute: float) -> None:
        self.totals["gossip_rounds"] += stats.rounds
        self.totals["bytes_sent"] += stats.bytes_sent
        self.totals["time_compute"] += time_compute
        self.totals["time_gossip"] += stats.time_gossip
        self.totals["time_allreduce"] += stats.time_allreduce
        for name, value in (("consensus_estimate", stats.estimate),
                            ("consensus_measured", stats.measured)):  # fmt: skip
            self.peaks[name] = float(np.fmax(self.peaks[name], value))

    def log_step(self, epoch: float, phase: int, lr: float, stats: Communication,
                 time_compute: float) -> None:  # fmt: skip
        every = self.cfg.metrics.exact_every
        exact = math.nan
        if every and self.step % every == 0:
            t0 = time.perf_counter()
            exact = self._exact_distance(stats)
            stats.time_allreduce += time.perf_counter() - t0
            self.totals["time_allreduce"] += time.perf_counter() - t0
        sums = self.group.sum(self.replicas.take_sums())  # since the last row
        loss, acc = sums[0] / max(sums[2], 1), sums[1] / max(sums[2], 1)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss} by step {self.step}. "
                f"Last good checkpoint: {self._last_good()}"
            )
        bound = math.nan if stats.exact_phase else self.consensus.bound(stats.estimate)
        row = dict(
            step=self.step, epoch=epoch, phase=phase, lr=lr, train_loss=loss, train_acc=acc,
            consensus_estimate=stats.estimate, consensus_measured=stats.measured,
            consensus_exact=exact, consensus_bound=bound, gossip_rounds=stats.rounds,
            target=stats.target, bytes_sent=stats.bytes_sent, time_compute=time_compute,
            time_gossip=stats.time_gossip, time_allreduce=stats.time_allreduce,
            **{f"{k}_total": v for k, v in self.totals.items()},
            **{f"{k}_max": v for k, v in self.peaks.items()},
        )  # fmt: skip
        self.peaks = dict.fromkeys(PEAKS, math.nan)
        self.writer.log_step(row)
        rate = self._samples_per_second()
        name = {"estimate": "e2", "exact": "Xi2", "sketch": "Xi2~"}[self.consensus.measure.name]
        self.log(
            f"epoch {epoch:6.2f}  step {self.step:>6}/{self.total_steps}  loss {loss:.4f}  "
            f"acc {100 * acc:5.1f}%  {name} {stats.measured:.3e}  rounds {stats.rounds}  "
            f"lr {lr:.4f}  {rate:,.0f} samples/s"
        )

    def _exact_distance(self, stats: Communication) -> float:
        """Xi^2 of the replicas as this step left them: measured by the gossip loop when its
        last round was the step's last change, else one full-vector reduction now."""
        if math.isfinite(stats.distance):
            return stats.distance
        return self.consensus.exact_distance()

    def _samples_per_second(self) -> float:
        now = time.perf_counter()
        steps = self.step - getattr(self, "_clock_step", 0)
        samples = steps * self.cfg.data.batch_size * self.n
        rate = samples / max(now - self.clock, 1e-9)
        self.clock, self._clock_step = now, self.step
        return rate

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self, index: int) -> dict:
        """Everything local replica ``index`` needs to continue bit for bit."""
        return {
            "step": self.step, "world_size": self.n, "config": config_mod.to_yaml(self.cfg),
            "replica": self.replicas.items[index].state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "gossip_t": self.consensus.mixer.t,
            "policy": self.policy.state(), "totals": dict(self.totals), "peaks": dict(self.peaks),
            "last_eval": {k: float(v) for k, v in self.last_eval.items()},
            **self._shadow_state(index),
        }  # fmt: skip

    def _shadow_state(self, index: int) -> dict:
        shadow = self.perturbation.shadow
        if shadow is None:
            return {}
        return {"shadow": shadow.replicas.items[index].state_dict(),
                "shadow_t": shadow.consensus.mixer.t}  # fmt: skip

    def load_state_dict(self, states: list[dict]) -> None:
        state = states[0]
        self.step = int(state["step"])
        for replica, s in zip(self.replicas.items, states, strict=True):
            replica.load_state_dict(s["replica"])
        torch.set_rng_state(state["torch_rng"])
        saved = state["cuda_rng"]
        # A resumed job may see a different number of GPUs: restore what both have.
        if saved and torch.cuda.is_available():
            for i, rng in enumerate(saved[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(rng, i)
        self.consensus.mixer.t = int(state["gossip_t"])
        shadow = self.perturbation.shadow
        if shadow is not None:
            for replica, s in zip(shadow.replicas.items, states, strict=True):
                replica.load_state_dict(s["shadow"])
            shadow.consensus.mixer.t = int(state["shadow_t"])
        self.policy.load_state(state["policy"])
        self.totals.update(state["totals"])
        self.peaks.update(state.get("peaks", {}))  # checkpoints older than the peaks: NaN
        self.last_eval = dict(state["last_eval"])
        self.checkpoints.last_step = self.step
        self._clock_step = self.step

    def save_checkpoint(self) -> None:
        """Flush the metrics first: rows up to this step must be on disk before it counts."""
        finite = all(bool(torch.isfinite(f).all()) for f in self.replicas.flats)
        if self.group.max(np.array([[0.0 if finite else 1.0]]))[0]:
            raise FloatingPointError(
                f"non-finite parameters at step {self.step}; not saved. "
                f"Last good checkpoint: {self._last_good()}"
            )
        self.writer.flush()
        states = {rank: self.state_dict(i) for i, rank in enumerate(self.replicas.ranks)}
        self.checkpoints.write(self.step, states)

    def _last_good(self) -> str:
        last = self.checkpoints.last_step
        if last is None:
            return "none"
        return checkpoint.step_dir(self.checkpoints.directory, last)

"""The training loop: local update, then gossip until the phase's target, then log.

One step on rank i (DESIGN.md): a local SGD step (``gossip.local_steps`` of them
between communications), then gossip rounds until the consensus estimate meets
the current phase's target or ``max_rounds`` is reached; ``topology: complete``
and ``target: exact`` phases average exactly with an Allreduce (C-SGD).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dsgd_mpi import checkpoint, schedule
from dsgd_mpi import comm as mpi
from dsgd_mpi import config as config_mod
from dsgd_mpi.config import Config
from dsgd_mpi.consensus import Consensus
from dsgd_mpi.control import TargetPolicy
from dsgd_mpi.data import DatasetInfo, Split
from dsgd_mpi.gossip import Gossiper
from dsgd_mpi.metrics import MetricsWriter
from dsgd_mpi.shards import ShardedLoader, eval_batches
from dsgd_mpi.topology import Topology


@dataclass
class Communication:
    """What one step's communication did."""

    rounds: int = 0
    estimate: float = math.nan
    target: float = math.nan
    bytes_sent: int = 0
    time_gossip: float = 0.0
    time_allreduce: float = 0.0


class Trainer:
    def __init__(
        self,
        cfg: Config,
        comm: mpi.Comm,
        model: torch.nn.Module,
        flat: torch.Tensor,
        loader: ShardedLoader,
        test: tuple[Split, DatasetInfo],
        writer: MetricsWriter,
        log: Callable[[str], None],
        device: torch.device,
        policy: TargetPolicy,
        checkpoints: checkpoint.Checkpointer | None = None,
    ) -> None:
        self.cfg, self.comm, self.model, self.loader = cfg, comm, model, loader
        self.test, self.writer, self.log, self.device = test, writer, log, device
        self.n = comm.Get_size()
        topo = Topology(cfg.topology.name, self.n, seed=cfg.topology.seed)
        dev = cfg.gossip.device_buffers
        self.consensus = Consensus(comm, Gossiper(comm, topo, flat, device_buffers=dev))
        # Exact phases average by Allreduce whatever the topology (dec-phase-k runs).
        complete = Topology("complete", self.n)
        self.averager = Consensus(comm, Gossiper(comm, complete, flat, device_buffers=dev))
        self.optimizer = _optimizer(cfg, model, schedule.peak_lr(cfg, self.n))
        self.policy = policy
        self.spans = policy.spans
        self.spe = loader.steps_per_epoch
        self.total_steps = max(1, math.ceil(cfg.run.epochs * self.spe - 1e-9))
        self.reducer = mpi.ScalarReducer(comm)
        self.checkpoints = checkpoints or checkpoint.Checkpointer(comm, "", every=0)
        self.flat = flat
        self.step = 0
        self.sums = np.zeros(3)  # loss * samples, correct, samples since the last log row
        self.clock = time.perf_counter()
        self.last_eval: dict = {}

    # -- the story -------------------------------------------------------------
    def run(self) -> dict | None:
        """Train to the end (returns the last evaluation) or until a stop signal (None)."""
        for images, labels in self._remaining_batches():
            self.train_step(images, labels)
            self._maybe_evaluate()
            save, stop = self.checkpoints.due(self.step, final=self.step == self.total_steps)
            if save:
                self.save_checkpoint()
            if stop:
                self.writer.close(finished=False)
                return None
        self.writer.close(finished=True)
        return self.last_eval

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One step: local update, gossip until the phase's target, a log row when due."""
        epoch_f = schedule.step_epoch(self.step, self.spe)
        phase = schedule.phase_at(self.spans, epoch_f)
        lr = schedule.lr_at(self.cfg, self.n, epoch_f)
        t0 = time.perf_counter()
        adaptive = self.policy.needs_gradient_norm(phase)
        loss, correct, grad_sq = self.local_update(images, labels, lr, adaptive)
        time_compute = time.perf_counter() - t0
        if adaptive:  # the target must be the same on every rank: reduce first
            self.policy.observe(phase, self.reducer.sum(grad_sq) / self.n)
        self.sums += (loss * len(labels), correct, len(labels))
        comm = Communication()
        if (self.step + 1) % self.cfg.gossip.local_steps == 0:
            comm = self.communicate(phase, self.policy.target(phase, lr))
        self.step += 1
        if self.step % self.cfg.metrics.log_every == 0 or self.step == self.total_steps:
            train = self._reduce_train(self.sums)
            self.sums[:] = 0
            self.log_step(epoch_f, phase.index, lr, train, comm, time_compute, self.clock)
            self.clock = time.perf_counter()

    def _remaining_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches from the current step on: a resumed run starts mid-epoch."""
        for epoch in range(self.step // self.spe, math.ceil(self.total_steps / self.spe)):
            for batch in self.loader.batches(epoch, start=self.step - epoch * self.spe):
                if self.step >= self.total_steps:
                    return
                yield batch

    def _maybe_evaluate(self) -> None:
        """Every ``eval_every`` epochs (fractions allowed, as steps), and at the end of the run."""
        every = max(1, round(self.cfg.metrics.eval_every * self.spe))
        if self.step % every == 0 or self.step == self.total_steps:
            self.evaluate(schedule.step_epoch(self.step - 1, self.spe))

    # -- checkpoints -----------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the next step depends on; a resumed run continues bit for bit."""
        return {
            "step": self.step, "world_size": self.n, "config": config_mod.to_yaml(self.cfg),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "gossip_t": self.consensus.gossiper.t, "averager_t": self.averager.gossiper.t,
            "policy": self.policy.state(), "sums": [float(v) for v in self.sums],
            "last_eval": {k: float(v) for k, v in self.last_eval.items()},
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])  # copies into the views of the flat buffer
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.consensus.gossiper.t = int(state["gossip_t"])
        self.averager.gossiper.t = int(state["averager_t"])
        self.policy.load_state(state["policy"])
        self.sums[:] = state["sums"]
        self.last_eval = dict(state["last_eval"])
        self.checkpoints.last_step = self.step

    def save_checkpoint(self) -> None:
        """Flush the metrics first: rows up to this step must be on disk before it counts."""
        bad = self.reducer.max(0.0 if bool(torch.isfinite(self.flat).all()) else 1.0)
        if bad:
            raise FloatingPointError(
                f"non-finite parameters at step {self.step}; not saved. "
                f"Last good checkpoint: {self._last_good()}"
            )
        self.writer.flush()
        self.checkpoints.write(self.step, self.state_dict())

    def _last_good(self) -> str:
        last = self.checkpoints.last_step
        if last is None:
            return "none"
        return checkpoint.step_dir(self.checkpoints.directory, last)

    def local_update(
        self, images: torch.Tensor, labels: torch.Tensor, lr: float, grad_norm: bool = False
    ) -> tuple[float, int, float]:
        """Forward, backward, optimizer step; returns loss, correct, and ||g||^2 if asked."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, labels = images.to(self.device), labels.to(self.device)
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_sq = 0.0
        if grad_norm:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            grad_sq = float(torch.stack(torch._foreach_norm(grads)).pow(2).sum())
        self.optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(
                f"non-finite training loss {value} at step {self.step + 1}. "
                f"Last good checkpoint: {self._last_good()}"
            )
        return value, int((logits.argmax(1) == labels).sum()), grad_sq

    def communicate(self, phase: schedule.PhaseSpan, target: float) -> Communication:
        """Gossip until the estimate meets ``target`` (or the phase's round budget is spent)."""
        out = Communication()
        exact = phase.target == "exact" or self.consensus.gossiper.topology.is_allreduce
        consensus = self.averager if exact else self.consensus
        max_rounds = 1 if phase.target in ("none", "exact") else phase.max_rounds
        while True:
            t0 = time.perf_counter()
            local = consensus.gossiper.round()
            t1 = time.perf_counter()
            out.estimate = consensus.scalar.sum(local) / self.n
            out.time_gossip += t1 - t0
            out.time_allreduce += time.perf_counter() - t1
            out.rounds += 1
            out.bytes_sent += consensus.gossiper.bytes_last_round
            if not math.isfinite(out.estimate):  # every rank sees it: all stop together
                raise FloatingPointError(
                    f"parameters diverged at step {self.step + 1}: consensus estimate "
                    f"{out.estimate}. Last good checkpoint: {self._last_good()}"
                )
            if out.rounds >= max_rounds or out.estimate <= target:
                break
        out.target = target
        return out

    # -- measurement -----------------------------------------------------------
    def _reduce_train(self, sums: np.ndarray) -> tuple[float, float]:
        loss = self.reducer.sum(float(sums[0]))
        correct = self.reducer.sum(float(sums[1]))
        count = self.reducer.sum(float(sums[2]))
        return loss / max(count, 1), correct / max(count, 1)

    def log_step(self, epoch, phase, lr, train, comm: Communication, time_compute, clock) -> None:
        every = self.cfg.metrics.exact_every
        exact = math.nan
        if every and self.step % every == 0:
            t0 = time.perf_counter()
            exact = self.consensus.exact()
            comm.time_allreduce += time.perf_counter() - t0
        row = dict(
            step=self.step, epoch=epoch, phase=phase, lr=lr, train_loss=train[0],
            train_acc=train[1], consensus_estimate=comm.estimate, consensus_exact=exact,
            consensus_bound=self.consensus.bound(comm.estimate), gossip_rounds=comm.rounds,
            target=comm.target, bytes_sent=comm.bytes_sent, time_compute=time_compute,
            time_gossip=comm.time_gossip, time_allreduce=comm.time_allreduce,
        )  # fmt: skip
        self.writer.log_step(row)
        samples = self.cfg.metrics.log_every * self.cfg.data.batch_size * self.n
        rate = samples / max(time.perf_counter() - clock, 1e-9)
        self.log(
            f"epoch {epoch:6.2f}  step {self.step:>6}/{self.total_steps}  loss {train[0]:.4f}  "
            f"acc {100 * train[1]:5.1f}%  e2 {comm.estimate:.3e}  rounds {comm.rounds}  "
            f"lr {lr:.4f}  {rate:,.0f} samples/s"
        )

    def evaluate(self, epoch: float) -> None:
        """Test the averaged model x̄ (with averaged BN buffers) and each local model."""
        local_acc = self._accuracy(self.model)[1]
        averaged = copy.deepcopy(self.model)
        state = [t for t in averaged.state_dict().values() if t.is_floating_point()]
        flat = torch.cat([t.reshape(-1) for t in state])
        mpi.allreduce_inplace(self.comm, flat)
        flat.div_(self.n)
        offset = 0
        for t in state:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        test_loss, test_acc = self._accuracy(averaged)
        row = dict(
            step=self.step, epoch=epoch, test_loss=test_loss, test_acc=test_acc,
            local_acc_mean=self.reducer.sum(local_acc) / self.n,
            local_acc_min=-self.reducer.max(-local_acc), local_acc_max=self.reducer.max(local_acc),
        )  # fmt: skip
        self.writer.log_eval(row)
        self.last_eval = row
        self.log(
            f"eval   epoch {epoch:6.2f}  averaged model: test acc {100 * test_acc:.2f}%  "
            f"loss {test_loss:.4f}  local models: {100 * row['local_acc_min']:.1f}-"
            f"{100 * row['local_acc_max']:.1f}%"
        )

    def _accuracy(self, model: torch.nn.Module) -> tuple[float, float]:
        """(loss, accuracy) over the whole test set; each rank scores its slice."""
        model.eval()
        split, info = self.test
        loss_sum, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for images, labels in eval_batches(split, info, rank=self.comm.Get_rank(),
                                               world_size=self.n, device=self.device):  # fmt: skip
                logits = model(images)
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(1) == labels).sum())
                count += len(labels)
        totals = np.array([loss_sum, correct, count], dtype=np.float64)
        mpi.allreduce_inplace(self.comm, totals)
        return totals[0] / totals[2], totals[1] / totals[2]


def _optimizer(cfg: Config, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
        weight_decay=o.weight_decay,
    )  # fmt: skip

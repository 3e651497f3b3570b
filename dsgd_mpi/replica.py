"""Model replicas: a model whose parameters live in one flat buffer, its optimizer, its data.

An MPI rank holds one :class:`Replica`; the one-process simulator holds all of
them. :class:`Replicas` is what the training loop talks to: a list of replicas
stepped one after the other, with the same arithmetic on every backend.

Per-step statistics (loss, correct predictions, the squared gradient norm)
stay on the device and are read when a log row or a target needs them, so a
GPU step has no host synchronisation of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dsgd_mpi.config import OptimConfig
from dsgd_mpi.shards import ShardedLoader


def build_optimizer(o: OptimConfig, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if o.name == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=lr, betas=(o.momentum, 0.999), weight_decay=o.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
        weight_decay=o.weight_decay,
    )  # fmt: skip


class Replica:
    """One replica x_i: model (parameters as views of ``flat``), optimizer, data shard."""

    def __init__(
        self,
        rank: int,
        model: torch.nn.Module,
        flat: torch.Tensor,
        loader: ShardedLoader,
        optim: OptimConfig,
        lr: float,
    ) -> None:
        self.rank, self.model, self.flat, self.loader = rank, model, flat, loader
        self.optimizer = build_optimizer(optim, model, lr)
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = flat.device
        # loss * samples, correct, samples since the last read; ||g||^2 of the last step
        self._sums = torch.zeros(3, dtype=torch.float64, device=device)
        self._grad_sq = torch.zeros((), dtype=torch.float64, device=device)
        self._batches: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def start(self, step: int) -> None:
        """Position the data stream at ``step`` (a resumed run starts mid-epoch)."""
        self._batches = self._stream(step)

    def _stream(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = divmod(step, self.loader.steps_per_epoch)
        while True:
            yield from self.loader.batches(epoch, start=start)
            epoch, start = epoch + 1, 0

    def gradients(self, grad_norm: bool = False) -> None:
        """Forward and backward on the next batch: ``.grad`` at the current parameters."""
        assert self._batches is not None, "call start(step) first"
        images, labels = next(self._batches)
        self.model.train()
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            self._sums[0] += loss.detach().double() * len(labels)
            self._sums[1] += (logits.argmax(1) == labels).sum()
            self._sums[2] += len(labels)
            if grad_norm:
                grads = [p.grad for p in self.params if p.grad is not None]
                self._grad_sq = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()

    def apply(self, lr: float) -> None:
        """The optimizer step with the gradients of :meth:`gradients`."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()

    def take_sums(self) -> np.ndarray:
        """(loss * samples, correct, samples) since the last call; one device read."""
        out = self._sums.cpu().numpy().copy()
        self._sums.zero_()
        return out

    def grad_sq(self) -> float:
        return float(self._grad_sq)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sums": self._sums.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])  # copies into the views of the flat buffer
        self.optimizer.load_state_dict(state["optimizer"])
        self._sums.copy_(state["sums"])


class Replicas:
    """The replicas of this process, stepped one after the other."""

    def __init__(self, replicas: Sequence[Replica], measured: int) -> None:
        self.items = list(replicas)
        self.ranks = tuple(r.rank for r in self.items)
        self.flats = [r.flat for r in self.items]
        self.models = [r.model for r in self.items]
        self.measured = measured
        """Leading elements of each flat buffer that are parameters (measured by consensus)."""

    def start(self, step: int) -> None:
        for r in self.items:
            r.start(step)

    def gradients(self, grad_norm: bool = False) -> None:
        for r in self.items:
            r.gradients(grad_norm)

    def apply(self, lr: float) -> None:
        for r in self.items:
            r.apply(lr)

    def grad_sq(self) -> np.ndarray:
        return np.array([[r.grad_sq()] for r in self.items])

    def take_sums(self) -> np.ndarray:
        return np.stack([r.take_sums() for r in self.items])

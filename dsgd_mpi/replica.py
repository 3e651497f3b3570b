"""Model replicas: a model whose parameters live in one flat buffer, its optimizer, its data.

An MPI rank holds one :class:`Replica`; the one-process simulator holds all of
them. :class:`Replicas` is what the training loop talks to: a list of replicas
stepped one after the other, with the same arithmetic on every backend.

Per-step statistics (loss, correct predictions, the squared gradient norm)
stay on the device and are read when a log row or a target needs them, so a
GPU step has no host synchronisation of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dsgd_mpi import optim
from dsgd_mpi.config import OptimConfig
from dsgd_mpi.flat import allocate
from dsgd_mpi.shards import ShardedLoader


class Replica:
    """One replica x_i: model (parameters as views of ``flat``), optimizer, data shard.

    Gradients live in one buffer too (``grad``, the size of the parameters at the
    head of ``flat``): each parameter's ``.grad`` is a view into it, into which
    backward accumulates in place.
    """

    def __init__(
        self,
        rank: int,
        model: torch.nn.Module,
        flat: torch.Tensor,
        measured: int,
        loader: ShardedLoader,
        o: OptimConfig,
        seed: int = 0,
    ) -> None:
        self.rank, self.model, self.flat, self.loader = rank, model, flat, loader
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = flat.device
        self.grad = allocate(measured, device)
        offset, self._grad_ptrs = 0, []
        for p in self.params:
            p.grad = self.grad[offset : offset + p.numel()].view_as(p)
            self._grad_ptrs.append(p.grad.data_ptr())
            offset += p.numel()
        self.optimizer = optim.build(o, flat[:measured], self.grad)
        self.optim, self.seed = o, seed
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

    def gradients(self, step: int, grad_norm: bool = False,
                  eps: torch.Tensor | None = None) -> None:  # fmt: skip
        """Forward and backward on the next batch: ``.grad`` (the flat ``grad``) for this step.

        The C-SGD baselines take the gradient elsewhere and restore the parameters
        exactly from a copy afterwards: ``optim.perturb: sam`` at ``x + rho g/||g||``
        (g at x first), and at ``x + eps`` when the caller gives ``eps``
        (:mod:`dsgd_mpi.perturb`: average-direction SAM, Gaussian smoothing).
        """
        assert self._batches is not None, "call start(step) first"
        images, labels = next(self._batches)
        o, params = self.optim, self.flat[: self.grad.numel()]
        if o.perturb == "sam":
            self._backward(images, labels, record=True)
            scale = o.rho / (torch.linalg.vector_norm(self.grad) + 1e-12)  # stays on the device
            saved = params.clone()
            params.add_(self.grad * scale)
            with kept_statistics(self.model.buffers()):  # one BatchNorm update a step, at x
                self._backward(images, labels, record=False)
            params.copy_(saved)
        elif eps is not None:
            saved = params.clone()
            params.add_(eps)
            self._backward(images, labels, record=True)
            params.copy_(saved)
        else:
            self._backward(images, labels, record=True)
        if grad_norm:
            self._grad_sq = torch.linalg.vector_norm(self.grad, dtype=torch.float64) ** 2

    def _backward(self, images: torch.Tensor, labels: torch.Tensor, record: bool) -> None:
        self.model.train()
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        self.grad.zero_()
        loss.backward()
        self._keep_grads_flat()
        if record:  # training loss and accuracy of the step, accumulated on the device
            with torch.no_grad():
                self._sums[0] += loss.detach().double() * len(labels)
                self._sums[1] += (logits.argmax(1) == labels).sum()
                self._sums[2] += len(labels)

    def _keep_grads_flat(self) -> None:
        """Backward accumulates into each ``.grad`` view; should autograd ever have put a
        new tensor there instead, its values go back into the flat buffer."""
        for p, ptr in zip(self.params, self._grad_ptrs, strict=True):
            if p.grad is None or p.grad.data_ptr() != ptr:
                view = self.grad[ptr_offset(self.grad, ptr) :][: p.numel()].view_as(p)
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view

    def apply(self, lr: float) -> None:
        """The optimizer step with the gradients of :meth:`gradients`."""
        self.optimizer.step(lr)

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


class Buffers:
    """Replicas reduced to what gossip and the consensus measures read: flat buffers
    whose first ``measured`` elements are parameters (the demo, the benchmarks)."""

    def __init__(self, flats: Sequence[torch.Tensor], measured: int | None = None) -> None:
        self.flats = list(flats)
        self.measured = self.flats[0].numel() if measured is None else measured


@contextlib.contextmanager
def kept_statistics(buffers: Iterable[torch.Tensor]) -> Iterator[None]:
    """Run a forward pass whose BatchNorm running statistics (every buffer) are put back
    afterwards: SAM's second pass, at the perturbed point, must not update them again."""
    held = [(b, b.clone()) for b in buffers]
    try:
        yield
    finally:
        for b, saved in held:
            b.copy_(saved)


def ptr_offset(buffer: torch.Tensor, ptr: int) -> int:
    """Element offset of address ``ptr`` inside ``buffer``."""
    return (ptr - buffer.data_ptr()) // buffer.element_size()


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

    def gradients(self, step: int, grad_norm: bool = False,
                  eps: Sequence[torch.Tensor] | None = None) -> None:  # fmt: skip
        for k, r in enumerate(self.items):
            r.gradients(step, grad_norm, None if eps is None else eps[k])

    def apply(self, lr: float) -> None:
        for r in self.items:
            r.apply(lr)

    def grad_sq(self) -> np.ndarray:
        return np.array([[r.grad_sq()] for r in self.items])

    def take_sums(self) -> np.ndarray:
        return np.stack([r.take_sums() for r in self.items])

"""The fast mode of the simulator: N replicas as one stack, batched.

Every replica's parameters are a row of one N x d buffer (each replica's own
module still sees its row through views, for evaluation and checkpoints). One
step is one batched forward/backward (the model's own ``forward_stacked``
where it has one, else ``torch.func.vmap`` over ``functional_call`` with the
stacked parameters, BatchNorm buffers and batches), one optimizer step on the
whole stack (every optimizer operation is elementwise), and gossip rounds on
the stack: ``X' = X + sum_k w_k (X[p_k] - X)`` with one gather per exchange
slot, the measures of all replicas in the same few whole-stack operations.

Agreement with the reference mode is to float rounding (batched kernels sum
in their own order), not bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from dsgd_mpi import optim
from dsgd_mpi.config import Config
from dsgd_mpi.data import DatasetInfo, Split
from dsgd_mpi.flat import allocate, flatten
from dsgd_mpi.mixing import buckets_signs_torch
from dsgd_mpi.models import build_model
from dsgd_mpi.replica import kept_statistics
from dsgd_mpi.shards import DEFAULT_MAX_DEVICE_BYTES, ShardedLoader
from dsgd_mpi.topology import Topology


class _Row:
    """One replica of the stack as the checkpoints see it: its model, its optimizer row."""

    def __init__(self, owner: FastReplicas, index: int, model, loader) -> None:
        self.owner, self.index, self.model, self.loader = owner, index, model, loader

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": {k: v[self.index].clone() for k, v in self.owner.optimizer_rows().items()},
            "sums": self.owner.sums[self.index].cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.owner.load_optimizer_row(self.index, state["optimizer"])
        self.owner.sums[self.index].copy_(state["sums"])


class FastReplicas:
    """The :class:`~dsgd_mpi.replica.Replicas` interface over a stack of replicas."""

    def __init__(
        self, cfg: Config, models: list[torch.nn.Module], stack: torch.Tensor, measured: int,
        loaders: list[ShardedLoader],
    ) -> None:  # fmt: skip
        self.cfg, self.models, self.stack, self.measured = cfg, models, stack, measured
        n, device = stack.shape[0], stack.device
        self.ranks = tuple(range(n))
        self.flats = [stack[i] for i in range(n)]
        self.items = [_Row(self, i, m, ld) for i, (m, ld) in enumerate(zip(models, loaders,
                                                                         strict=True))]  # fmt: skip
        self.params = stack[:, :measured]
        self.grad = torch.zeros(n, measured, device=device)
        self.optimizer = optim.build(cfg.optim, self.params, self.grad)
        self.sums = torch.zeros(n, 3, dtype=torch.float64, device=device)
        self._grad_sq = torch.zeros(n, dtype=torch.float64, device=device)
        template = models[0]
        self._template = template
        self._slots = [(n_, p.shape) for n_, p in template.named_parameters() if p.requires_grad]
        self._buffers = self._stack_buffers(models, stack)
        self._streams: list[Iterator] = []

        # A model that can run its replicas side by side itself (no buffers to carry)
        # does; any other is vmapped.
        stacked = getattr(template, "forward_stacked", None)
        self.stacked = stacked is not None and not self._buffers
        self._step = self._stacked_step(stacked) if self.stacked else self._vmapped_step(template)

    def _vmapped_step(self, template: torch.nn.Module):
        def loss(params, buffers, images, labels):
            logits = functional_call(template, (self._named(params), buffers), (images,))
            return F.cross_entropy(logits, labels), logits

        return vmap(grad_and_value(loss, has_aux=True))

    def _named(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's parameters as views of flat rows (..., measured): (..., *shape) each."""
        named, offset = {}, 0
        for name, shape in self._slots:
            size = int(np.prod(shape))
            named[name] = params[..., offset : offset + size].view(*params.shape[:-1], *shape)
            offset += size
        return named

    def _stacked_step(self, forward):
        """The vmapped step's contract with the model's own ``forward_stacked``: one graph
        for all replicas; their losses are independent, so the gradient of their sum
        is every replica's own gradient."""

        def step(params, buffers, images, labels):
            leaf = params.detach().requires_grad_()
            logits = forward(self._named(leaf), images)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            loss = loss.view(labels.shape).mean(dim=1)
            (grads,) = torch.autograd.grad(loss.sum(), leaf)
            return grads, (loss.detach(), logits.detach())

        return step

    def _stack_buffers(self, models, stack) -> dict[str, torch.Tensor]:
        """Every replica's buffers as one (N, ...) tensor each; the modules keep views of it.

        Float buffers that gossip mixes already are columns of the stack.
        """
        out = {}
        template = models[0]
        offset = self.measured
        mixed = self.cfg.gossip.buffers
        for name, b in template.named_buffers():
            if mixed and b.is_floating_point():
                out[name] = stack[:, offset : offset + b.numel()].view(len(models), *b.shape)
                offset += b.numel()
                continue
            stacked = torch.stack([dict(m.named_buffers())[name] for m in models])
            for i, m in enumerate(models):
                module_name, _, leaf = name.rpartition(".")
                module = m.get_submodule(module_name) if module_name else m
                module._buffers[leaf] = stacked[i]
            out[name] = stacked
        return out

    # -- the Replicas interface ----------------------------------------------------
    def start(self, step: int) -> None:
        self._streams = [self._stream(item.loader, step) for item in self.items]

    @staticmethod
    def _stream(loader: ShardedLoader, step: int) -> Iterator:
        epoch, start = divmod(step, loader.steps_per_epoch)
        while True:
            yield from loader.batches(epoch, start=start)
            epoch, start = epoch + 1, 0

    def gradients(self, step: int, grad_norm: bool = False,
                  eps: Sequence[torch.Tensor] | None = None) -> None:  # fmt: skip
        batches = [next(s) for s in self._streams]
        images = torch.stack([b[0] for b in batches])
        labels = torch.stack([b[1] for b in batches])
        o = self.cfg.optim
        self._template.train()
        if o.perturb == "sam":
            self._backward(images, labels, record=True)
            norms = torch.linalg.vector_norm(self.grad, dim=1, keepdim=True) + 1e-12
            saved = self.params.clone()
            self.params.add_(self.grad * (o.rho / norms))
            with kept_statistics(self._buffers.values()):  # one BatchNorm update a step, at x
                self._backward(images, labels, record=False)
            self.params.copy_(saved)
        elif eps is not None:
            saved = self.params.clone()
            self.params.add_(torch.stack(list(eps)))
            self._backward(images, labels, record=True)
            self.params.copy_(saved)
        else:
            self._backward(images, labels, record=True)
        if grad_norm:
            self._grad_sq = torch.linalg.vector_norm(self.grad, dim=1, dtype=torch.float64) ** 2

    def _backward(self, images, labels, record: bool) -> None:
        grads, (loss, logits) = self._step(self.params, self._buffers, images, labels)
        self.grad.copy_(grads)
        if record:
            with torch.no_grad():
                self.sums[:, 0] += loss.detach().double() * labels.shape[1]
                self.sums[:, 1] += (logits.argmax(-1) == labels).sum(dim=1)
                self.sums[:, 2] += labels.shape[1]

    def apply(self, lr: float) -> None:
        self.optimizer.step(lr)

    def grad_sq(self) -> np.ndarray:
        return self._grad_sq.cpu().numpy()[:, None]

    def take_sums(self) -> np.ndarray:
        out = self.sums.cpu().numpy().copy()
        self.sums.zero_()
        return out

    # -- checkpoints ----------------------------------------------------------------
    def optimizer_rows(self) -> dict[str, torch.Tensor]:
        state = self.optimizer.state_dict()
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def load_optimizer_row(self, index: int, state: dict) -> None:
        full = self.optimizer.state_dict()
        for key, value in state.items():
            if full.get(key) is None:  # e.g. no momentum buffer yet: make a stack of zeros
                full[key] = torch.zeros_like(self.params)
            full[key][index] = value
        for key, value in full.items():
            if not isinstance(value, torch.Tensor) and key in state:
                full[key] = state[key]
        self.optimizer.load_state_dict(full)


def make_fast_replicas(
    cfg: Config, ranks: Sequence[int], world_size: int, train: tuple[Split, DatasetInfo],
    device: torch.device,
) -> FastReplicas:  # fmt: skip
    """The replicas of a run as one stack (the same initial models and shards as MPI ranks)."""
    split, info = train
    if split.images.numel() + 8 * split.labels.numel() <= DEFAULT_MAX_DEVICE_BYTES:
        split = split.to(device)
    d = cfg.data
    models, loaders, stack, measured = [], [], None, 0
    for i, rank in enumerate(ranks):
        torch.manual_seed(cfg.run.seed)  # the same initial model on every replica
        model = build_model(cfg.model.name, num_classes=info.num_classes,
                            in_channels=info.in_channels, width=cfg.model.width,
                            image_size=d.resize or info.height,
                            pretrained=cfg.model.pretrained).to(device)  # fmt: skip
        if stack is None:
            probe, slots = flatten(model, buffers=cfg.gossip.buffers)
            stack = allocate(len(ranks) * probe.numel(), device).view(len(ranks), -1)
            params = {n for n, p in model.named_parameters() if p.requires_grad}
            measured = sum(s.numel for s in slots if s.name in params)
        flatten(model, buffers=cfg.gossip.buffers, out=stack[i])
        models.append(model)
        loaders.append(ShardedLoader(
            split, info, rank=rank, world_size=world_size, batch_size=d.batch_size,
            partition=d.partition, alpha=d.alpha, reshuffle=d.reshuffle, augment=d.augment,
            seed=cfg.run.seed, device=device, resize=d.resize,
        ))  # fmt: skip
    assert stack is not None
    return FastReplicas(cfg, models, stack, measured, loaders)


class StackMixer:
    """Gossip rounds on the stack: ``X' = X + sum_k w_k (X[p_k] - X)`` per exchange slot."""

    def __init__(self, topology: Topology, stack: torch.Tensor, measured: int) -> None:
        self.topology, self.stack, self.measured = topology, stack, measured
        self.t = 0
        self.bytes_last_round = 0
        self._before = torch.empty_like(stack)
        self._d = torch.empty_like(stack)

    def close(self) -> None:
        pass

    def round(self, measures: Sequence[dict] | None = None) -> np.ndarray:
        t, self.t = self.t, self.t + 1
        n, numel = self.stack.shape
        m = self.measured
        rows = np.zeros((n, 2))
        if n == 1:
            self.bytes_last_round = 0
            return rows
        x, d = self.stack, self._d
        if self.topology.is_allreduce:
            avg = x.mean(dim=0, keepdim=True)
            torch.sub(avg.expand_as(x), x, out=d)
            rows[:, 0] = (torch.linalg.vector_norm(d[:, :m], dim=1, dtype=torch.float64) ** 2).cpu()
            x.copy_(avg.expand_as(x))
            self.bytes_last_round = 4 * numel
            return rows
        plan = [self.topology.exchanges(i, t) for i in range(n)]
        slots = max(len(ex) for ex in plan)
        self.bytes_last_round = 4 * numel * slots
        before = self._before.copy_(x)
        d.zero_()
        for k in range(slots):
            source = [ex[k].recv_from if k < len(ex) else i for i, ex in enumerate(plan)]
            weight = [ex[k].weight if k < len(ex) else 0.0 for ex in plan]
            w = torch.tensor(weight, dtype=x.dtype, device=x.device)[:, None]
            d.add_((before[source] - before) * w)
        x.add_(d)
        rows[:, 0] = (torch.linalg.vector_norm(d[:, :m], dim=1, dtype=torch.float64) ** 2).cpu()
        if measures and "xbar" in measures[0]:
            xbar = measures[0]["xbar"]
            dist = torch.linalg.vector_norm(x[:, :m] - xbar, dim=1, dtype=torch.float64) ** 2
            rows[:, 1] = dist.cpu()
        if measures and "sketch" in measures[0]:
            self._sketch(measures)
        return rows

    def _sketch(self, measures: Sequence[dict]) -> None:
        """S x' of every replica at once: the hash once for all rows, one index_add."""
        s0, seed = measures[0]["sketch"], measures[0]["seed"]
        x = self.stack[:, : self.measured].double()
        index = torch.arange(self.measured, device=x.device)
        buckets, signs = buckets_signs_torch(index, s0.numel(), seed)
        sk = torch.zeros(x.shape[0], s0.numel(), dtype=torch.float64, device=x.device)
        sk.index_add_(1, buckets, x * signs)
        for i, args in enumerate(measures):
            args["sketch"].copy_(sk[i])

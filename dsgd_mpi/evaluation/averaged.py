"""The averaged model x̄: the mean of every replica's parameters, with a BatchNorm policy.

BatchNorm running statistics are not parameters: x̄ needs some. ``averaged``
takes the mean of the replicas' buffers (the default), ``rank0`` replica 0's
(as Zhu et al.'s code does), ``recompute`` re-estimates them with x̄'s
parameters on training batches (each replica on its own batches, then
averaged), which is what a model deployed from x̄ would have.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch

from dsgd_mpi.group import Group, mean_


def _floats(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [p for p in model.parameters()]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return params, buffers


def _cat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _scatter(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def averaged_model(
    group: Group,
    models: Sequence[torch.nn.Module],
    bn: str = "averaged",
    recompute: Callable[[int], Iterable[torch.Tensor]] | None = None,
) -> torch.nn.Module:
    """x̄ as a fresh module, identical on every process (collective).

    ``models`` are this process's replicas. ``recompute(i)`` yields training
    images of local replica i, for ``bn: recompute``.
    """
    xbar = copy.deepcopy(models[0])
    params, buffers = _floats(xbar)
    parts = [_cat(_floats(m)[0]) for m in models]
    _scatter(mean_(group, parts, torch.empty_like(parts[0])), params)
    if not buffers:
        return xbar
    if bn == "recompute":
        return _recomputed(group, xbar, models, recompute)
    parts = [_cat(_floats(m)[1]) for m in models]
    out = torch.empty_like(parts[0])
    _scatter(group.first_(parts, out) if bn == "rank0" else mean_(group, parts, out), buffers)
    return xbar


def _recomputed(group, xbar, models, recompute) -> torch.nn.Module:
    """BN statistics of x̄ from each local replica's batches (cumulative mean), averaged."""
    if recompute is None:
        raise ValueError("bn: recompute needs training batches")
    bns = [m for m in xbar.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    parts = []
    for i in range(len(models)):
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
        xbar.train()
        with torch.no_grad():
            for images in recompute(i):
                xbar(images)
        parts.append(_cat(_floats(xbar)[1]))
    _scatter(mean_(group, parts, torch.empty_like(parts[0])), _floats(xbar)[1])
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    return xbar

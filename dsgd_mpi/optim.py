"""Local optimizers on one flat buffer: SGD (momentum, Nesterov, weight decay) and Adam.

Parameters already live in one contiguous buffer (:mod:`dsgd_mpi.flat`);
their gradients get one too, so an optimizer step is a handful of whole-buffer
operations instead of a loop over parameter tensors, and works unchanged on a
stack of replicas (an N x d buffer: every operation is elementwise). The
arithmetic is torch.optim's (``SGD`` with dampening 0, ``Adam`` without
amsgrad). A side benefit measured here: building a ``torch.optim`` optimizer
imports ``torch._dynamo`` (and sympy), 3-25 s per rank at start-up on two
shared cores.
"""

from __future__ import annotations

import torch

from dsgd_mpi.config import OptimConfig


class FlatSGD:
    """``torch.optim.SGD`` on one buffer; momentum buffers stay local to the replica."""

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, o: OptimConfig) -> None:
        self.param, self.grad = param, grad
        self.momentum, self.weight_decay = o.momentum, o.weight_decay
        self.nesterov = o.nesterov and o.momentum > 0
        self.buf: torch.Tensor | None = None
        self._d = torch.empty_like(param)

    def step(self, lr: float) -> None:
        d = self._d.copy_(self.grad)
        if self.weight_decay:
            d.add_(self.param, alpha=self.weight_decay)
        if self.momentum:
            if self.buf is None:
                self.buf = d.clone()
            else:
                self.buf.mul_(self.momentum).add_(d)
            if self.nesterov:
                d.add_(self.buf, alpha=self.momentum)
            else:
                d.copy_(self.buf)
        self.param.add_(d, alpha=-lr)

    def state_dict(self) -> dict:
        return {"momentum_buffer": None if self.buf is None else self.buf.clone()}

    def load_state_dict(self, state: dict) -> None:
        buf = state["momentum_buffer"]
        self.buf = None if buf is None else buf.to(self.param.device).clone()


class FlatAdam:
    """``torch.optim.Adam`` on one buffer; beta1 is ``optim.momentum``."""

    def __init__(self, param: torch.Tensor, grad: torch.Tensor, o: OptimConfig) -> None:
        self.param, self.grad = param, grad
        self.beta1, self.beta2, self.eps = o.momentum, 0.999, 1e-8
        self.weight_decay = o.weight_decay
        self.steps = 0
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self._d = torch.empty_like(param)

    def step(self, lr: float) -> None:
        self.steps += 1
        g = self._d.copy_(self.grad)
        if self.weight_decay:
            g.add_(self.param, alpha=self.weight_decay)
        self.m.lerp_(g, 1 - self.beta1)
        self.v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        correction1 = 1 - self.beta1**self.steps
        correction2 = 1 - self.beta2**self.steps
        denom = torch.sqrt(self.v, out=g).div_(correction2**0.5).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-lr / correction1)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "m": self.m.clone(), "v": self.v.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])


def build(o: OptimConfig, param: torch.Tensor, grad: torch.Tensor) -> FlatSGD | FlatAdam:
    """The local optimizer of ``optim.name`` over a flat parameter buffer and its gradient."""
    return FlatAdam(param, grad, o) if o.name == "adam" else FlatSGD(param, grad, o)

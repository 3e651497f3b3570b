"""Sharpness of the training loss: top Hessian eigenvalue and Hessian trace from HVPs.

Zhu et al. (2023) compare the flatness of the minima C-SGD and D-SGD reach by
the largest eigenvalue and the trace of the Hessian of the training loss
(computed as in PyHessian, Yao et al. 2020). Both need only Hessian-vector
products, so the Hessian (d x d, d ~ 11M for ResNet-18) is never formed.

The work splits in two so one code path serves one process and many ranks:

1. ``hvp_fn(model, batches)`` gives the *local* operator: v -> sum over this
   rank's batches of H v, where H is the Hessian of the *summed* per-sample
   loss. Sums add across ranks; means would not (the ranks may hold
   different numbers of samples).
2. The caller reduces and normalises: with N samples over all ranks,
   ``op = lambda v: allreduce_sum(local(v)) / N`` (or, in one process, the
   sum over the simulated ranks' operators). ``op`` is the Hessian of the
   mean training loss on the subset.
3. ``lanczos_max(op, d, generator=g)`` and ``hutchinson_trace(op, d,
   generator=g)`` draw their random vectors from ``g`` only, and each returns
   its error beside its value (the residual, the standard error). Seed ``g``
   identically on every rank: the ranks then run the same iterations on the
   same (reduced) numbers and stop together, with no extra messages.

Evaluate in eval mode (``model.eval()``, the caller's job): in train mode
BatchNorm would normalise with batch statistics, making the loss of one sample
depend on the others in its batch, and dropout would make the operator random.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
Operator = Callable[[torch.Tensor], torch.Tensor]


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy summed (not averaged) over the batch: the default loss of ``hvp_fn``."""
    return F.cross_entropy(logits, labels, reduction="sum")


def hvp_fn(
    model: nn.Module,
    batches: Iterable[Batch],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = summed_cross_entropy,
    params: Sequence[nn.Parameter] | None = None,
    keep_graphs: bool = False,
) -> Operator:
    """Return v -> sum over ``batches`` of H_b v, H_b the Hessian of ``loss(model(x), y)``.

    ``loss`` must return the loss *summed* over the batch's samples, so the
    products add over batches and ranks; divide the reduced sum by the global
    sample count. ``params`` defaults to the model's trainable parameters in
    ``model.parameters()`` order; v is a flat vector over them (the order of
    ``dsgd_mpi.flat``). The result is one flat float32 tensor on the
    parameters' device; v may come from any device.

    Each product recomputes the forward pass batch by batch and differentiates
    twice (double backprop), so memory stays that of one batch's double
    backward, at the price of a forward pass per product. ``batches`` are held
    (a list) and replayed for every product; keep them on the model's device.
    The caller puts the model in eval mode (see the module docstring). Gradients
    are enabled inside even if the caller runs under ``torch.no_grad()``, and
    ``.grad`` of the parameters is left untouched.

    ``keep_graphs=True`` trades that memory for time: each batch's gradient
    graph is built by the first product and kept, so a later product is the
    second backward pass alone (small CNN, 256 samples: 0.35 s a product
    instead of 0.58, the same numbers). The operator then holds every batch's
    double-backward graph until it is dropped, and the model must not change
    while it is in use.
    """
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise ValueError("hvp_fn needs at least one parameter that requires grad")
    held = list(batches)
    sizes = [p.numel() for p in params]
    dim = sum(sizes)
    device = params[0].device

    graphs: dict[int, tuple[torch.Tensor, ...]] = {}

    def gradient(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        value = loss(model(x), y)
        return torch.autograd.grad(value, params, create_graph=True, materialize_grads=True)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        if v.shape != (dim,):
            raise ValueError(f"v must be a flat vector of {dim} entries, got {tuple(v.shape)}")
        parts = v.to(device=device, dtype=params[0].dtype).split(sizes)
        vs = [part.view_as(p) for part, p in zip(parts, params, strict=True)]
        out = torch.zeros(dim, dtype=torch.float32, device=device)
        with torch.enable_grad():
            for i, (x, y) in enumerate(held):
                grads = graphs[i] if i in graphs else gradient(x, y)
                if keep_graphs:
                    graphs[i] = grads
                dot = sum((g * u).sum() for g, u in zip(grads, vs, strict=True))
                if not dot.requires_grad:  # gradient constant in the parameters: H = 0 here
                    continue
                hv = torch.autograd.grad(dot, params, retain_graph=keep_graphs,
                                         materialize_grads=True)  # fmt: skip
                offset = 0
                for h, n in zip(hv, sizes, strict=True):
                    out[offset : offset + n] += h.reshape(-1)
                    offset += n
        return out

    return hvp


def _check_iterations(tol: float, max_iter: int, min_iter: int = 1) -> None:
    if not (isinstance(tol, float | int) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not isinstance(min_iter, int) or not 1 <= min_iter <= max_iter:
        raise ValueError(f"min_iter must be an int in [1, max_iter={max_iter}], got {min_iter!r}")


def lanczos_max(
    hvp: Operator, dim: int, *, generator: torch.Generator, tol: float = 1e-3,
    max_iter: int = 60, min_iter: int = 1,
) -> tuple[float, float, int]:
    """Largest Hessian eigenvalue by Lanczos; returns (lambda_max, relative residual, HVPs).

    ``hvp`` is the reduced, normalised operator (module docstring). From a Gaussian
    start drawn from ``generator``, build the Krylov basis v_1, v_2, ... with full
    reorthogonalisation (the basis is kept: ``max_iter`` vectors of ``dim``) and,
    after every product, the tridiagonal T_k's largest eigenvalue theta with its
    Ritz vector y. Its residual ``||H y - theta y|| = beta_k |s_k|`` (s the
    eigenvector of T_k) costs no product; stop once it is at most ``tol * |theta|``
    and ``min_iter`` products are in, or after ``max_iter`` products. The residual
    bounds the error of theta (by itself, and by residual^2 / gap once the next
    eigenvalue is ``gap`` away), so
    a reader can tell a value from a guess: it is returned and logged. Unlike power
    iteration, which stalls when the top two eigenvalues are close and finds the
    largest *magnitude*, Lanczos converges to the algebraically largest eigenvalue
    at a rate set by the gap relative to the whole spectrum's width.
    """
    _check_iterations(tol, max_iter, min_iter)
    v = torch.randn(dim, generator=generator, device=generator.device)
    basis: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    v = v / torch.linalg.vector_norm(v)
    theta, residual = math.nan, math.inf
    for k in range(1, max_iter + 1):
        w = hvp(v)
        v = v.to(w.device)  # the generator's device may differ from the operator's
        basis.append(v)
        alpha = float(torch.dot(v.double(), w.double()))
        alphas.append(alpha)
        w = w - alpha * v - (betas[-1] * basis[-2] if betas else 0.0)
        for _ in range(2):  # full reorthogonalisation, twice is enough (Parlett)
            for u in basis:
                w = w - float(torch.dot(u.double(), w.double())) * u
        beta = float(torch.linalg.vector_norm(w, dtype=torch.float64))
        values, vectors = np.linalg.eigh(_tridiagonal(alphas, betas))
        theta = float(values[-1])
        residual = beta * abs(float(vectors[-1, -1]))
        if beta <= 1e-12 * max(abs(theta), 1e-30):  # an invariant subspace: exact
            return theta, residual / max(abs(theta), 1e-30), k
        if residual <= tol * abs(theta) and k >= min_iter:
            return theta, residual / max(abs(theta), 1e-30), k
        betas.append(beta)
        v = w / beta
    return theta, residual / max(abs(theta), 1e-30), max_iter


def _tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> np.ndarray:
    """The Lanczos matrix T_k: ``alphas`` on the diagonal, ``betas`` beside it."""
    k = len(alphas)
    t = np.diag(np.asarray(alphas, dtype=np.float64))
    off = np.asarray(betas[: k - 1], dtype=np.float64)
    return t + np.diag(off, 1) + np.diag(off, -1)


def hutchinson_trace(
    hvp: Operator,
    dim: int,
    *,
    generator: torch.Generator,
    tol: float = 1e-2,
    max_iter: int = 200,
    min_iter: int = 10,
) -> tuple[float, float, int]:
    """Hessian trace by Hutchinson's estimator; returns (trace, its standard error, HVPs).

    Each sample is z.Hz for a Rademacher z (entries +-1 drawn from
    ``generator``), an unbiased estimate of tr H. Stop once at least
    ``min_iter`` samples are in and the standard error of their running mean,
    sqrt(s^2 / k) with s^2 the unbiased sample variance, is at most
    ``tol * |mean|``; else after ``max_iter`` samples. ``min_iter`` keeps a
    few lucky early samples from passing for a converged estimate. The variance
    of one sample is 2 * sum_{i != j} H_ij^2, so a trace near 0 with large
    off-diagonal entries runs to ``max_iter``: check the count.
    """
    _check_iterations(tol, max_iter, min_iter)
    mean, m2 = 0.0, 0.0  # Welford's running mean and sum of squared deviations
    for k in range(1, max_iter + 1):
        z = torch.randint(0, 2, (dim,), generator=generator, device=generator.device)
        z = z.to(torch.float32).mul_(2).sub_(1)
        hz = hvp(z)
        sample = float(torch.dot(z.to(hz.device), hz))
        delta = sample - mean
        mean += delta / k
        m2 += delta * (sample - mean)
        se = math.sqrt(m2 / (k - 1) / k) if k > 1 else math.inf
        if k >= max(min_iter, 2) and se <= tol * abs(mean):
            return mean, se, k
    return mean, se, max_iter

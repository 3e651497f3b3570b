"""One evaluation: x̄, every local model, their ensemble, calibration, sharpness.

- x̄ (:mod:`~dsgd_mpi.evaluation.averaged`, with the BatchNorm policy
  ``metrics.bn``) is the same on every replica, so its test pass is split:
  each replica scores its slice and the additive statistics are reduced.
- Each local model is scored on the *whole* test set (ranks work in parallel:
  one test pass per rank), so the spread of local accuracies is the spread of
  the replicas.
- In the same pass, the ensemble of the local models: per batch, the mean of
  every replica's softmax (a reduction of one batch of probabilities at a
  time, never the whole prediction matrix), scored for accuracy, NLL and ECE.
- Sharpness of x̄ when asked: lambda_max (Lanczos, with its residual) and the
  trace (Hutchinson, with its standard error) of the training loss's Hessian on
  a fixed seeded subset of ``metrics.sharpness_samples`` training samples split
  across replicas; every Hessian-vector product is reduced so that every
  replica holds the same bytes (the iterations' stopping decisions depend on
  them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from dsgd_mpi.config import Config
from dsgd_mpi.data import DatasetInfo, Split
from dsgd_mpi.evaluation.averaged import averaged_model
from dsgd_mpi.evaluation.calibration import Calibration
from dsgd_mpi.evaluation.sharpness import hutchinson_trace, hvp_fn, lanczos_max
from dsgd_mpi.group import Group
from dsgd_mpi.seeds import Stream, generator
from dsgd_mpi.shards import eval_batches

BATCH = 1000
#: Stopping rules of the sharpness estimates (relative tolerance, most HVPs). Lanczos keeps
#: its basis: at most LANCZOS_MAX vectors of the model's size. A small residual puts the
#: Ritz value near *an* eigenvalue, the top one once it has emerged from the Krylov space:
#: at least LANCZOS_MIN products (the quickstart after one epoch: 6.75593 from three start
#: vectors after 7-8 products, residual <= 7e-4; the floor is a margin, not a measurement).
LANCZOS_TOL, LANCZOS_MIN, LANCZOS_MAX = 1e-3, 10, 40
TRACE_TOL, TRACE_MIN, TRACE_MAX = 0.05, 10, 100
SHARPNESS_BATCH = 256
# A process whose share of the sharpness subset is at most this many samples keeps
# their gradient graphs across Hessian-vector products (a few training batches of
# activations): a Zhu large-batch evaluation took 0.28 s a product instead of 0.37;
# larger shares recompute them.
KEEP_GRAPHS_SAMPLES = 1024

#: Per-bin reliability arrays logged with each evaluation (x̄ and the ensemble).
RELIABILITY = tuple(f"{who}_{what}" for who in ("test", "ensemble")
                    for what in ("bin_confidence", "bin_accuracy", "bin_count"))  # fmt: skip


class Evaluator:
    def __init__(
        self, group: Group, models: list[torch.nn.Module], test: tuple[Split, DatasetInfo],
        train: tuple[Split, DatasetInfo], device: torch.device, cfg: Config,
        bn_batches: Callable[[int], Iterable[torch.Tensor]] | None = None,
    ) -> None:  # fmt: skip
        """``bn_batches(i)``: training images of local replica i (``metrics.bn: recompute``)."""
        self.group, self.models, self.device, self.cfg = group, models, device, cfg
        self.test, self.train, self.bn_batches = test, train, bn_batches

    def _batches(self, split_info, rank: int, world_size: int, batch: int = BATCH):
        split, info = split_info
        return eval_batches(split, info, rank=rank, world_size=world_size, batch_size=batch,
                            device=self.device, resize=self.cfg.data.resize)  # fmt: skip

    def __call__(self, step: int, epoch: float, sharpness: bool = False) -> dict:
        spread = dict(local_acc_mean=np.nan, local_acc_min=np.nan, local_acc_max=np.nan)
        ensemble = Calibration()  # empty: NaN scores, the same row layout
        if self.cfg.metrics.eval_local:  # the same on every rank: the collectives match
            local, ensemble = self._local_and_ensemble()
            acc = local[:, 1] / local[:, 2]
            spread = dict(local_acc_mean=float(self.group.sum(acc[:, None])[0]) / self.group.size,
                          local_acc_min=-float(self.group.max(-acc[:, None])[0]),
                          local_acc_max=float(self.group.max(acc[:, None])[0]))  # fmt: skip
        xbar = averaged_model(self.group, self.models, self.cfg.metrics.bn, self.bn_batches)
        totals, cal = self._score_xbar(xbar)
        loss_sum, count = totals
        row: dict = dict(
            step=step, epoch=epoch, test_loss=loss_sum / count, test_acc=cal.accuracy,
            test_nll=cal.nll, test_ece=cal.ece, **spread,
            ensemble_acc=ensemble.accuracy, ensemble_nll=ensemble.nll, ensemble_ece=ensemble.ece,
            sharpness_lambda_max=np.nan, sharpness_lambda_residual=np.nan,
            sharpness_lambda_iters=-1, sharpness_trace=np.nan, sharpness_trace_se=np.nan,
            sharpness_trace_iters=-1,
        )  # fmt: skip
        for who, c in (("test", cal), ("ensemble", ensemble)):
            conf, hit, cnt = c.reliability()
            row[f"{who}_bin_confidence"], row[f"{who}_bin_accuracy"] = conf, hit
            row[f"{who}_bin_count"] = cnt
        if sharpness:
            row.update(self._sharpness(xbar, step))
        return row

    def _local_and_ensemble(self) -> tuple[np.ndarray, Calibration]:
        """Each local model over the whole test set, and their ensemble batch by batch."""
        for m in self.models:
            m.eval()
        local = torch.zeros(len(self.models), 3, dtype=torch.float64, device=self.device)
        ensemble = Calibration()
        mean = None
        with torch.no_grad():
            for images, labels in self._batches(self.test, 0, 1):
                probs = []
                for i, m in enumerate(self.models):
                    logits = m(images)
                    local[i, 0] += F.cross_entropy(logits, labels, reduction="sum").double()
                    local[i, 1] += (logits.argmax(1) == labels).sum()
                    local[i, 2] += len(labels)
                    probs.append(torch.softmax(logits, dim=1))
                if mean is None or mean.shape != probs[0].shape:
                    mean = torch.empty_like(probs[0])
                self.group.sum_(probs, mean).div_(self.group.size)
                ensemble.add(mean, labels)
        return local.cpu().numpy(), ensemble

    def _score_xbar(self, xbar: torch.nn.Module) -> tuple[np.ndarray, Calibration]:
        """x̄ on this process's slices of the test set; (loss sum, count) and calibration."""
        xbar.eval()
        cal = Calibration()
        loss = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for rank in self.group.ranks:
                for images, labels in self._batches(self.test, rank, self.group.size):
                    logits = xbar(images)
                    loss[0] += F.cross_entropy(logits, labels, reduction="sum").double()
                    loss[1] += len(labels)
                    cal.add(torch.softmax(logits, dim=1), labels)
        sums = self.group.sum(np.concatenate([loss.cpu().numpy(), cal.vector()])[None, :])
        return sums[:2], Calibration.from_vector(sums[2:])

    def _sharpness(self, xbar: torch.nn.Module, step: int) -> dict:
        """lambda_max and trace of the training loss's Hessian at x̄ (collective)."""
        m = self.cfg.metrics
        split, info = self.train
        total = min(m.sharpness_samples, len(split))
        g = generator(Stream.SHARPNESS, self.cfg.run.seed)
        chosen = torch.randperm(len(split), generator=g)[:total].sort().values
        subset = Split(split.images[chosen.to(split.images.device)],
                       split.labels[chosen.to(split.labels.device)])  # fmt: skip
        xbar.eval()  # the BN policy's statistics, no updates
        # x̄ is one model for all of this process's replicas, so their shares of the
        # subset make one operator, batched anew: the simulator's 16 replicas take one
        # product over 256 samples, not 16 over 16 (~1.5x less CPU per product).
        shares = [b for rank in self.group.ranks
                  for b in self._batches((subset, info), rank, self.group.size)]  # fmt: skip
        held = _rebatched(shares, SHARPNESS_BATCH)
        keep = sum(len(y) for _, y in held) <= KEEP_GRAPHS_SAMPLES
        local = hvp_fn(xbar, held, keep_graphs=keep)
        params = [p for p in xbar.parameters() if p.requires_grad]
        dim = sum(p.numel() for p in params)
        out = torch.empty(dim, device=self.device)

        def op(v: torch.Tensor) -> torch.Tensor:  # one part: the sum over this process's shares
            return self.group.sum_([local(v)], out, identical=True) / total

        vectors = generator(Stream.SHARPNESS, self.cfg.run.seed, step)
        lam, residual, lam_iters = lanczos_max(
            op, dim, generator=vectors, tol=LANCZOS_TOL, min_iter=LANCZOS_MIN,
            max_iter=LANCZOS_MAX)
        trace, se, trace_iters = hutchinson_trace(
            op, dim, generator=vectors, tol=TRACE_TOL, min_iter=TRACE_MIN, max_iter=TRACE_MAX)
        return dict(sharpness_lambda_max=lam, sharpness_lambda_residual=residual,
                    sharpness_lambda_iters=lam_iters, sharpness_trace=trace,
                    sharpness_trace_se=se, sharpness_trace_iters=trace_iters)


def _rebatched(batches: list, size: int) -> list:
    """The samples of ``batches`` (image, label pairs) in batches of at most ``size``."""
    if not batches:  # this rank holds none of the subset: its operator is 0
        return []
    images, labels = (torch.cat([b[k] for b in batches]) for k in (0, 1))
    return list(zip(images.split(size), labels.split(size), strict=True))

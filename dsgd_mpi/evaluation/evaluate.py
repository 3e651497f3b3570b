"""One evaluation: the averaged model x̄ and every local model on the test set.

x̄ is the same on every replica, so its test pass is split: each replica
scores its slice and the sums are reduced. Each local model is scored on the
*whole* test set (ranks work in parallel: one test pass per rank), so the
spread of local accuracies is the spread of the replicas.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from dsgd_mpi.config import Config
from dsgd_mpi.data import DatasetInfo, Split
from dsgd_mpi.evaluation.averaged import averaged_model
from dsgd_mpi.group import Group
from dsgd_mpi.shards import eval_batches

BATCH = 1000


class Evaluator:
    def __init__(
        self, group: Group, models: list[torch.nn.Module], test: tuple[Split, DatasetInfo],
        device: torch.device, cfg: Config,
    ) -> None:  # fmt: skip
        self.group, self.models, self.device, self.cfg = group, models, device, cfg
        self.bn = cfg.metrics.bn
        self.split, self.info = test

    def _batches(self, rank: int, world_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return eval_batches(self.split, self.info, rank=rank, world_size=world_size,
                            batch_size=BATCH, device=self.device,
                            resize=self.cfg.data.resize)  # fmt: skip

    def __call__(self, step: int, epoch: float) -> dict[str, float]:
        n = self.group.size
        local = np.array([_score(m, self._batches(0, 1)) for m in self.models])
        acc = local[:, 1] / local[:, 2]
        xbar = averaged_model(self.group, self.models, self.bn)
        mine = sum(_score(xbar, self._batches(r, n)) for r in self.group.ranks)
        loss_sum, correct, count = self.group.sum(np.asarray(mine)[None, :])
        return dict(
            step=step, epoch=epoch, test_loss=loss_sum / count, test_acc=correct / count,
            local_acc_mean=float(self.group.sum(acc[:, None])[0]) / n,
            local_acc_min=-float(self.group.max(-acc[:, None])[0]),
            local_acc_max=float(self.group.max(acc[:, None])[0]),
        )  # fmt: skip


def _score(model: torch.nn.Module, batches) -> np.ndarray:
    """(summed loss, correct, count) of ``model`` over ``batches``; one device read."""
    model.eval()
    totals = None
    with torch.no_grad():
        for images, labels in batches:
            logits = model(images)
            row = torch.stack([
                F.cross_entropy(logits, labels, reduction="sum").double(),
                (logits.argmax(1) == labels).sum().double(),
                torch.tensor(float(len(labels)), dtype=torch.float64, device=logits.device),
            ])  # fmt: skip
            totals = row if totals is None else totals + row
    return np.zeros(3) if totals is None else totals.cpu().numpy()

"""Accuracy, negative log-likelihood and expected calibration error, as an additive accumulator.

``Calibration`` keeps running sums, never predictions, so the two uses in
DESIGN.md "Evaluation" cost one small vector each:

- averaged model x̄, test set split across ranks: each rank ``add``\\ s its
  batches, then the ranks sum ``vector()`` (one Allreduce of ``vector_length``
  float64) and rebuild with ``from_vector``;
- ensemble of the local models: every rank scores the whole test set, the
  ranks' softmax outputs are averaged batch by batch (the caller's reduction),
  and every rank ``add``\\ s the same averaged batch, so all ranks hold the same
  accumulator with no further reduction.

ECE follows Guo et al. (2017): ``num_bins`` equal-width bins on the top-class
confidence c, bin b holding c in (b/num_bins, (b+1)/num_bins] (c = 0 goes to bin
0), and ECE = sum_b |acc_b - conf_b| * n_b / N.
"""

from __future__ import annotations

import math

import numpy as np
import torch

NUM_BINS = 15
"""Zhu et al. report ECE with 15 bins, the usual choice since Guo et al. (2017)."""

PROB_FLOOR = 1e-12
"""Smallest probability the NLL sees: one sample contributes at most -ln(1e-12) = 27.6 nats.

An ensemble or a float32 softmax can put exactly 0 on the true class; without a
floor one such sample makes the mean NLL infinite and hides everything else.
"""

# Layout of the vector: three totals, then three blocks of ``num_bins`` entries.
_NLL, _CORRECT, _COUNT = 0, 1, 2
_HEAD = 3


class Calibration:
    """Running sums for accuracy, NLL and ECE; add two by summing their ``vector()``.

    The sums live on the device of the first ``add`` (float64, or float32 on
    devices without float64, i.e. MPS), so ``add`` never waits for the device;
    only ``vector()`` and the properties copy to the host.
    """

    def __init__(self, num_bins: int = NUM_BINS) -> None:
        if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
        self.num_bins = num_bins
        self._sums: torch.Tensor | None = None  # allocated by the first add, on its device

    @property
    def vector_length(self) -> int:
        """Length of ``vector()``: 3 + 3 * num_bins (48 for 15 bins)."""
        return _HEAD + 3 * self.num_bins

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """Account for one batch of class probabilities ``probs[B, C]`` and labels ``labels[B]``.

        ``probs`` are probabilities (softmax outputs, or a mean of them), not
        logits; rows are not renormalised. The prediction is the top class.
        """
        if probs.dim() != 2 or labels.shape != probs.shape[:1]:
            raise ValueError(
                f"probs must be [B, C] and labels [B], got {tuple(probs.shape)} and "
                f"{tuple(labels.shape)}"
            )
        if self._sums is None:
            dtype = torch.float32 if probs.device.type == "mps" else torch.float64
            self._sums = torch.zeros(self.vector_length, dtype=dtype, device=probs.device)
        sums = self._sums
        probs = probs.detach().to(device=sums.device, dtype=sums.dtype)
        labels = labels.to(device=sums.device, dtype=torch.long)

        conf, pred = probs.max(dim=1)
        correct = (pred == labels).to(sums.dtype)
        p_true = probs.gather(1, labels[:, None]).squeeze(1).clamp_min(PROB_FLOOR)
        sums[_NLL] -= p_true.log().sum()
        sums[_CORRECT] += correct.sum()
        sums[_COUNT] += probs.shape[0]

        # Bin b holds (b/k, (b+1)/k]: ceil(c*k) - 1, with c = 0 (and rounding) clamped in.
        k = self.num_bins
        bins = (conf * k).ceil().long().sub_(1).clamp_(0, k - 1)
        per_bin = sums[_HEAD:].view(3, k)
        per_bin[0].index_add_(0, bins, torch.ones_like(conf))
        per_bin[1].index_add_(0, bins, conf)
        per_bin[2].index_add_(0, bins, correct)

    def vector(self) -> np.ndarray:
        """All sums as float64 on the host, fixed length ``vector_length``.

        Layout: [nll sum, correct, count, count per bin (num_bins), confidence
        sum per bin (num_bins), correct per bin (num_bins)]. Every entry is a
        sum over samples, so the vectors of disjoint sample sets add.
        """
        if self._sums is None:
            return np.zeros(self.vector_length, dtype=np.float64)
        return self._sums.detach().to("cpu", torch.float64).numpy().copy()

    @classmethod
    def from_vector(cls, vector: np.ndarray | torch.Tensor) -> Calibration:
        """Rebuild from a (possibly summed) ``vector()``; its length gives the bin count."""
        if isinstance(vector, torch.Tensor):
            v = vector.detach().to("cpu", torch.float64)
        else:
            v = torch.from_numpy(np.array(vector, dtype=np.float64))
        if v.dim() != 1 or v.numel() < _HEAD + 3 or (v.numel() - _HEAD) % 3:
            raise ValueError(f"not a Calibration vector: shape {tuple(v.shape)}")
        out = cls((v.numel() - _HEAD) // 3)
        out._sums = v.clone()
        return out

    @property
    def count(self) -> int:
        """Number of samples added."""
        return int(round(self.vector()[_COUNT]))

    @property
    def accuracy(self) -> float:
        """Fraction of samples whose top class is the label (NaN when empty)."""
        v = self.vector()
        return float(v[_CORRECT] / v[_COUNT]) if v[_COUNT] else math.nan

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood of the labels in nats, probabilities >= PROB_FLOOR."""
        v = self.vector()
        return float(v[_NLL] / v[_COUNT]) if v[_COUNT] else math.nan

    @property
    def ece(self) -> float:
        """Expected calibration error: sum_b |acc_b - conf_b| * n_b / N (NaN when empty)."""
        v = self.vector()
        if not v[_COUNT]:
            return math.nan
        n, conf, correct = v[_HEAD:].reshape(3, self.num_bins)
        # |acc_b - conf_b| * n_b = |correct_b - conf_sum_b|: no division, empty bins add 0.
        return float(np.abs(correct - conf).sum() / v[_COUNT])

    def reliability(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per bin: (mean confidence, accuracy, count); NaN for the means of empty bins.

        What a reliability diagram plots; the bin edges are
        ``np.linspace(0, 1, num_bins + 1)``.
        """
        n, conf, correct = self.vector()[_HEAD:].reshape(3, self.num_bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            return conf / n, correct / n, n.copy()

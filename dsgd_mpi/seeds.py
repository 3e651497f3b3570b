"""Seed streams: every random draw of a run comes from (stream tag, seed, ...).

A draw is a pure function of integers, so every rank can recompute every other
rank's draws without messages and a resumed run repeats them exactly. The tag
keeps the purposes apart (the partition and the augmentation never share a
stream even for equal remaining parts). The tag values are part of the
reproducibility contract: changing one changes every run's data order.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

__all__ = ["Stream", "derive_seed", "generator"]


class Stream(IntEnum):
    """What a random stream is for; the value is mixed into its seed."""

    PERM = 1  # iid permutation of the train set: (seed, epoch)
    DIRICHLET = 2  # dirichlet partition: (seed)
    SHUFFLE = 3  # order of one pass over a dirichlet shard: (seed, rank, pass)
    AUGMENT = 4  # crop and flip of one batch: (seed, rank, epoch, batch)
    SYNTH = 5  # synthetic data set: (seed[, train])
    SKETCH = 6  # CountSketch of the consensus measure: (seed, step)
    PERTURB = 7  # isotropic smoothing noise (perturb gaussian): (seed, rank, step)
    SHARPNESS = 8  # sharpness subset and random vectors: (seed, evaluation step)
    AVERAGE_DIRECTION = 9  # avg-SAM's coefficients z_ij of the D-SGD deviations: (seed, step)
    SUBSET = 10  # the training subset of data.train_size: (seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (SeedSequence: well spread, platform independent)."""
    words = [int(p) % (1 << 64) for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator(*parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from ``parts``.

    The same seed gives different numbers on CPU (Mersenne Twister) and CUDA
    (Philox): draws are reproducible per device type, not across them.
    """
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g

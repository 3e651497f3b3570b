"""This rank's share of a data set: disjoint shards, batches, augmentation.

Readers in :mod:`dsgd_mpi.data` bring a split into memory; this module decides
which samples each rank sees, in which order, and how a batch becomes float32
(normalized, augmented as batched tensor ops). All randomness derives from
(seed, epoch, rank, batch index), so a resumed run sees identical batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from dsgd_mpi.data import AUGMENTED, PAD, DataError, DatasetInfo, Split
from dsgd_mpi.seeds import Stream, generator


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, on the images' device."""
    mean = torch.tensor(info.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.to(torch.float32) / 255.0 - mean) / std


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """Random crop (same size, ``pad`` pixels of zero padding) + random horizontal flip.

    ``images``: (B, C, H, W) of any dtype. Random numbers come from the CPU
    ``generator`` (so results do not depend on the device); the gather runs on
    the images' device.
    """
    b, c, h, w = images.shape
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.randint(0, 2, (b,), generator=generator).bool()
    dev = images.device
    oy, ox, flip = oy.to(dev), ox.to(dev), flip.to(dev)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy[:, None] + ar_h[None, :]  # (B, H)
    cols = ox[:, None] + torch.where(flip[:, None], (w - 1) - ar_w[None, :], ar_w[None, :])
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


# ----------------------------------------------------------------------------- sharding


def dirichlet_partition(
    labels: np.ndarray | torch.Tensor,
    world_size: int,
    alpha: float,
    seed: int,
    *,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Split sample indices into ``world_size`` disjoint, covering, label-skewed shards.

    For each class, proportions over ranks are drawn from Dirichlet(alpha); ranks
    that already hold N / world_size samples get no more (the usual balancing of
    Wang et al. 2020 / Lin et al. 2021, which keeps shard sizes comparable). The
    draw is repeated until every shard has at least ``min_size`` samples.
    Deterministic in (labels, world_size, alpha, seed); the same on every rank.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    n = len(labels)
    if world_size * min_size > n:
        raise DataError(
            f"dirichlet: {n} samples cannot give {world_size} shards of >= {min_size} samples"
        )
    rng = np.random.default_rng(np.random.SeedSequence([int(Stream.DIRICHLET), seed % (1 << 64)]))
    classes = np.unique(labels)
    cap = n / world_size
    best = 0
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(world_size)]
        sizes = np.zeros(world_size, dtype=np.int64)
        for c in classes:
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(world_size, float(alpha)))
            p = p * (sizes < cap)
            total = p.sum()
            p = p / total if total > 0 else np.full(world_size, 1.0 / world_size)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for r, chunk in enumerate(np.split(idx, cuts)):
                parts[r].append(chunk)
                sizes[r] += len(chunk)
        best = max(best, int(sizes.min()))
        if sizes.min() >= min_size:
            return [np.sort(np.concatenate(p)) for p in parts]
    raise DataError(
        f"dirichlet(alpha={alpha}): after {max_tries} draws the smallest of {world_size} shards "
        f"had {best} samples, need >= {min_size}; raise data.alpha or lower data.batch_size"
    )


class ShardedLoader:
    """This rank's batches for one epoch.

    iid: every epoch a permutation of the whole train set drawn from (seed,
    epoch), identical on all ranks, split into world_size disjoint equal shards
    (reshuffle=False: the epoch-0 permutation every epoch). dirichlet: fixed
    heterogeneous shards drawn once from Dirichlet(alpha) per class (seed),
    shuffled within the shard per epoch (from (seed, rank, epoch); reshuffle=False:
    the epoch-0 order every epoch). Drops the ragged tail so every rank has the
    same number of batches (steps_per_epoch = min over ranks).

    Batches are normalised float32 images and int64 labels on ``device``;
    with ``augment`` (cifar10/cifar100/imagenet32 only) each batch gets a random
    crop with 4 pixels of zero padding and a random horizontal flip, from a
    generator seeded by (seed, rank, epoch, batch index).
    """

    def __init__(
        self,
        split: Split,
        info: DatasetInfo,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        partition: str = "iid",
        alpha: float = 0.5,
        reshuffle: bool = True,
        augment: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if world_size < 1:
            raise DataError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} outside 0..{world_size - 1}")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if partition not in ("iid", "dirichlet"):
            raise DataError(f"partition must be 'iid' or 'dirichlet', got {partition!r}")
        if partition == "dirichlet" and not alpha > 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
        self.split, self.info = split, info
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.partition, self.alpha, self.reshuffle = partition, alpha, reshuffle
        self.augment = bool(augment) and info.name in AUGMENTED
        self.seed = seed
        self.device = torch.device(device)
        n = len(split)
        self.shard: torch.Tensor | None = None  # fixed shard (dirichlet only)
        if partition == "iid":
            self.shard_size = n // world_size
            min_shard = self.shard_size
        else:
            shards = dirichlet_partition(split.labels, world_size, alpha, seed, min_size=batch_size)
            self.shard = torch.from_numpy(shards[rank])
            self.shard_size = len(self.shard)
            min_shard = min(len(s) for s in shards)
        self.steps_per_epoch = min_shard // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{info.name}: {n} samples over {world_size} ranks leave a shard of {min_shard} "
                f"samples, smaller than batch_size {batch_size}"
            )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for ``epoch``, in batch order (tail included)."""
        e = epoch if self.reshuffle else 0
        if self.shard is None:
            perm = torch.randperm(len(self.split), generator=generator(Stream.PERM, self.seed, e))
            lo = self.rank * self.shard_size
            return perm[lo : lo + self.shard_size]
        g = generator(Stream.SHUFFLE, self.seed, self.rank, e)
        return self.shard[torch.randperm(self.shard_size, generator=g)]

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) for batch indices ``start .. steps_per_epoch - 1``."""
        if not 0 <= start <= self.steps_per_epoch:
            raise DataError(f"start {start} outside 0..{self.steps_per_epoch}")
        order = self.epoch_indices(epoch)
        bs = self.batch_size
        for b in range(start, self.steps_per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            images = self.split.images[idx].to(self.device, non_blocking=True)
            labels = self.split.labels[idx].to(self.device, non_blocking=True)
            if self.augment:
                images = augment_batch(
                    images, generator(Stream.AUGMENT, self.seed, self.rank, epoch, b)
                )
            yield normalize(images, self.info), labels


def eval_slice(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of this rank's contiguous part of ``n`` items (sizes differ by <= 1)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def eval_batches(
    split: Split,
    info: DatasetInfo,
    *,
    rank: int,
    world_size: int,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's contiguous slice of ``split`` (disjoint across ranks, covering all of
    it), normalised, no augmentation; the last batch may be smaller."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside 0..{world_size - 1}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    lo, hi = eval_slice(len(split), rank, world_size)
    for s in range(lo, hi, batch_size):
        e = min(s + batch_size, hi)
        images = split.images[s:e].to(device, non_blocking=True)
        labels = split.labels[s:e].to(device, non_blocking=True)
        yield normalize(images, info), labels

"""This rank's share of a data set: disjoint shards, batches, augmentation.

Readers in :mod:`dsgd_mpi.data` bring a split into memory; this module decides
which samples each rank sees, in which order, and how a batch becomes float32
(normalised, augmented, optionally resized, as batched tensor ops on the
device). All randomness derives from (seed, epoch, rank, batch index) through
:mod:`dsgd_mpi.seeds`, so a resumed run sees identical batches.

Host traffic: when the split (iid) or this rank's shard (dirichlet) fits in
``max_device_bytes`` it is copied to the device once and every batch is
gathered there with slices of one index tensor moved per epoch; normalisation
constants are cached per device and augmentation draws on the device. Only a
split too large for the device is gathered on the host, one pinned copy per
batch.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dsgd_mpi.data import AUGMENTED, PAD, DataError, DatasetInfo, Split
from dsgd_mpi.seeds import Stream, derive_seed, generator

__all__ = [
    "DEFAULT_MAX_DEVICE_BYTES",
    "ShardedLoader",
    "augment_batch",
    "dirichlet_partition",
    "eval_batches",
    "eval_slice",
    "normalize",
    "resize_batch",
]

DEFAULT_MAX_DEVICE_BYTES = 2 << 30  # CIFAR's train set is 150 MB, ImageNet32's 3.9 GB


@functools.lru_cache(maxsize=32)
def _norm_constants(info: DatasetInfo, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with ``x * scale - shift == (x / 255 - mean) / std``, made once per device."""
    mean = torch.tensor(info.mean, dtype=torch.float64)
    std = torch.tensor(info.std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, -1, 1, 1).to(device)
    shift = (mean / std).to(torch.float32).view(1, -1, 1, 1).to(device)
    return scale, shift


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, on the images' device.

    One conversion and two in-place ops with constants cached on the device (no
    host-to-device copy per batch); always a new tensor.
    """
    scale, shift = _norm_constants(info, images.device)
    return images.to(torch.float32, copy=True).mul_(scale).sub_(shift)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a float (B, C, H, W) batch to ``size`` x ``size``, on its device.

    Zhu et al. (2023) feed CIFAR to their ResNet-18 at 56 x 56. Applied after
    normalisation: bilinear weights sum to one, so it commutes with the
    per-channel affine map and the order does not matter.
    """
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """Random crop (same size, ``pad`` pixels of zero padding) + random horizontal flip.

    ``images``: (B, C, H, W) of any dtype. The offsets and flips are drawn from
    ``generator`` on its own device; pass a generator on the images' device
    so nothing crosses the bus (a CPU generator with CUDA images works, at the
    cost of three small copies). The same seed draws different numbers on CPU
    and CUDA generators: crops are reproducible per device type only.
    """
    b, c, h, w = images.shape
    gdev = generator.device
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev)
    flip = torch.randint(0, 2, (b,), generator=generator, device=gdev).bool()
    dev = images.device
    oy, ox, flip = oy.to(dev), ox.to(dev), flip.to(dev)  # no-ops for a generator on dev
    padded = F.pad(images, (pad, pad, pad, pad))
    wp = w + 2 * pad
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = oy[:, None] + ar_h[None, :]  # (B, H)
    cols = ox[:, None] + torch.where(flip[:, None], (w - 1) - ar_w[None, :], ar_w[None, :])
    # One gather over flattened padded planes: an index per output pixel shared by
    # the channels (stride-0 expand), much cheaper than 4-tensor advanced indexing.
    where = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, where).view(b, c, h, w)


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host batch to ``device``; through pinned memory to CUDA so the copy is async."""
    if images.device.type != "cpu" or device.type == "cpu":
        return images.to(device)  # already on a device ("cuda" vs "cuda:0"), or host to host
    if device.type == "cuda":
        images = images.pin_memory()  # caching host allocator: safe to reuse after the copy
    return images.to(device, non_blocking=True)


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


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
        f"had {best} samples, need >= {min_size}; raise data.alpha or use fewer ranks"
    )


class ShardedLoader:
    """This rank's batches, epoch by epoch.

    Every partition has the same epoch: ``steps_per_epoch = (N // world_size) //
    batch_size`` steps, on every rank (an epoch is one pass over the data on
    average over ranks, and all ranks step together).

    iid: every epoch a permutation of the whole train set drawn from (seed,
    epoch), identical on all ranks, split into world_size disjoint equal shards;
    the ragged tail of a shard is dropped (reshuffle=False: the epoch-0
    permutation every epoch).

    dirichlet: fixed heterogeneous shards drawn once from Dirichlet(alpha) per
    class (seed). Each rank reads an endless stream of passes over its own
    shard, pass p in the order drawn from (seed, rank, p) (reshuffle=False: the
    pass-0 order every pass); epoch e is positions [e * E, (e + 1) * E) of the
    stream, E = steps_per_epoch * batch_size. A shard smaller than E wraps
    around within an epoch; a larger one continues next epoch where this one
    stopped. Either way batch b of epoch e is a pure function of (seed, rank,
    e, b), which is what resuming with ``batches(epoch, start)`` relies on.

    Batches are normalised float32 images and int64 labels on ``device``.
    With ``augment`` (cifar10/cifar100/imagenet32 only) each batch gets a random
    crop with 4 pixels of zero padding and a random horizontal flip, drawn on
    ``device`` from a generator seeded by (seed, rank, epoch, batch index): the
    batches repeat exactly run to run on the same device type, but a CUDA run
    draws other crops than a CPU run (Philox vs Mersenne Twister). ``resize``
    bilinearly resizes every batch to resize x resize (Zhu et al.: 56 for
    ResNet-18 on CIFAR, without augmentation).

    The images this rank indexes (the split for iid, the shard for dirichlet)
    and their labels are copied to ``device`` once if they take at most
    ``max_device_bytes``; otherwise batches are gathered on the host and
    copied one by one (labels stay on the device either way).
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
        resize: int | None = None,
        max_device_bytes: int = DEFAULT_MAX_DEVICE_BYTES,
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
        _check_resize(resize)
        if max_device_bytes < 0:
            raise DataError(f"max_device_bytes must be >= 0, got {max_device_bytes}")
        self.split, self.info = split, info
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.partition, self.alpha, self.reshuffle = partition, alpha, reshuffle
        self.augment = bool(augment) and info.name in AUGMENTED
        self.seed = seed
        self.device = torch.device(device)
        self.resize = resize
        n = len(split)
        self.steps_per_epoch = n // world_size // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{info.name}: {n} samples over {world_size} ranks leave {n // world_size} per "
                f"rank, fewer than batch_size {batch_size}"
            )
        self.epoch_size = self.steps_per_epoch * batch_size  # samples per rank per epoch
        self.shard: torch.Tensor | None = None  # fixed shard (dirichlet only)
        if partition == "iid":
            self.shard_size = n // world_size
            images, labels = split.images, split.labels  # positions are sample indices
        else:
            shards = dirichlet_partition(split.labels, world_size, alpha, seed)
            self.shard = torch.from_numpy(shards[rank])
            self.shard_size = len(self.shard)
            # positions are offsets into the shard: only the shard needs to be on the device
            where = self.shard.to(split.images.device)
            images = split.images.index_select(0, where)
            labels = split.labels.index_select(0, where.to(split.labels.device))
        # by size alone, also on CPU (a no-op copy there), so both paths run in CPU tests
        self.resident = _nbytes(images, labels) <= max_device_bytes
        self._images = images.to(self.device) if self.resident else images
        self._labels = labels.to(self.device)
        # One generator on the device, reseeded per batch: no per-batch allocation.
        self._augment_gen = torch.Generator(device=self.device) if self.augment else None
        self._pass0: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _pass_order(self, p: int) -> torch.Tensor:
        """Order of pass ``p`` over the dirichlet shard (offsets into it)."""
        if not self.reshuffle:
            if self._pass0 is None:
                g = generator(Stream.SHUFFLE, self.seed, self.rank, 0)
                self._pass0 = torch.randperm(self.shard_size, generator=g)
            return self._pass0
        g = generator(Stream.SHUFFLE, self.seed, self.rank, p)
        return torch.randperm(self.shard_size, generator=g)

    def _positions(self, epoch: int) -> torch.Tensor:
        """Rows of this loader's images (split for iid, shard for dirichlet) for ``epoch``."""
        if epoch < 0:
            raise DataError(f"epoch must be >= 0, got {epoch}")
        if self.shard is None:
            e = epoch if self.reshuffle else 0
            perm = torch.randperm(len(self.split), generator=generator(Stream.PERM, self.seed, e))
            lo = self.rank * self.shard_size
            return perm[lo : lo + self.epoch_size]
        size, first = self.shard_size, epoch * self.epoch_size
        p0, p1 = first // size, (first + self.epoch_size - 1) // size
        stream = torch.cat([self._pass_order(p) for p in range(p0, p1 + 1)])
        skip = first - p0 * size
        return stream[skip : skip + self.epoch_size]

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices (into the split) for ``epoch``, in batch order.

        ``steps_per_epoch * batch_size`` of them: batch b is ``[b * B, (b + 1) * B)``.
        """
        pos = self._positions(epoch)
        return pos if self.shard is None else self.shard[pos]

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) for batch indices ``start .. steps_per_epoch - 1``."""
        if not 0 <= start <= self.steps_per_epoch:
            raise DataError(f"start {start} outside 0..{self.steps_per_epoch}")
        if start == self.steps_per_epoch:
            return
        bs = self.batch_size
        order = self._positions(epoch)[start * bs :]
        # the only per-epoch copies: the index tensor, to where images and labels live
        image_order = order.to(self._images.device)
        label_order = image_order if self.resident else order.to(self.device)
        for b in range(start, self.steps_per_epoch):
            rows = slice((b - start) * bs, (b - start + 1) * bs)
            images = _to_device(self._images.index_select(0, image_order[rows]), self.device)
            labels = self._labels.index_select(0, label_order[rows])
            if self._augment_gen is not None:
                self._augment_gen.manual_seed(
                    derive_seed(Stream.AUGMENT, self.seed, self.rank, epoch, b)
                )
                images = augment_batch(images, self._augment_gen)
            x = normalize(images, self.info)
            yield (x if self.resize is None else resize_batch(x, self.resize)), labels


def _check_resize(resize: int | None) -> None:
    if resize is not None and (isinstance(resize, bool) or resize < 1):
        raise DataError(f"resize must be a positive number of pixels or None, got {resize!r}")


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
    resize: int | None = None,
    max_device_bytes: int = DEFAULT_MAX_DEVICE_BYTES,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's contiguous slice of ``split`` (disjoint across ranks, covering all of
    it), normalised (and resized to ``resize`` if given), no augmentation; the last batch
    may be smaller.

    The slice is copied to ``device`` in one piece if it takes at most
    ``max_device_bytes``, else batch by batch. A split already on ``device``
    (``Split.to``) is not copied at all: the way to evaluate often on a GPU.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} outside 0..{world_size - 1}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    _check_resize(resize)
    device = torch.device(device)
    lo, hi = eval_slice(len(split), rank, world_size)
    images, labels = split.images[lo:hi], split.labels[lo:hi]  # views
    if images.device != device and _nbytes(images, labels) <= max_device_bytes:
        images = images.to(device)
    labels = labels.to(device)
    for s in range(0, hi - lo, batch_size):
        x = normalize(_to_device(images[s : s + batch_size], device), info)
        yield (x if resize is None else resize_batch(x, resize)), labels[s : s + batch_size]

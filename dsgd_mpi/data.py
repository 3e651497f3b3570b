"""Datasets read into memory (readers); per-rank sharding and batching live in shards.py.

A dataset is a :class:`Split`: uint8 images ``(N, C, H, W)`` and int64 labels
``(N,)``, loaded once. Batches are built by indexing; cropping, flipping and
normalisation are tensor ops on the whole batch (no per-sample PIL), on the
batch's device.

Randomness is a pure function of seeds (streams in :mod:`dsgd_mpi.seeds`), so
every rank can compute every other rank's shard without communication and a
resumed run sees identical batches:

- subset of the train set (data.train_size): (seed)            - same on all ranks, any world size
- iid permutation of the train set:   (seed, epoch)             - same on all ranks
- dirichlet partition:                (seed)                    - same on all ranks
- order of pass p over a dirichlet shard: (seed, rank, p)
- augmentation of batch b:            (seed, rank, epoch, b)

This module knows nothing of MPI: ``rank`` and ``world_size`` are plain ints,
and a download is coordinated through callbacks (:func:`fetch_once`) that the
runner builds from its communicator.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsgd_mpi import datafiles
from dsgd_mpi.datafiles import DataError, fetch_once, read_idx
from dsgd_mpi.seeds import Stream, generator

__all__ = [
    "DATASETS",
    "Coordinator",
    "DataError",
    "DatasetInfo",
    "Split",
    "fetch_once",
    "load",
    "read_idx",
    "subset",
]

PAD = 4  # random-crop zero padding, in pixels


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(f"labels must be int64 (N,), got {self.labels.dtype}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: str | torch.device) -> Split:
        """The same split with both tensors on ``device`` (itself if already there).

        Lets a caller keep the test set resident on the GPU once instead of
        copying it on every evaluation.
        """
        device = torch.device(device)
        if self.images.device == device and self.labels.device == device:
            return self
        return Split(self.images.to(device), self.labels.to(device))


INFOS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, 28, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(
        "cifar10", 10, 3, 32, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    ),
    "cifar100": DatasetInfo(
        "cifar100", 100, 3, 32, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    ),
    "imagenet32": DatasetInfo(
        "imagenet32", 1000, 3, 32, 32, (0.4811, 0.4575, 0.4078), (0.2605, 0.2533, 0.2683)
    ),
    "synthetic": DatasetInfo("synthetic", 10, 1, 28, 28, (0.3440,), (0.2628,)),
}
DATASETS: tuple[str, ...] = tuple(INFOS)
AUGMENTED = frozenset({"cifar10", "cifar100", "imagenet32"})

# ----------------------------------------------------------------------------- loading


Coordinator = Callable[[Callable[[], bool], Callable[[], None]], None]
"""``coordinate(have_files, download)``: runs ``download`` on the ranks that should, collectively
(e.g. ``functools.partial(fetch_once, rank0=..., node_leader=..., barrier=comm.Barrier)``)."""


def load(
    name: str,
    root: str,
    *,
    train: bool,
    download: bool = False,
    synthetic_size: int = 2048,
    seed: int = 0,
    coordinate: Coordinator | None = None,
    train_size: int | None = None,
) -> tuple[Split, DatasetInfo]:
    """Load the train or test split of dataset ``name`` from ``root`` into memory.

    With ``download`` a missing fashion_mnist / cifar10 / cifar100 is fetched
    with torchvision first. Alone (``coordinate=None``) this process downloads
    if it does not see the files: right for one process, a race when many
    ranks share ``root``. Under MPI pass ``coordinate`` (see :func:`fetch_once`):
    it is then called on every rank with this data set's ``have_files`` and
    ``download`` callbacks and decides who downloads while the others wait;
    afterwards every rank only reads. It is a collective: whether it is called
    depends only on (name, download), so all ranks agree.

    ``train_size`` (train split only; None: all of it) keeps a seeded subset of
    that many samples (:func:`subset`).
    """
    key = name.lower().replace("-", "_")
    if key not in INFOS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    info = INFOS[key]
    root = os.path.expanduser(str(root)) if root is not None else ""
    source = datafiles.download_source(key, root, train)
    if download and source is not None:
        have_files, fetch = source
        if coordinate is not None:
            coordinate(have_files, fetch)
        elif not have_files():
            fetch()
    split = Split(*datafiles.read(key, root, train, download, synthetic_size, seed))
    c, h, w = split.images.shape[1:]
    if (c, h, w) != (info.in_channels, info.height, info.width):
        raise DataError(
            f"{key}: images are {c}x{h}x{w}, expected {info.in_channels}x{info.height}x{info.width}"
        )
    if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= info.num_classes):
        raise DataError(
            f"{key}: labels outside 0..{info.num_classes - 1} "
            f"(min {int(split.labels.min())}, max {int(split.labels.max())})"
        )
    if train and train_size is not None:
        split = subset(split, train_size, seed)
    return split, info


def subset(split: Split, size: int, seed: int) -> Split:
    """``size`` samples of ``split`` drawn without replacement from ``seed`` alone.

    The same samples for every world size (the shards are cut from the subset
    afterwards), in the split's order; a larger ``size`` keeps the samples of a
    smaller one (the first ``size`` of one seeded permutation).
    """
    if not 1 <= size <= len(split):
        raise DataError(
            f"data.train_size: must be 1..{len(split)}, the training samples of this data set "
            f"(got {size})"
        )
    perm = torch.randperm(len(split), generator=generator(Stream.SUBSET, seed))
    keep = perm[:size].sort().values
    return Split(split.images.index_select(0, keep), split.labels.index_select(0, keep))


# ----------------------------------------------------------------------------- batch ops

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

import gzip
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

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

FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
PAD = 4  # random-crop zero padding, in pixels


class DataError(ValueError):
    """A dataset is missing, corrupt, or cannot be sharded as asked."""


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
    source = _download_source(key, root, train)
    if download and source is not None:
        have_files, fetch = source
        if coordinate is not None:
            coordinate(have_files, fetch)
        elif not have_files():
            fetch()
    if key == "fashion_mnist":
        split = _load_fashion_mnist(root, train)
    elif key in ("cifar10", "cifar100"):
        split = _load_cifar(key, root, train)
    elif key == "imagenet32":
        split = _load_imagenet32(root, train, download)
    else:
        split = _synthetic(synthetic_size, train, seed)
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


def fetch_once(
    have_files: Callable[[], bool],
    download: Callable[[], None],
    *,
    rank0: bool,
    node_leader: bool,
    barrier: Callable[[], None],
) -> None:
    """Download a data set once per file system while the other ranks wait; collective.

    Every rank calls this with its own view of the files. Rank 0 downloads if
    it does not see them (on a shared file system that serves everyone);
    barrier; then a node leader (one rank per node) that still does not see
    them downloads, for a ``root`` on node-local disk; barrier. On return every
    rank may read. Nobody else writes into ``root``, so two processes never
    extract the same archive at once.

    A failed download raises :class:`DataError` on the downloading rank, which
    then never reaches the barrier its peers wait in. Leaving the barrier is
    the caller's job: the runner must turn the exception into ``MPI_Abort``
    (as it does for any exception on one rank), or the others hang.
    """
    if rank0 and not have_files():
        _download_checked(have_files, download)
    barrier()
    if node_leader and not rank0 and not have_files():
        _download_checked(have_files, download)
    barrier()


def _download_checked(have_files: Callable[[], bool], download: Callable[[], None]) -> None:
    try:
        download()
    except DataError:
        raise
    except Exception as e:  # network, disk: report as a data problem
        raise DataError(f"download failed: {e}") from e
    if not have_files():  # fail here, on the rank that knows why, not later on every reader
        raise DataError("download finished but the expected files are still missing")


def _download_source(
    key: str, root: str, train: bool
) -> tuple[Callable[[], bool], Callable[[], None]] | None:
    """(have_files, download) for a data set torchvision can fetch, else None."""
    if key == "fashion_mnist":
        bases = _IDX_FILES[train]

        def have() -> bool:
            return all(_find_idx(root, b) is not None for b in bases)

        return have, lambda: _torchvision_download(key, "FashionMNIST", root, train)
    if key in _CIFAR:
        folder, train_files, test_files, _, tv_class = _CIFAR[key]
        files = [os.path.join(root, folder, f) for f in (train_files if train else test_files)]
        return (
            lambda: all(os.path.isfile(p) for p in files),
            lambda: _torchvision_download(key, tv_class, root, train),
        )
    return None


def _torchvision_download(key: str, tv_class: str, root: str, train: bool) -> None:
    try:
        import torchvision

        getattr(torchvision.datasets, tv_class)(root, train=train, download=True)
    except Exception as e:  # network, disk: report as a data problem
        raise DataError(f"{key}: download into {root} failed: {e}") from e


# Fashion-MNIST (IDX) ---------------------------------------------------------------

_IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_APT_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` "
    f"(files in {FASHION_MNIST_DEBIAN_ROOT}) or load with download=True"
)


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed if the name ends in .gz).

    Checks the magic number (0x0000 08 ``ndim``) and that the payload matches
    the header; raises :class:`DataError` naming the file otherwise.
    """
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except FileNotFoundError:
        raise DataError(f"missing file {path}") from None
    except (OSError, EOFError) as e:
        raise DataError(f"corrupt file {path}: {e}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"corrupt file {path}: {len(raw)} bytes, shorter than the IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise DataError(
            f"corrupt file {path}: magic number {magic:#010x}, expected {0x0800 + ndim:#010x} "
            f"(unsigned-byte IDX with {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(f"corrupt file {path}: {len(raw)} bytes, header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx(root: str, base: str) -> str | None:
    for folder in (root, os.path.join(root, "FashionMNIST", "raw")):
        for fname in (base + ".gz", base):
            path = os.path.join(folder, fname)
            if os.path.isfile(path):
                return path
    return None


def _load_fashion_mnist(root: str, train: bool) -> Split:
    bases = _IDX_FILES[train]
    paths = [_find_idx(root, b) for b in bases]
    for base, path in zip(bases, paths, strict=True):
        if path is None:
            raise DataError(
                f"fashion_mnist: missing file {os.path.join(root, base + '.gz')}; {_APT_HINT}"
            )
    try:
        images = read_idx(paths[0], 3)
        labels = read_idx(paths[1], 1)
    except DataError as e:
        raise DataError(f"fashion_mnist: {e}; {_APT_HINT}") from None
    if len(images) != len(labels):
        raise DataError(
            f"fashion_mnist: {paths[0]} has {len(images)} images but {paths[1]} "
            f"has {len(labels)} labels"
        )
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long())


# CIFAR (torchvision's pickled batches) ------------------------------------------

_CIFAR = {
    # name: (folder, train files, test files, label key, torchvision class name)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "labels",
        "CIFAR10",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "fine_labels", "CIFAR100"),
}


def _read_cifar_batch(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise DataError(f"missing file {path}") from None
    except Exception as e:  # unpickling garbage raises many different types
        raise DataError(f"corrupt file {path}: {e}") from None
    if not isinstance(entry, dict):
        raise DataError(f"corrupt file {path}: expected a pickled dict")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise DataError(f"corrupt file {path}: needs keys 'data' and {label_key!r}")
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"corrupt file {path}: data is {data.dtype} {data.shape}, want N x 3072")
    if labels.shape != (len(data),):
        raise DataError(f"corrupt file {path}: {len(data)} images but {labels.shape} labels")
    return data, labels


def _load_cifar(name: str, root: str, train: bool) -> Split:
    folder, train_files, test_files, label_key, _ = _CIFAR[name]
    files = [os.path.join(root, folder, f) for f in (train_files if train else test_files)]
    for p in files:
        if not os.path.isfile(p):
            raise DataError(f"{name}: missing file {p} (load with download=True to fetch it)")
    parts = [_read_cifar_batch(p, label_key) for p in files]
    data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([lab for _, lab in parts])
    return Split(torch.from_numpy(data), torch.from_numpy(labels))


# Downsampled ImageNet 32x32 (npz batches) --------------------------------------------


def _load_imagenet32(root: str, train: bool, download: bool) -> Split:
    names = [f"train_data_batch_{i}.npz" for i in range(1, 11)] if train else ["val_data.npz"]
    files = [os.path.join(root, n) for n in names]
    for p in files:
        if not os.path.isfile(p):
            extra = " (no automatic download: it needs an image-net.org login)" if download else ""
            raise DataError(
                f"imagenet32: missing file {p}; get Imagenet32_train_npz / Imagenet32_val_npz "
                f"from image-net.org (downsampled ImageNet) and unpack into {root}{extra}"
            )
    datas, labels = [], []
    for p in files:
        try:
            with np.load(p) as z:
                d, lab = z["data"], np.asarray(z["labels"]).astype(np.int64).reshape(-1)
        except KeyError as e:
            raise DataError(f"corrupt file {p}: missing array {e}") from None
        except Exception as e:
            raise DataError(f"corrupt file {p}: {e}") from None
        if d.dtype != np.uint8 or d.ndim != 2 or d.shape[1] != 3072 or len(lab) != len(d):
            raise DataError(
                f"corrupt file {p}: data {d.dtype} {d.shape}, labels {lab.shape}; "
                "want uint8 N x 3072 and N labels"
            )
        if len(lab) and (lab.min() < 1 or lab.max() > 1000):
            raise DataError(f"corrupt file {p}: labels must be 1..1000 (1-based)")
        datas.append(d)
        labels.append(lab - 1)
    n = sum(len(d) for d in datas)
    images = torch.empty((n, 3, 32, 32), dtype=torch.uint8)  # filled in place: no 2x peak
    offset = 0
    for d in datas:
        images[offset : offset + len(d)] = torch.from_numpy(d.reshape(-1, 3, 32, 32))
        offset += len(d)
    return Split(images, torch.from_numpy(np.concatenate(labels)))


# Synthetic ------------------------------------------------------------------------


def _synthetic(size: int, train: bool, seed: int) -> Split:
    """10 classes of 1x28x28 images: a smooth class prototype plus pixel noise.

    Prototypes depend on ``seed`` only (shared by train and test); the samples
    and noise also depend on ``train``, so the two splits differ.
    """
    if size < 1:
        raise DataError(f"synthetic_size must be positive, got {size}")
    words = [int(Stream.SYNTH), seed % (1 << 64)]
    proto_rng = np.random.default_rng(np.random.SeedSequence(words))
    coarse = proto_rng.random((10, 7, 7))
    protos = coarse.repeat(4, axis=1).repeat(4, axis=2)  # (10, 28, 28) blocky patterns
    rng = np.random.default_rng(np.random.SeedSequence([*words, int(train)]))
    labels = rng.permutation(np.arange(size) % 10)
    x = 0.25 + 0.15 * protos[labels] + rng.normal(0.0, 0.3, size=(size, 28, 28))
    images = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return Split(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


# ----------------------------------------------------------------------------- batch ops

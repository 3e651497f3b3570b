"""The files of each data set: where they are, how to fetch them, how to read them.

Every reader checks what it reads and raises :class:`DataError` naming the
file; each returns the whole split as (uint8 images N x C x H x W, int64
labels) tensors, which :func:`dsgd_mpi.data.load` checks against the data
set's shape and classes. Formats: Fashion-MNIST's IDX files (Debian's
``dataset-fashion-mnist`` or torchvision's download), CIFAR-10/100's pickled
batches (torchvision's), downsampled ImageNet 32x32's npz batches, and a
seeded synthetic set for tests.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable

import numpy as np
import torch

from dsgd_mpi.seeds import Stream

FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
#: A whole split: uint8 images (N, C, H, W) and int64 labels (N,).
Images = tuple[torch.Tensor, torch.Tensor]


class DataError(ValueError):
    """A dataset is missing, corrupt, or cannot be sharded as asked."""



def read(key: str, root: str, train: bool, download: bool, synthetic_size: int,
         seed: int) -> Images:  # fmt: skip
    """The split of data set ``key`` (a name :func:`dsgd_mpi.data.load` knows)."""
    if key == "fashion_mnist":
        return _load_fashion_mnist(root, train)
    if key in _CIFAR:
        return _load_cifar(key, root, train)
    if key == "imagenet32":
        return _load_imagenet32(root, train, download)
    return _synthetic(synthetic_size, train, seed)


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


def download_source(
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


def _load_fashion_mnist(root: str, train: bool) -> Images:
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
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


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


def _load_cifar(name: str, root: str, train: bool) -> Images:
    folder, train_files, test_files, label_key, _ = _CIFAR[name]
    files = [os.path.join(root, folder, f) for f in (train_files if train else test_files)]
    for p in files:
        if not os.path.isfile(p):
            raise DataError(f"{name}: missing file {p} (load with download=True to fetch it)")
    parts = [_read_cifar_batch(p, label_key) for p in files]
    data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([lab for _, lab in parts])
    return torch.from_numpy(data), torch.from_numpy(labels)


# Downsampled ImageNet 32x32 (npz batches) --------------------------------------------


def _load_imagenet32(root: str, train: bool, download: bool) -> Images:
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
    return images, torch.from_numpy(np.concatenate(labels))


# Synthetic ------------------------------------------------------------------------


def _synthetic(size: int, train: bool, seed: int) -> Images:
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
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))

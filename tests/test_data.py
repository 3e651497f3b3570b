"""Tests for dsgd_mpi.data: readers on generated files, sharding, batching, augmentation."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from dsgd_mpi.data import INFOS, DataError, Split, fetch_once, load, read_idx
from dsgd_mpi.shards import ShardedLoader, augment_batch, eval_batches, normalize

DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra intra-op threads only add contention on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None) -> None:
    ndim = array.ndim
    header = struct.pack(">I", 0x0800 + ndim if magic is None else magic)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fmnist(root: Path, n_train: int = 30, n_test: int = 12) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def cifar_batch(n: int, label_key: bytes, classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"generated",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(x) for x in rng.integers(0, classes, n)],
    }


def dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def synthetic_split(n: int = 400, seed: int = 0) -> tuple[Split, object]:
    return load("synthetic", "", train=True, synthetic_size=n, seed=seed)


def cifar_like(n: int = 64) -> tuple[Split, object]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(n, dtype=torch.int64) % 10
    return Split(images, labels), INFOS["cifar10"]


# ----------------------------------------------------------------------------- readers


def test_idx_reader_generated(tmp_path: Path) -> None:
    make_fmnist(tmp_path)
    train, info = load("fashion_mnist", str(tmp_path), train=True)
    test, _ = load("fashion_mnist", str(tmp_path), train=False)
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (12, 1, 28, 28)
    assert train.labels.dtype == torch.int64
    assert train.labels.tolist() == [i % 10 for i in range(30)]
    assert (info.num_classes, info.in_channels, info.height, info.width) == (10, 1, 28, 28)
    raw = read_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), 3)
    assert torch.equal(train.images[:, 0], torch.from_numpy(raw))


def test_idx_reader_uncompressed_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    make_fmnist(raw)
    for gz in raw.glob("*.gz"):  # torchvision keeps both; test the plain files alone
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    split, _ = load("fashion_mnist", str(tmp_path), train=False)
    assert len(split) == 12


def test_idx_bad_magic(tmp_path: Path) -> None:
    make_fmnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(30), magic=0x0803)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz.*magic") as err:
        load("fashion_mnist", str(tmp_path), train=True)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


def test_idx_truncated_and_not_gzip(tmp_path: Path) -> None:
    make_fmnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-5]))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load("fashion_mnist", str(tmp_path), train=False)
    path.write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match="corrupt file .*t10k-images"):
        load("fashion_mnist", str(tmp_path), train=False)


def test_idx_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz") as err:
        load("fashion_mnist", str(tmp_path), train=True)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(DEBIAN_FMNIST, "train-images-idx3-ubyte.gz")),
    reason="Debian dataset-fashion-mnist not installed",
)
def test_idx_reader_debian_files() -> None:
    train, _ = load("fashion_mnist", DEBIAN_FMNIST, train=True)
    test, _ = load("fashion_mnist", DEBIAN_FMNIST, train=False)
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    for split in (train, test):
        assert split.labels.unique().tolist() == list(range(10))


def test_cifar10_reader(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    batches = [cifar_batch(7, b"labels", 10, seed=i) for i in range(6)]
    for i in range(5):
        dump(folder / f"data_batch_{i + 1}", batches[i])
    dump(folder / "test_batch", batches[5])
    train, info = load("cifar10", str(tmp_path), train=True)
    test, _ = load("cifar10", str(tmp_path), train=False)
    assert train.images.shape == (35, 3, 32, 32) and test.images.shape == (7, 3, 32, 32)
    assert info.num_classes == 10 and info.in_channels == 3
    want = np.concatenate([b[b"data"] for b in batches[:5]]).reshape(-1, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(want))
    assert train.labels.tolist() == sum((b[b"labels"] for b in batches[:5]), [])
    # channel-major: the first 1024 bytes of a row are the red plane
    assert torch.equal(test.images[0, 0].flatten(), torch.from_numpy(batches[5][b"data"][0, :1024]))


def test_cifar100_reader(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    train_b = cifar_batch(9, b"fine_labels", 100, seed=1)
    train_b[b"coarse_labels"] = [0] * 9
    dump(folder / "train", train_b)
    dump(folder / "test", cifar_batch(4, b"fine_labels", 100, seed=2))
    train, info = load("cifar100", str(tmp_path), train=True)
    test, _ = load("cifar100", str(tmp_path), train=False)
    assert info.num_classes == 100
    assert train.images.shape == (9, 3, 32, 32) and len(test) == 4
    assert train.labels.tolist() == train_b[b"fine_labels"]


def test_cifar_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py.*data_batch_1"):
        load("cifar10", str(tmp_path), train=True)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "test").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt file .*test"):
        load("cifar100", str(tmp_path), train=False)


def test_imagenet32_reader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    datas, labels = [], []
    for i in range(1, 11):
        d = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        lab = rng.integers(1, 1001, 3)
        np.savez(tmp_path / f"train_data_batch_{i}.npz", data=d, labels=lab, mean=np.zeros(3072))
        datas.append(d)
        labels.append(lab)
    np.savez(tmp_path / "val_data.npz", data=datas[0][:2], labels=np.array([1, 1000]))
    train, info = load("imagenet32", str(tmp_path), train=True)
    test, _ = load("imagenet32", str(tmp_path), train=False)
    assert info.num_classes == 1000
    assert train.images.shape == (30, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == (np.concatenate(labels) - 1).tolist()
    assert test.labels.tolist() == [0, 999]
    os.remove(tmp_path / "train_data_batch_7.npz")
    with pytest.raises(DataError, match="train_data_batch_7.npz"):
        load("imagenet32", str(tmp_path), train=True)


def test_synthetic_deterministic_and_splits_differ() -> None:
    a, info = load("synthetic", "", train=True, synthetic_size=100, seed=3)
    b, _ = load("synthetic", "", train=True, synthetic_size=100, seed=3)
    c, _ = load("synthetic", "", train=False, synthetic_size=100, seed=3)
    d, _ = load("synthetic", "", train=True, synthetic_size=100, seed=4)
    assert a.images.shape == (100, 1, 28, 28) and info.num_classes == 10
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.images, d.images)
    assert a.labels.bincount().tolist() == [10] * 10


def test_synthetic_is_learnable() -> None:
    train, _ = load("synthetic", "", train=True, synthetic_size=1000)
    test, _ = load("synthetic", "", train=False, synthetic_size=1000)
    x = train.images.float().flatten(1)
    centroids = torch.stack([x[train.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(test.images.float().flatten(1), centroids).argmin(1)
    assert (pred == test.labels).float().mean() > 0.5


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="cifar10"):
        load("mnist2", "", train=True)


# ----------------------------------------------------------------------------- train_size


def _rows(images: torch.Tensor) -> set[bytes]:
    """Each image as bytes: samples compared by content, whatever their index."""
    return {bytes(x) for x in images.flatten(1).numpy()}


def test_train_size_is_the_same_subset_at_4_and_16_workers(tmp_path: Path) -> None:
    make_fmnist(tmp_path, n_train=400)
    full, _ = load("fashion_mnist", str(tmp_path), train=True)
    seen = {}
    for n in (4, 16):  # as run.py and the simulator load it: the world size is not an argument
        split, info = load("fashion_mnist", str(tmp_path), train=True, seed=7, train_size=256)
        images = set()
        for ld in loaders(split, info, n, batch_size=4, seed=7):
            images |= _rows(split.images[ld.epoch_indices(0)])
        seen[n] = images
    assert len(seen[4]) == 256 and seen[4] == seen[16]  # every worker count trains on them all
    assert seen[4] < _rows(full.images)  # drawn from the training set, not all of it
    test, _ = load("fashion_mnist", str(tmp_path), train=False, seed=7, train_size=256)
    assert len(test) == 12  # the test set is never cut


def test_train_size_is_seeded_and_nested(tmp_path: Path) -> None:
    make_fmnist(tmp_path, n_train=400)

    def picked(size: int, seed: int) -> set[bytes]:
        split, _ = load("fashion_mnist", str(tmp_path), train=True, seed=seed, train_size=size)
        assert len(split) == size and split.labels.dtype == torch.int64
        return _rows(split.images)

    assert picked(100, 3) == picked(100, 3)
    assert picked(100, 3) != picked(100, 4)  # the subset follows run.seed
    full = _rows(load("fashion_mnist", str(tmp_path), train=True)[0].images)
    assert picked(50, 3) < picked(200, 3) < full  # a larger subset keeps the smaller one


def test_train_size_larger_than_the_training_set_names_the_key() -> None:
    with pytest.raises(DataError, match=r"^data\.train_size: must be 1\.\.400.*\(got 401\)"):
        load("synthetic", "", train=True, synthetic_size=400, train_size=401)


@pytest.mark.parametrize("value", ["0", "-3", "many", "5000"])
def test_bad_train_size_exits_2_naming_the_key(tmp_path: Path, capsys, value: str) -> None:
    from dsgd_mpi.sim.__main__ import main as sim_main

    config = tmp_path / "empty.yaml"
    config.write_text("")
    code = sim_main([str(config), "--workers=4", "data.name=synthetic", "data.synthetic_size=512",
                     f"data.train_size={value}", "run.steps=1", f"run.out_dir={tmp_path}"])
    assert code == 2
    assert "data.train_size" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.h5"))  # refused before any run file


# ----------------------------------------------------------------------------- sharding


def loaders(split, info, n: int, **kw) -> list[ShardedLoader]:
    return [ShardedLoader(split, info, rank=r, world_size=n, **kw) for r in range(n)]


def test_iid_shards_disjoint_and_covering() -> None:
    split, info = synthetic_split(400)
    ls = loaders(split, info, 4, batch_size=10, seed=5)
    for epoch in (0, 1):
        shards = [ld.epoch_indices(epoch) for ld in ls]
        assert all(len(s) == 100 for s in shards)
        assert sorted(torch.cat(shards).tolist()) == list(range(400))
    assert {ld.steps_per_epoch for ld in ls} == {10}


def test_iid_ragged_tail_dropped() -> None:
    split, info = synthetic_split(403)
    ls = loaders(split, info, 4, batch_size=30, seed=0)
    assert {ld.steps_per_epoch for ld in ls} == {3}
    seen = [torch.cat([y for _, y in ld.batches(0)]) for ld in ls]
    assert all(len(s) == 90 for s in seen)


def test_iid_same_permutation_across_ranks_and_epochs_differ() -> None:
    split, info = synthetic_split(400)
    # Two independently built "rank" objects see pieces of the same permutation.
    a = ShardedLoader(split, info, rank=0, world_size=2, batch_size=10, seed=7)
    b = ShardedLoader(split, info, rank=1, world_size=2, batch_size=10, seed=7)
    a2 = ShardedLoader(split, info, rank=0, world_size=2, batch_size=10, seed=7)
    whole = ShardedLoader(split, info, rank=0, world_size=1, batch_size=10, seed=7)
    perm = torch.cat([a.epoch_indices(3), b.epoch_indices(3)])
    assert torch.equal(perm, whole.epoch_indices(3))
    assert torch.equal(a.epoch_indices(3), a2.epoch_indices(3))
    assert not torch.equal(a.epoch_indices(0), a.epoch_indices(1))
    other_seed = ShardedLoader(split, info, rank=0, world_size=2, batch_size=10, seed=8)
    assert not torch.equal(a.epoch_indices(0), other_seed.epoch_indices(0))
    fixed = ShardedLoader(split, info, rank=0, world_size=2, batch_size=10, seed=7, reshuffle=False)
    assert torch.equal(fixed.epoch_indices(0), fixed.epoch_indices(5))
    assert torch.equal(fixed.epoch_indices(5), a.epoch_indices(0))


def test_dirichlet_disjoint_covering_nonuniform() -> None:
    split, info = synthetic_split(2000)
    ls = loaders(split, info, 4, batch_size=16, partition="dirichlet", alpha=0.1, seed=0)
    shards = [ld.shard for ld in ls]
    assert sorted(torch.cat(shards).tolist()) == list(range(2000))
    hists = torch.stack([split.labels[s].bincount(minlength=10).float() for s in shards])
    frac = hists / hists.sum(1, keepdim=True)
    assert frac.max() > 0.3  # uniform would be 0.1 everywhere
    assert (frac - 0.1).abs().sum(1).min() > 0.5
    # the same epoch as iid for every rank, not the smallest shard's (the old bug)
    assert {ld.steps_per_epoch for ld in ls} == {2000 // 4 // 16}
    assert min(len(s) for s in shards) < 2000 // 4  # so some rank must wrap around
    # fixed shard; every epoch reads from it only, in a new order
    ld = ls[1]
    e0, e1 = ld.epoch_indices(0), ld.epoch_indices(1)
    assert set(e0.tolist()) | set(e1.tolist()) <= set(ld.shard.tolist())
    assert not torch.equal(e0, e1)
    # same seed -> same shards on an independently built object
    again = ShardedLoader(
        split, info, rank=1, world_size=4, batch_size=16, partition="dirichlet", alpha=0.1
    )
    assert torch.equal(again.shard, ld.shard)


def test_dirichlet_large_alpha_is_near_uniform() -> None:
    split, info = synthetic_split(2000)
    ls = loaders(split, info, 4, batch_size=16, partition="dirichlet", alpha=1000.0)
    for ld in ls:
        frac = split.labels[ld.shard].bincount(minlength=10).float() / len(ld.shard)
        assert (frac - 0.1).abs().max() < 0.05


def test_bad_sharding_arguments() -> None:
    split, info = synthetic_split(40)
    with pytest.raises(DataError, match="batch_size"):
        ShardedLoader(split, info, rank=0, world_size=4, batch_size=32)
    with pytest.raises(DataError, match="rank"):
        ShardedLoader(split, info, rank=4, world_size=4, batch_size=2)
    with pytest.raises(DataError, match="partition"):
        ShardedLoader(split, info, rank=0, world_size=4, batch_size=2, partition="zipf")


# ----------------------------------------------------------------------------- batches


def test_batches_resume_equals_tail() -> None:
    split, info = cifar_like(96)
    ld = ShardedLoader(split, info, rank=1, world_size=2, batch_size=8, augment=True, seed=3)
    full = list(ld.batches(2))
    tail = list(ld.batches(2, start=4))
    assert len(full) == ld.steps_per_epoch == 6 and len(tail) == 2
    for (xa, ya), (xb, yb) in zip(full[4:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert list(ld.batches(2, start=6)) == []


def test_batch_dtype_and_normalization() -> None:
    split, info = synthetic_split(200)
    ld = ShardedLoader(split, info, rank=0, world_size=1, batch_size=50, augment=True)
    x, y = next(iter(ld.batches(0)))
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    idx = ld.epoch_indices(0)[:50]
    want = (split.images[idx].float() / 255 - info.mean[0]) / info.std[0]
    assert torch.allclose(x, want, atol=1e-6)  # augment is ignored for 28x28 grayscale sets
    xs = torch.cat([x for x, _ in ld.batches(0)])
    assert abs(xs.mean().item()) < 0.2 and abs(xs.std().item() - 1) < 0.2


def test_augmentation_shapes_and_determinism() -> None:
    split, info = cifar_like(64)
    kw = dict(rank=0, world_size=2, batch_size=16, augment=True, seed=1)
    a = list(ShardedLoader(split, info, **kw).batches(1))
    b = list(ShardedLoader(split, info, **kw).batches(1))
    plain = list(ShardedLoader(split, info, **{**kw, "augment": False}).batches(1))
    other_rank = list(ShardedLoader(split, info, **{**kw, "rank": 1}).batches(1))
    for (xa, ya), (xb, yb), (xp, yp) in zip(a, b, plain, strict=True):
        assert xa.shape == (16, 3, 32, 32) and xa.dtype == torch.float32
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ya, yp)
        assert not torch.equal(xa, xp)
    assert not torch.equal(a[0][0], other_rank[0][0])
    # a different epoch draws different crops (same samples when reshuffle=False)
    fixed = ShardedLoader(split, info, **{**kw, "reshuffle": False})
    x0, y0 = next(iter(fixed.batches(0)))
    x1, y1 = next(iter(fixed.batches(1)))
    assert torch.equal(y0, y1) and not torch.equal(x0, x1)


def test_augment_batch_is_crop_and_flip() -> None:
    images = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) + 1
    out = augment_batch(images, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, oy : oy + 6, ox : ox + 6] for oy in range(5) for ox in range(5)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[i], w) for w in windows)
    # zero padding: a full shift leaves a zero border
    assert set(out.unique().tolist()) <= set(images.unique().tolist()) | {0.0}


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("world_size", [1, 3, 4, 7])
def test_eval_slices_cover_once(world_size: int) -> None:
    split, info = synthetic_split(103)
    split.labels = torch.arange(103)  # identify samples by label
    seen = []
    for r in range(world_size):
        for x, y in eval_batches(split, info, rank=r, world_size=world_size, batch_size=10):
            assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
            assert len(x) == len(y) <= 10
            seen += y.tolist()
    assert seen == list(range(103))


def test_eval_not_augmented() -> None:
    split, info = cifar_like(20)
    ((x, y),) = list(eval_batches(split, info, rank=0, world_size=1))
    assert torch.equal(x, normalize(split.images, info))
    assert torch.equal(y, split.labels)


# ----------------------------------------------------------------------------- downloads


def play_ranks(size: int, per_node: int, disk_of, download_of) -> list:
    """Threads playing ``size`` ranks on nodes of ``per_node``; returns what each saw."""
    barrier = threading.Barrier(size, timeout=60)  # a safety net against a hang, not a timing

    def rank_main(rank: int):
        disk = disk_of(rank)
        try:
            fetch_once(
                lambda: "data" in disk,
                download_of(rank, disk),
                rank0=rank == 0,
                node_leader=rank % per_node == 0,
                barrier=barrier.wait,
            )
        except DataError as e:
            barrier.abort()  # what the runner's MPI_Abort does for the real ranks
            return e
        except threading.BrokenBarrierError:
            return "aborted"
        return "data" in disk  # every rank reads once fetch_once returns

    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(rank_main, range(size)))


@pytest.mark.parametrize("shared", [True, False], ids=["shared_fs", "node_local"])
def test_fetch_once_downloads_once_per_file_system(shared: bool) -> None:
    nodes, per_node = 2, 3
    disks = [set() for _ in range(1 if shared else nodes)]
    downloads: list[int] = []
    lock = threading.Lock()

    def disk_of(rank: int) -> set:
        return disks[0] if shared else disks[rank // per_node]

    def download_of(rank: int, disk: set):
        def download() -> None:
            with lock:
                downloads.append(rank)
            time.sleep(0.02)  # widen the window in which an early reader would miss the files
            disk.add("data")

        return download

    seen = play_ranks(nodes * per_node, per_node, disk_of, download_of)
    assert seen == [True] * (nodes * per_node)
    assert sorted(downloads) == ([0] if shared else [0, per_node])
    # a second run finds everything in place and downloads nothing
    downloads.clear()
    assert play_ranks(nodes * per_node, per_node, disk_of, download_of) == [True] * 6
    assert downloads == []


@pytest.mark.parametrize("failing_rank", [0, 2])
def test_fetch_once_failure_raises_on_the_downloader(failing_rank: int) -> None:
    """The failing rank raises DataError; the others wait until the runner aborts."""
    disks = [set(), set()]

    def download_of(rank: int, disk: set):
        def download() -> None:
            if rank == failing_rank:
                raise OSError("network unreachable")
            disk.add("data")

        return download

    seen = play_ranks(4, 2, lambda r: disks[r // 2], download_of)
    err = seen[failing_rank]
    assert isinstance(err, DataError) and "network unreachable" in str(err)
    assert all(s == "aborted" for r, s in enumerate(seen) if r != failing_rank)


def test_fetch_once_download_without_files_is_an_error() -> None:
    seen = play_ranks(2, 2, lambda r: set(), lambda r, d: lambda: None)
    assert isinstance(seen[0], DataError) and "missing" in str(seen[0])
    assert seen[1] == "aborted"


def test_load_calls_coordinate_then_reads(tmp_path: Path) -> None:
    calls: list[bool] = []

    def coordinate(have_files, download) -> None:
        calls.append(have_files())
        make_fmnist(tmp_path)  # stands in for the rank that downloads
        calls.append(have_files())

    split, _ = load(
        "fashion_mnist", str(tmp_path), train=True, download=True, coordinate=coordinate
    )
    assert calls == [False, True] and len(split) == 30
    # a collective: called even when the files are there; never without download
    calls.clear()
    load("fashion_mnist", str(tmp_path), train=False, download=True, coordinate=coordinate)
    assert calls == [True, True]
    calls.clear()
    load("fashion_mnist", str(tmp_path), train=False, coordinate=coordinate)
    load("synthetic", "", train=True, synthetic_size=20, download=True, coordinate=coordinate)
    assert calls == []


def test_load_download_callback_is_torchvision(tmp_path: Path, monkeypatch) -> None:
    """The callback handed to coordinate fetches with torchvision into root."""
    torchvision = pytest.importorskip("torchvision")
    fetched: list[tuple[str, bool]] = []

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            fetched.append((root, train))
            folder = Path(root) / "cifar-10-batches-py"
            for i in range(5):
                dump(folder / f"data_batch_{i + 1}", cifar_batch(3, b"labels", 10, seed=i))
            dump(folder / "test_batch", cifar_batch(2, b"labels", 10, seed=9))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    coordinate = lambda have, download: fetch_once(  # noqa: E731
        have, download, rank0=True, node_leader=True, barrier=lambda: None
    )
    train, _ = load("cifar10", str(tmp_path), train=True, download=True, coordinate=coordinate)
    test, _ = load("cifar10", str(tmp_path), train=False, download=True, coordinate=coordinate)
    assert fetched == [(str(tmp_path), True)]  # the test split was already there
    assert len(train) == 15 and len(test) == 2

    def broken(root: str, train: bool, download: bool) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", broken)
    with pytest.raises(DataError, match="cifar100: download into .* failed: disk full"):
        load("cifar100", str(tmp_path), train=True, download=True, coordinate=coordinate)


# ----------------------------------------------------------------------------- cycling


def cifar_sized_labels(n: int = 50_000) -> tuple[Split, object]:
    """CIFAR-10's label counts; the images are one zero image repeated (no memory)."""
    images = torch.zeros((1, 3, 32, 32), dtype=torch.uint8).expand(n, 3, 32, 32)
    return Split(images, torch.arange(n, dtype=torch.int64) % 10), INFOS["cifar10"]


def test_dirichlet_cifar_16_ranks_full_epochs() -> None:
    split, info = cifar_sized_labels()
    ls = loaders(split, info, 16, batch_size=32, partition="dirichlet", alpha=0.1, seed=0)
    assert {ld.steps_per_epoch for ld in ls} == {97}  # 3125 samples per rank, 32 per batch
    sizes = [ld.shard_size for ld in ls]
    assert min(sizes) < 97 * 32 < max(sizes)  # some ranks wrap, others carry over
    for ld in ls:
        own = set(ld.shard.tolist())
        for epoch in (0, 1, 5):
            idx = ld.epoch_indices(epoch)
            assert len(idx) == 97 * 32 and set(idx.tolist()) <= own
    ld = ls[sizes.index(min(sizes))]
    labels = torch.cat([y for _, y in ld.batches(3)])
    assert torch.equal(labels, split.labels[ld.epoch_indices(3)])


def id_split(n: int) -> tuple[Split, object]:
    """CIFAR-shaped images whose pixels encode the sample index (base 256)."""
    ids = torch.arange(n)
    images = torch.stack([ids % 256, ids // 256, ids % 7], 1).to(torch.uint8)
    images = images[:, :, None, None].expand(n, 3, 32, 32).contiguous()
    return Split(images, ids % 10), INFOS["cifar10"]


def test_dirichlet_batches_come_from_own_shard() -> None:
    split, info = id_split(800)
    ls = loaders(split, info, 4, batch_size=8, partition="dirichlet", alpha=0.1, seed=2)
    for ld in ls:
        own = set(ld.shard.tolist())
        for epoch in (0, 3):
            xs = torch.cat([x for x, _ in ld.batches(epoch)])
            assert len(xs) == (800 // 4 // 8) * 8
            # undo the normalisation of the two id channels, read the ids back
            scale = torch.tensor(info.std[:2]).view(1, 2) * 255
            shift = torch.tensor(info.mean[:2]).view(1, 2) * 255
            digits = (xs[:, :2, 0, 0] * scale + shift).round().long()
            ids = digits[:, 0] + 256 * digits[:, 1]
            assert set(ids.tolist()) <= own
            assert torch.equal(ids, ld.epoch_indices(epoch))


@pytest.mark.parametrize("which", ["smallest", "largest"])
def test_dirichlet_cycling_covers_shard_before_repeating(which: str) -> None:
    split, info = synthetic_split(2000)
    ls = loaders(split, info, 4, batch_size=16, partition="dirichlet", alpha=0.1, seed=0)
    pick = min if which == "smallest" else max
    ld = pick(ls, key=lambda x: x.shard_size)
    size = ld.shard_size
    stream = torch.cat([ld.epoch_indices(e) for e in range(4 * size // ld.epoch_size + 2)])
    passes = [stream[i : i + size] for i in range(0, len(stream), size)]
    assert len(passes) >= 3
    for p in passes[:-1]:  # every full pass is the whole shard once
        assert sorted(p.tolist()) == ld.shard.tolist()
    assert len(set(passes[-1].tolist())) == len(passes[-1])  # the partial one has no repeat
    assert not torch.equal(passes[0], passes[1])  # each pass in a new order
    fixed = ShardedLoader(
        split, info, rank=ld.rank, world_size=4, batch_size=16, partition="dirichlet",
        alpha=0.1, seed=0, reshuffle=False,
    )  # fmt: skip
    fstream = torch.cat([fixed.epoch_indices(e) for e in range(4)])
    assert torch.equal(fstream[size : 2 * size], fstream[:size])  # same order every pass


def test_dirichlet_resume_equals_tail_across_wraps() -> None:
    split, info = cifar_like(400)
    kw = dict(world_size=4, batch_size=8, partition="dirichlet", alpha=0.1, augment=True, seed=3)
    ls = [ShardedLoader(split, info, rank=r, **kw) for r in range(4)]
    ld = min(ls, key=lambda x: x.shard_size)
    assert ld.shard_size < ld.epoch_size  # this rank wraps within an epoch
    for epoch in (0, 2):
        full = list(ld.batches(epoch))
        again = ShardedLoader(split, info, rank=ld.rank, **kw)  # a restarted process
        tail = list(again.batches(epoch, start=5))
        assert len(full) == ld.steps_per_epoch and len(tail) == ld.steps_per_epoch - 5
        for (xa, ya), (xb, yb) in zip(full[5:], tail, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_dirichlet_tiny_shards_allowed() -> None:
    """Cycling needs one sample per shard, not a batch: 10 samples, 4 ranks, batch 2."""
    split, info = synthetic_split(10)
    ls = loaders(split, info, 4, batch_size=2, partition="dirichlet", alpha=0.1, seed=1)
    assert sorted(torch.cat([ld.shard for ld in ls]).tolist()) == list(range(10))
    for ld in ls:
        assert ld.steps_per_epoch == 1 and ld.shard_size >= 1
        ((x, y),) = list(ld.batches(4))
        assert len(x) == 2 and set(ld.epoch_indices(4).tolist()) <= set(ld.shard.tolist())


# ----------------------------------------------------------------------------- device paths


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_host_gather_path_matches_resident(partition: str) -> None:
    split, info = cifar_like(256)
    kw = dict(rank=1, world_size=2, batch_size=16, partition=partition, augment=True, seed=4)
    resident = ShardedLoader(split, info, **kw)
    host = ShardedLoader(split, info, max_device_bytes=0, **kw)
    assert resident.resident and not host.resident
    for (xa, ya), (xb, yb) in zip(resident.batches(1), host.batches(1, 0), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    whole = list(eval_batches(split, info, rank=1, world_size=3, batch_size=30))
    piecewise = list(
        eval_batches(split, info, rank=1, world_size=3, batch_size=30, max_device_bytes=0)
    )
    assert len(whole) == len(piecewise) == 3
    for (xa, ya), (xb, yb) in zip(whole, piecewise, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augmentation_repeats_run_to_run_on_cpu() -> None:
    """Two loaders built apart (two processes, say) draw the same crops in every batch."""
    split, info = cifar_like(128)
    kw = dict(rank=0, world_size=1, batch_size=32, augment=True, seed=11)
    first = [x for x, _ in ShardedLoader(split, info, **kw).batches(2)]
    ld = ShardedLoader(split, info, **kw)
    list(ld.batches(0))  # the reseeded generator carries nothing between batches or epochs
    second = [x for x, _ in ld.batches(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_split_to_same_device_is_itself() -> None:
    split, _ = cifar_like(8)
    assert split.to("cpu") is split


# ----------------------------------------------------------------------------- resize


def test_resize_train_and_eval() -> None:
    split, info = cifar_like(64)
    split.images[:] = 77  # a constant image stays constant under bilinear resizing
    ld = ShardedLoader(split, info, rank=0, world_size=1, batch_size=16, resize=56)
    x, y = next(iter(ld.batches(0)))
    assert x.shape == (16, 3, 56, 56) and x.dtype == torch.float32 and y.shape == (16,)
    want = normalize(split.images[:1, :, :1, :1], info)
    assert torch.allclose(x, want.expand_as(x), atol=1e-5)
    ((xe, ye),) = list(eval_batches(split, info, rank=0, world_size=1, resize=56))
    assert xe.shape == (64, 3, 56, 56) and torch.allclose(xe, want.expand_as(xe), atol=1e-5)


def test_resize_keeps_content() -> None:
    split, info = cifar_like(32)
    plain = next(iter(eval_batches(split, info, rank=0, world_size=1)))[0]
    big = next(iter(eval_batches(split, info, rank=0, world_size=1, resize=64)))[0]
    same = next(iter(eval_batches(split, info, rank=0, world_size=1, resize=32)))[0]
    assert torch.equal(same, plain)
    # a 2x bilinear upsampling keeps each image's per-channel mean (up to the border)
    assert torch.allclose(big.mean((2, 3)), plain.mean((2, 3)), atol=0.05)


def test_bad_resize() -> None:
    split, info = cifar_like(16)
    for bad in (0, -3, True):
        with pytest.raises(DataError, match="resize"):
            ShardedLoader(split, info, rank=0, world_size=1, batch_size=4, resize=bad)
        with pytest.raises(DataError, match="resize"):
            next(eval_batches(split, info, rank=0, world_size=1, resize=bad))

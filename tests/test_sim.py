"""The one-process simulation against real MPI ranks, itself, and plain SGD.

The reference mode must reproduce a 4-rank MPI run bit for bit in everything
computed locally (parameters, losses, rounds); values that pass through an MPI
reduction (estimates, exact distance, an all-reduce average) within float
tolerance. The fast mode must agree with the reference mode to float tolerance.
"""


import h5py
import numpy as np
import pytest
import torch
import yaml

from dsgd_mpi import checkpoint
from dsgd_mpi.config import load_config
from dsgd_mpi.sim.__main__ import main as sim_main
from tests.shared_runs import SIM_BASE as BASE
from tests.shared_runs import SIM_CASES as CASES
from tests.shared_runs import SIM_STEPS as STEPS


def _write(folder, name: str, body: dict) -> str:
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in body.items():
        cfg.setdefault(key, {}).update(value)
    cfg["run"].update(name=name, out_dir=str(folder))
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _states(folder, name: str, n: int = 4) -> list[dict]:
    directory = str(folder / name / "ckpt")
    return [checkpoint.load(directory, STEPS, r)["replica"] for r in range(n)]


def _rows(folder, name: str, group: str = "steps") -> dict[str, np.ndarray]:
    with h5py.File(folder / f"{name}.h5", "r", locking=False) as f:
        return {k: v[()] for k, v in f[group].items()}


@pytest.fixture(scope="module")
def mpi_and_sim(shared, tmp_path_factory):
    """Each case run by 4 MPI ranks (the shared job) and by the reference and fast simulations."""
    mpi = shared.root / "runs"
    ref, fast = (tmp_path_factory.mktemp(k) for k in ("ref", "fast"))
    for folder, mode in ((ref, "reference"), (fast, "fast")):
        for name, body in CASES.items():
            assert sim_main([_write(folder, name, body), "--workers", "4", "--mode", mode]) == 0
    return mpi, ref, fast


@pytest.mark.mpi
def test_reference_simulation_is_the_mpi_run_bit_for_bit(mpi_and_sim):
    mpi, ref, _ = mpi_and_sim
    for a, b in zip(_states(mpi, "ring"), _states(ref, "ring"), strict=True):
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), f"ring: {key} differs"
        assert torch.equal(a["optimizer"]["momentum_buffer"], b["optimizer"]["momentum_buffer"])
    m, r = _rows(mpi, "ring"), _rows(ref, "ring")
    for field in ("step", "train_loss", "train_acc", "gossip_rounds", "lr", "phase", "bytes_sent"):
        np.testing.assert_array_equal(m[field], r[field], err_msg=field)
    assert m["gossip_rounds"].max() > 1  # the control repeated rounds
    for field in ("consensus_estimate", "consensus_measured", "consensus_exact"):
        np.testing.assert_allclose(m[field], r[field], rtol=1e-6, err_msg=field)
    me, re_ = _rows(mpi, "ring", "eval"), _rows(ref, "ring", "eval")
    for field in ("test_acc", "local_acc_min", "local_acc_max", "ensemble_acc"):
        np.testing.assert_allclose(me[field], re_[field], rtol=1e-6, err_msg=field)
    # Sharpness at the end: each rank's HVPs reduced (MPI) vs the replicas' samples
    # batched into one operator (the simulator): the same Hessian, summed in another order.
    for field in ("sharpness_lambda_max", "sharpness_trace"):
        assert np.isfinite(me[field][-1]) and me[field][-1] != 0, field
        np.testing.assert_allclose(me[field][-1], re_[field][-1], rtol=1e-3, err_msg=field)


@pytest.mark.mpi
def test_reference_simulation_with_an_exact_phase(mpi_and_sim):
    """Bit for bit until the all-reduce phase; after it, to float rounding (MPI's sum order)."""
    mpi, ref, _ = mpi_and_sim
    m, r = _rows(mpi, "matching"), _rows(ref, "matching")
    free = m["phase"] == 0
    assert free.any() and (~free).any()
    np.testing.assert_array_equal(m["train_loss"][free], r["train_loss"][free])
    np.testing.assert_allclose(m["train_loss"], r["train_loss"], rtol=1e-5)
    # Measured after each average, in both backends: rounding-sized, far below D-SGD's.
    floor = 1e-6 * m["consensus_exact"][free].min()
    for run in (m, r):
        assert (run["consensus_exact"][~free] < floor).all()
    for a, b in zip(_states(mpi, "matching"), _states(ref, "matching"), strict=True):
        for key, value in a["model"].items():
            np.testing.assert_allclose(value.numpy(), b["model"][key].numpy(), rtol=1e-4,
                                       atol=1e-6, err_msg=key)  # fmt: skip


@pytest.mark.mpi
def test_fast_simulation_agrees_with_the_reference_to_float_tolerance(mpi_and_sim):
    _, ref, fast = mpi_and_sim
    for name in CASES:
        for a, b in zip(_states(ref, name), _states(fast, name), strict=True):
            for key, value in a["model"].items():
                np.testing.assert_allclose(value.numpy(), b["model"][key].numpy(), rtol=1e-3,
                                           atol=1e-5, err_msg=f"{name}: {key}")  # fmt: skip
        r, f = _rows(ref, name), _rows(fast, name)
        np.testing.assert_array_equal(r["step"], f["step"])
        np.testing.assert_allclose(r["train_loss"], f["train_loss"], rtol=1e-4)
    with h5py.File(fast / "ring.h5", "r", locking=False) as f:
        assert f.attrs["backend"] == "sim" and f.attrs["sim_mode"] == "fast"


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_gossip_at_lr_0_preserves_the_mean_and_pulls_replicas_together(tmp_path, mode):
    from dsgd_mpi import assemble
    from dsgd_mpi.consensus import Consensus
    from dsgd_mpi.data import load
    from dsgd_mpi.schedule import phases
    from dsgd_mpi.sim.fast import make_fast_replicas
    from dsgd_mpi.sim.group import SimGroup
    from dsgd_mpi.topology import Topology

    cfg = load_config(_write(tmp_path, "lr0", CASES["matching"]))
    train = load("synthetic", "", train=True, synthetic_size=1024, seed=7)
    make = assemble.make_replicas if mode == "reference" else make_fast_replicas
    replicas = make(cfg, range(5), 5, train, torch.device("cpu"))
    stack = getattr(replicas, "stack", None)
    group = SimGroup(5, stack=stack)
    for i, flat in enumerate(replicas.flats):
        flat.add_(torch.randn(flat.shape, generator=torch.Generator().manual_seed(i)))
    consensus = Consensus(group, replicas, Topology("random_matching", 5, seed=3))
    replicas.start(0)
    for step in range(8):
        before = torch.stack(replicas.flats).clone()
        replicas.gradients(step)
        replicas.apply(0.0)
        consensus.communicate(phases(cfg)[0], target=0.0, step=step)
        after = torch.stack(replicas.flats)
        assert torch.allclose(after.mean(0), before.mean(0), atol=1e-5), "the mean moved"
        spread = ((after - after.mean(0)) ** 2).sum()
        assert spread < ((before - before.mean(0)) ** 2).sum()


def test_one_worker_is_plain_sgd(tmp_path):
    """N = 1: the simulation is single-process SGD on the whole data set."""
    from dsgd_mpi.data import load
    from dsgd_mpi.models import build_model
    from dsgd_mpi.schedule import Timeline
    from dsgd_mpi.shards import ShardedLoader

    path = _write(tmp_path, "one", {"topology": {"name": "ring"}, "run": {"steps": 20},
                                    "checkpoint": {"every": 20}})  # fmt: skip
    assert sim_main([path, "--workers", "1", "--mode", "reference"]) == 0
    cfg = load_config(path)
    torch.manual_seed(cfg.run.seed)
    model = build_model("small_cnn", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)  # fmt: skip
    split, info = load("synthetic", "", train=True, synthetic_size=1024, seed=7)
    loader = ShardedLoader(split, info, rank=0, world_size=1, batch_size=16, seed=7)
    timeline = Timeline(cfg, 1, loader.steps_per_epoch)
    batches = [b for e in range(2) for b in loader.batches(e)]
    for step in range(20):
        images, labels = batches[step]
        for group in opt.param_groups:
            group["lr"] = timeline.lr(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    got = checkpoint.load(str(tmp_path / "one" / "ckpt"), 20, 0)["replica"]["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workers, words", [("0", "n >= 1"), ("3", "even n")])
def test_bad_workers_exit_2_with_the_topologys_message(tmp_path, capsys, workers, words):
    path = _write(tmp_path, "bad", {"topology": {"name": "bipartite_exponential"}})
    assert sim_main([path, "--workers", workers]) == 2  # in-process: the CLI's exit status
    err = capsys.readouterr().err
    assert "config error: topology.name" in err and words in err


def test_eval_local_false_scores_the_averaged_model_only(tmp_path):
    """The same run with and without the local models' test passes: x̄'s scores are equal,
    the local and ensemble fields are NaN (the file's layout unchanged)."""
    rows = {}
    for flag in (True, False):
        name = f"local_{flag}"
        path = _write(tmp_path, name, {"run": {"steps": 6}, "topology": {"name": "ring"},
                                       "metrics": {"eval_local": flag}})  # fmt: skip
        assert sim_main([path, "--workers", "4", "--mode", "reference"]) == 0
        rows[flag] = _rows(tmp_path, name, "eval")
    on, off = rows[True], rows[False]
    assert set(on) == set(off)
    np.testing.assert_array_equal(off["test_acc"], on["test_acc"])
    np.testing.assert_array_equal(off["test_ece"], on["test_ece"])
    assert np.isfinite(on["local_acc_mean"]).all() and np.isfinite(on["ensemble_acc"]).all()
    for key in ("local_acc_mean", "local_acc_min", "ensemble_acc", "ensemble_nll"):
        assert np.isnan(off[key]).all(), key


def test_small_cnns_stacked_step_is_the_vmapped_step(tmp_path):
    """The fast mode's own grouped forward of small_cnn gives what vmap gives: every
    replica's loss, logits and gradient (replicas made to differ first)."""
    from dsgd_mpi.data import load
    from dsgd_mpi.sim.fast import make_fast_replicas

    cfg = load_config(_write(tmp_path, "stacked", CASES["ring"]))
    train = load("synthetic", "", train=True, synthetic_size=1024, seed=7)
    replicas = make_fast_replicas(cfg, range(3), 3, train, torch.device("cpu"))
    replicas.params.add_(0.05 * torch.randn(replicas.params.shape,
                                            generator=torch.Generator().manual_seed(0)))
    images = torch.randn(3, 5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(2))
    args = (replicas.params, replicas._buffers, images, labels)
    stacked = replicas._step(*args)
    vmapped = replicas._vmapped_step(replicas._template)(*args)
    assert replicas.stacked  # the path that trains is the stacked one
    for got, want in zip((stacked[0], *stacked[1]), (vmapped[0], *vmapped[1]), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stacked[0][0], stacked[0][1])  # three different replicas


def test_the_simulators_all_reduce_estimate_is_summed_in_float64():
    """||x̄ - x_i||^2 of the float32 difference the round formed, summed in float64 (a
    float32 dot of 10^5 terms is off in its 5th digit)."""
    from dsgd_mpi.sim.group import SimGroup
    from dsgd_mpi.topology import Topology

    x = np.random.default_rng(0).standard_normal((4, 100_000)).astype(np.float32)
    flats = [torch.from_numpy(row.copy()) for row in x]
    rows = SimGroup(4).mixer(Topology("complete", 4), flats, 100_000).round()
    avg = (((x[0] + x[1]) + x[2]) + x[3]) * np.float32(0.25)  # the replica-order sum
    d = (avg - x).astype(np.float64)
    np.testing.assert_allclose(rows[:, 0], (d**2).sum(axis=1), rtol=1e-12)

"""The C-SGD baselines' perturbations: SAM's BatchNorm statistics, Zhu et al.'s
average-direction SAM against the D-SGD deviations it must imitate, and the
isotropic smoothing that must not."""

import numpy as np
import pytest
import torch

from dsgd_mpi import assemble
from dsgd_mpi.data import load
from tests.instruments import config

BN = {"run": {"steps": 3, "seed": 1}, "model": {"name": "resnet20"},
      "data": {"name": "synthetic", "synthetic_size": 64, "batch_size": 8},
      "topology": {"name": "complete"}}  # fmt: skip


def _replica(perturb: str):
    cfg = config(BN, {"optim": {"perturb": perturb}})
    train = load("synthetic", "", train=True, synthetic_size=64, seed=1)
    (replica,) = assemble.make_replicas(cfg, [0], 4, train, torch.device("cpu")).items
    replica.start(0)
    return replica


@pytest.mark.parametrize("perturb", ["sam"])
def test_sam_updates_batchnorm_statistics_once_a_step_at_x(perturb):
    """The ascent pass at x + rho g/|g| is for the gradient only: the running statistics
    after a SAM step are those of the one forward pass at x that plain SGD makes."""
    plain, sam = _replica("none"), _replica(perturb)
    for step in range(2):
        plain.gradients(step)
        sam.gradients(step)
        for (name, a), b in zip(plain.model.named_buffers(), sam.model.buffers(), strict=True):
            assert torch.equal(a, b), f"step {step}: {name}"
    counts = [b for n, b in sam.model.named_buffers() if n.endswith("num_batches_tracked")]
    assert counts and all(int(c) == 2 for c in counts)


#: C-SGD (complete) with a D-SGD ring of 8 carried beside: the small CNN, some steps in.
AVG = {"run": {"steps": 12, "seed": 3},
       "data": {"name": "synthetic", "synthetic_size": 1024, "batch_size": 8},
       "model": {"name": "small_cnn"}, "optim": {"lr": 0.05, "base_batch": 64, "milestones": [0.5]},
       "topology": {"name": "complete"},
       "metrics": {"log_every": 4, "eval_every": 10, "flush_every": 100}}  # fmt: skip


def _sim(tmp_path, mode: str, **optim):
    from dsgd_mpi.sim.__main__ import build

    cfg = config(AVG, {"optim": optim, "run": {"out_dir": str(tmp_path)}})
    trainer = build(cfg, 8, mode, log=lambda _: None)
    trainer.replicas.start(0)
    trainer.perturbation.start(0)
    return trainer


def _principal(deviations: np.ndarray, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The top k principal directions of the rows and the variance along each."""
    centred = deviations - deviations.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:k], s[:k] ** 2 / len(deviations)


@pytest.mark.parametrize("mode", ["fast"])  # the reference mode's draws: the resume test below
def test_avg_sam_perturbations_have_the_dsgd_deviations_covariance(tmp_path, mode):
    """Zhu et al.'s average direction: 200 draws at one step, every replica's eps, along
    the D-SGD replicas' top 3 principal directions: their variance to 10 %. Isotropic
    smoothing of the same trace does not come near (its variance is Xi^2 / d there)."""
    trainer = _sim(tmp_path / "avg", mode, perturb="avg_sam")
    for _ in range(8):
        trainer.train_step()
    shadow = trainer.perturbation.shadow
    ys = np.stack([p.numpy().astype(np.float64) for p in shadow.params()])
    directions, variances = _principal(ys)
    xi2 = float(((ys - ys.mean(0)) ** 2).sum(1).mean())
    assert variances.sum() > 0.5 * xi2  # a few directions hold most of the deviation

    def along(perturbation) -> np.ndarray:
        """Mean squared projection of 200 draws x 8 replicas' eps (E eps = 0)."""
        total = np.zeros(len(directions))
        for k in range(200):
            eps = np.stack([e.numpy().astype(np.float64) for e in perturbation.draw(100 + k)])
            assert eps.shape == (8, ys.shape[1])
            total += ((eps @ directions.T) ** 2).sum(axis=0)
        return total / (200 * 8)

    np.testing.assert_allclose(along(trainer.perturbation), variances, rtol=0.10)
    iso = _sim(tmp_path / "iso", mode, perturb="gaussian")
    for _ in range(8):
        iso.train_step()
    assert iso.perturbation.shadow.consensus.exact_distance() == pytest.approx(xi2, rel=1e-5)
    assert (along(iso.perturbation) < 0.1 * variances).all()


def test_avg_sam_resumes_bit_for_bit_with_its_dsgd_replicas(tmp_path):
    """The carried D-SGD run is part of the checkpoint: stop at step 5, resume to 12."""
    from dsgd_mpi.sim.__main__ import build

    whole = _sim(tmp_path / "whole", "reference", perturb="avg_sam")
    for _ in range(12):
        whole.train_step()
    part = _sim(tmp_path / "part", "reference", perturb="avg_sam")
    for _ in range(5):
        part.train_step()
    part.save_checkpoint()
    cfg = config(AVG, {"optim": {"perturb": "avg_sam"}, "run": {"out_dir": str(tmp_path / "part")}})
    resumed = build(cfg, 8, "reference", resume=5, log=lambda _: None)
    resumed.replicas.start(5)
    resumed.perturbation.start(5)
    for _ in range(7):
        resumed.train_step()
    for a, b in zip(whole.replicas.flats + whole.perturbation.shadow.replicas.flats,
                    resumed.replicas.flats + resumed.perturbation.shadow.replicas.flats,
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)

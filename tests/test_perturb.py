"""The C-SGD baselines' perturbations: SAM's BatchNorm statistics, Zhu et al.'s
average-direction SAM against the D-SGD deviations it must imitate, and the
isotropic smoothing that must not."""

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

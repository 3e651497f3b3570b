"""The fused mixing kernels agree with the plain torch arithmetic."""

import pytest
import torch

from dsgd_mpi import mixing


@pytest.mark.parametrize("peers", [1, 2, 3, 4])
def test_fused_mixing_matches_torch(peers):
    g = torch.Generator().manual_seed(peers)
    m = 10_007  # not a multiple of any SIMD width
    x = torch.randn(m, generator=g)
    received = [torch.randn(m, generator=g) for _ in range(peers)]
    weights = [0.5 / peers + 0.1 * k for k in range(peers)]
    x_ref, x_got = x.clone(), x.clone()
    want = mixing.accumulate_torch(x_ref, received, weights, torch.empty(m))
    got = mixing.accumulate(x_got, received, weights, torch.empty(m))
    torch.testing.assert_close(x_got, x_ref, rtol=1e-6, atol=1e-6)
    assert got == pytest.approx(want, rel=1e-5)
    assert not torch.equal(x_got, x)  # it did mix


def test_numba_is_what_runs_here():
    # The speed figures in the README assume the fused path; say so if it is missing.
    assert mixing.numba is not None

"""One contiguous buffer with views back into the model."""

import pytest
import torch

from dsgd_mpi.flat import FlatError, allocate, flatten


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    )


def test_parameters_become_views_of_the_buffer():
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    flat, slots = flatten(net)
    assert flat.numel() == sum(p.numel() for p in before)
    for p, old in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, old)
    flat.zero_()  # writing the buffer writes the model
    assert all(float(p.detach().abs().sum()) == 0 for p in net.parameters())
    assert [s.offset for s in slots] == sorted(s.offset for s in slots)


def test_training_still_updates_the_buffer():
    net = _net()
    flat, _ = flatten(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = flat.clone()
    net(torch.randn(8, 4)).sum().backward()
    opt.step()
    assert not torch.equal(flat, before)


def test_buffers_are_included_only_when_asked():
    n_params = sum(p.numel() for p in _net().parameters())
    flat, _ = flatten(_net(), buffers=True)
    assert flat.numel() == n_params + 6  # running_mean and running_var; not the int64 counter


def test_mixed_dtypes_are_refused_with_the_names():
    net = _net()
    net[2].double()
    with pytest.raises(FlatError, match=r"float32.*2\.weight"):
        flatten(net)


def test_nonpositive_numel_is_refused():
    with pytest.raises(FlatError, match="positive"):
        allocate(0)

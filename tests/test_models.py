"""Tests for dsgd_mpi.models: shapes, sizes, registry errors."""

from __future__ import annotations

import pytest
import torch

from dsgd_mpi.models import MODELS, build_model, num_parameters

SHAPES = ((1, 28), (3, 32))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra intra-op threads only add contention on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("channels", "size"), SHAPES)
def test_forward_shape_and_dtype(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=channels)
    out = model(torch.randn(4, channels, size, size))
    assert out.shape == (4, 10)
    assert out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_and_classes(name: str) -> None:
    narrow = build_model(name, num_classes=100, in_channels=3, width=1)
    wide = build_model(name, num_classes=100, in_channels=3, width=2)
    assert num_parameters(wide) > num_parameters(narrow)
    assert wide(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_resnet20_param_count() -> None:
    n = num_parameters(build_model("resnet20", num_classes=10, in_channels=3))
    assert 260_000 <= n <= 280_000


def test_resnet20_conv_shortcut() -> None:
    from dsgd_mpi.models import ResNet20

    model = ResNet20(num_classes=10, in_channels=3, shortcut="conv")
    assert 260_000 <= num_parameters(model) <= 280_000
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_small_cnn_is_small() -> None:
    n = num_parameters(build_model("small_cnn", num_classes=10, in_channels=1))
    assert 15_000 <= n <= 25_000


def test_mlp_image_size() -> None:
    model = build_model("mlp", num_classes=10, in_channels=3, image_size=28)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(2, 3, 32, 32))


def test_unknown_name_lists_valid() -> None:
    with pytest.raises(ValueError) as err:
        build_model("vgg", num_classes=10, in_channels=3)
    for name in MODELS:
        assert name in str(err.value)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="width"):
        build_model("mlp", num_classes=10, in_channels=1, width=0)

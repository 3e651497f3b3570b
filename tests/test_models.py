"""Tests for dsgd_mpi.models: shapes, sizes, registry errors."""

from __future__ import annotations

import subprocess
import sys
import urllib.error

import pytest
import torch
from torch import nn

from dsgd_mpi.models import MODELS, build_model

SHAPES = ((1, 28), (3, 32))
FIXED_WIDTH = {"resnet18"}  # torchvision's architecture: no width multiplier


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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


@pytest.mark.parametrize("name", sorted(set(MODELS) - FIXED_WIDTH))
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


def test_small_cnn_is_the_textbook_net_pooled_first() -> None:
    """Its fast forward (pool before ReLU, channels-last) computes conv-ReLU-pool, the
    same logits and gradients, also under vmap (the simulator's batched step)."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=1)

    def textbook(params, x):
        x = F.max_pool2d(F.relu(F.conv2d(x, params["conv1.weight"], params["conv1.bias"])), 2)
        x = F.max_pool2d(F.relu(F.conv2d(x, params["conv2.weight"], params["conv2.bias"])), 2)
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return F.linear(x, params["fc.weight"], params["fc.bias"])

    def fast(params, x):
        return functional_call(model, params, (x,))

    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    assert torch.allclose(fast(params, x), textbook(params, x), atol=1e-6)
    loss = {
        f: (lambda p, x, y, f=f: F.cross_entropy(f(p, x[None]), y[None])) for f in (fast, textbook)
    }
    stacked = {k: v.expand(3, *v.shape).clone() for k, v in params.items()}
    xs, ys = x[:3], y[:3]
    got = vmap(grad(loss[fast]))(stacked, xs, ys)
    want = vmap(grad(loss[textbook]))(stacked, xs, ys)
    for k in params:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
        assert want[k].abs().sum() > 0, k


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


# ---- resnet18 (Zhu et al.'s small-image form of torchvision's ResNet-18) ---------------------


@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28), (3, 56)])
def test_resnet18_shapes(channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=channels).eval()
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10) and out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_resnet18_keeps_resolution_in_the_stem() -> None:
    """Stride-1 stem and pool: 32x32 reaches the last stage at 4x4 (ImageNet's stem gives 1x1)."""
    model = build_model("resnet18", num_classes=10, in_channels=3).eval()
    shapes = []
    model.layer4.register_forward_hook(lambda _m, _i, out: shapes.append(out.shape) and None)
    model(torch.randn(1, 3, 32, 32))
    assert shapes == [(1, 512, 4, 4)]


def test_resnet18_size_and_head() -> None:
    ten = build_model("resnet18", num_classes=10, in_channels=3)
    hundred = build_model("resnet18", num_classes=100, in_channels=3)
    assert 11_100_000 <= num_parameters(ten) <= 11_300_000
    assert num_parameters(hundred) - num_parameters(ten) == 90 * (512 + 1)
    with pytest.raises(ValueError, match="width must be 1"):
        build_model("resnet18", num_classes=10, in_channels=3, width=2)


def _imagenet_state() -> dict[str, torch.Tensor]:
    """A stand-in for the ImageNet file: a seeded torchvision ResNet-18 with its 1000-way head."""
    import torchvision

    torch.manual_seed(123)
    net = torchvision.models.resnet18(weights=None)
    for m in net.modules():  # non-trivial BN statistics, so a missed buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture
def fake_download(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    import torchvision.models._api as api

    state = _imagenet_state()
    monkeypatch.setattr(api, "load_state_dict_from_url", lambda *a, **k: dict(state))
    return state


def test_resnet18_pretrained_loads_all_but_the_head(fake_download) -> None:
    model = build_model("resnet18", num_classes=10, in_channels=3, pretrained=True)
    ours = model.state_dict()
    for key, value in fake_download.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(ours[key], value), key
    assert ours["fc.weight"].shape == (10, 512)


@pytest.mark.parametrize("channels", [1, 2])
def test_resnet18_pretrained_other_channel_counts_see_grey_as_rgb(fake_download, channels) -> None:
    """A grey image fed as `channels` equal planes gives the RGB network's output on (g, g, g)."""
    rgb = build_model("resnet18", num_classes=10, in_channels=3, pretrained=True).eval()
    other = build_model("resnet18", num_classes=10, in_channels=channels, pretrained=True).eval()
    other.fc.load_state_dict(rgb.fc.state_dict())  # heads are fresh: make them the same
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want = rgb(grey.expand(-1, 3, -1, -1))
        got = other(grey.expand(-1, channels, -1, -1))
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_resnet18_pretrained_without_network_says_what_to_do(monkeypatch) -> None:
    import torchvision.models._api as api

    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(ValueError) as err:
        build_model("resnet18", num_classes=10, in_channels=3, pretrained=True)
    message = str(err.value)
    assert "TORCH_HOME" in message and "pretrained" in message and "name resolution" in message
    assert isinstance(err.value.__cause__, urllib.error.URLError)


def test_pretrained_only_where_weights_exist() -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("resnet20", num_classes=10, in_channels=3, pretrained=True)


def test_models_module_does_not_import_torchvision() -> None:
    """The training node imports models.py; torchvision is paid for only when resnet18 is built."""
    code = "import sys, dsgd_mpi.models; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0

"""EvoNorm networks: sizes against their BN twins (timm), timm checkpoint loading, the converter."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import BatchNormAct2d

import vizoo
from vizoo.counting import count_macs, count_params
from vizoo.layers.evonorm import EvoNorm2dB0, EvoNorm2dS0
from vizoo.layers.norm_act_convert import NormActConversionError, convert_norm_act

# our model -> timm's BN model of the same architecture
BN_TWINS = {
    "resnet50v2_evos0": "resnetv2_50",
    "resnet50v2_evob0": "resnetv2_50",
    "mobilenetv2_100_evos0": "mobilenetv2_100",
    "efficientnet_b0_evos0": "efficientnet_b0",
}


def _norms_with_act(bn_model: nn.Module) -> dict[str, BatchNormAct2d]:
    return {n: m for n, m in bn_model.named_modules()
            if isinstance(m, BatchNormAct2d) and not isinstance(m.act, nn.Identity)}


@pytest.mark.parametrize("name", sorted(BN_TWINS))
def test_params_are_bn_twin_plus_v_per_activated_norm(name):
    ours = vizoo.create_model(name)
    twin = timm.create_model(BN_TWINS[name])
    activated = _norms_with_act(twin)
    assert activated
    extra = sum(m.num_features for m in activated.values())
    assert count_params(ours) == count_params(twin) + extra
    # same modules at the same paths: the twin's keys minus BN statistics, plus `v` per activated norm
    bn_stats = ("running_mean", "running_var", "num_batches_tracked")
    twin_params = {k for k in twin.state_dict() if not k.endswith(bn_stats)}
    our_params = {k for k, _ in ours.named_parameters()}
    assert our_params - twin_params == {n + ".v" for n in activated}
    assert twin_params <= our_params
    # buffers: B0 keeps running_var for norms with an activation only, S0 none
    buffers = {k for k, _ in ours.named_buffers()}
    if name.endswith("evob0"):
        assert buffers == {n + ".running_var" for n in activated}
    else:
        assert buffers == set()


def test_resnet_macs_within_one_percent_of_bn_twin():
    size = (3, 64, 64)
    twin_macs = count_macs(timm.create_model("resnetv2_50", num_classes=10), size)
    for name in ("resnet50v2_evos0", "resnet50v2_evob0"):
        macs = count_macs(vizoo.create_model(name, num_classes=10), size)
        assert abs(macs - twin_macs) <= 0.01 * twin_macs, (name, macs, twin_macs)


def test_resnet50v2_is_tf_resnet_v2_form():
    m = vizoo.create_model("resnet50v2_evos0")
    assert [n for n, _ in m.stem.named_children()] == ["conv", "pool"]  # no norm in the stem
    assert m.stem.conv.kernel_size == (7, 7) and m.stem.conv.stride == (2, 2)
    first = m.stages[1].blocks[0]
    assert first.conv2.stride == (2, 2) and first.conv1.stride == (1, 1)  # stride on the 3x3
    assert isinstance(m.norm, EvoNorm2dS0) and m.norm.apply_act  # final norm-act before pooling
    norms = [x for x in m.modules() if isinstance(x, EvoNorm2dS0)]
    assert all(x.apply_act for x in norms)  # pre-activation: every norm has an activation


def test_timm_resnetv2_50d_evos_checkpoint_loads_and_matches(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("resnetv2_50d_evos", num_classes=1000).eval()
    with torch.no_grad():  # move norm parameters off their init so a wrong mapping shows
        for n, p in ref.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
        ref.head.fc.weight.mul_(30)
    path = tmp_path / "resnetv2_50d_evos.safetensors"
    save_file(ref.state_dict(), str(path))
    ours = vizoo.create_model("resnetv2_50d_evos", pretrained=path.as_uri()).eval()
    assert ours.pretrained_cfg["source"] == "hf-hub:timm/resnetv2_50d_evos.ah_in1k"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert expected.std() > 0.1


def test_mobilenetv2_evos0_runs_on_32px_single_channel():
    m = vizoo.create_model("mobilenetv2_100_evos0", num_classes=10, in_chans=1)
    x = torch.randn(4, 1, 32, 32)
    m.train()
    out = m(x)
    F.cross_entropy(out, torch.arange(4)).backward()
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m(x[:1])).all()


def test_mobilenetv2_uses_tf_group_fallback():
    m = vizoo.create_model("mobilenetv2_100_evos0")
    for layer in m.modules():
        if isinstance(layer, EvoNorm2dS0) and layer.apply_act:
            g = 32
            while g > 1 and layer.num_features % g:
                g -= 1
            assert layer.groups == g


# --- converter ----------------------------------------------------------------------------------

def test_converter_on_timm_bn_model_equals_registered_model():
    converted = convert_norm_act(timm.create_model("mobilenetv2_100", num_classes=10), "s0")
    ours = vizoo.create_model("mobilenetv2_100_evos0", num_classes=10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    # randomise the hand-built model's norms, then copy everything across strictly
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    converted.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted.eval()(x), ours.eval()(x))


class _BnNet(nn.Module):
    """BN+ReLU in a Sequential, BN+functional ReLU, a shared ReLU module, and a BN without activation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.bn3 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + x)


class _EvoNet(nn.Module):
    """The same network written by hand with EvoNorm layers."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), layer(16), nn.Identity())
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1), layer(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), layer(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 1), layer(16, apply_act=False)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return torch.relu(self.bn3(self.conv3(y)) + x)


@pytest.mark.parametrize("layer", [EvoNorm2dB0, EvoNorm2dS0])
def test_converter_matches_hand_built_model(layer):
    torch.manual_seed(0)
    converted = convert_norm_act(_BnNet(), layer)
    built = _EvoNet(layer)
    with torch.no_grad():
        for p in built.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    converted.load_state_dict(built.state_dict(), strict=True)
    assert isinstance(converted, torch.fx.GraphModule)  # F.relu / shared relu needed a graph rewrite
    x = torch.randn(3, 3, 12, 12)
    for mode in (True, False):
        torch.testing.assert_close(converted.train(mode)(x), built.train(mode)(x))


def test_converter_keeps_class_when_activations_are_own_modules():
    import torchvision

    model = torchvision.models.mobilenet_v2(num_classes=10)
    converted = convert_norm_act(model, "s0")
    assert converted is model and type(converted).__name__ == "MobileNetV2"
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU6)) for m in converted.modules())
    affine_only = [n for n, m in converted.named_modules() if isinstance(m, EvoNorm2dS0) and not m.apply_act]
    assert affine_only and all(n.startswith("features.") and n.count(".conv.") for n in affine_only)


def test_converter_refuses_untraceable_model():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return F.relu(y) if y.sum() > 0 else y

    with pytest.raises(NormActConversionError, match="Sequential"):
        convert_norm_act(Branchy(), "s0")

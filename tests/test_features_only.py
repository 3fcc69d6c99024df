"""create_model(name, features_only=True): timm-style feature backbones for every CNN in the zoo."""
import pytest
import torch
import torch.nn as nn
from timm.models.efficientnet import EfficientNet
from timm.models.resnetv2 import ResNetV2

import vizoo
from vizoo import hub
from vizoo.models.affnet import AFFNet
from vizoo.registry import get_family, get_pretrained_cfg, register_model

# Test-local registrations (families named test_*) are not part of the zoo.
ZOO = [n for n in vizoo.list_models() if not get_family(n).startswith("test_")]
FEATURES = [n for n in vizoo.list_models(features_only=True) if n in ZOO]
NO_FEATURES = [n for n in ZOO if n not in FEATURES]
CNN_FAMILIES = {"evonorm_nets", "mobilenet_ulsam", "affnet"}


def _size(name: str) -> int:
    cfg = get_pretrained_cfg(name)
    return (cfg.test_input_size or (3, 64, 64))[-1]


@torch.no_grad()
def _check_outputs(model: nn.Module, size: int) -> list[torch.Tensor]:
    """Outputs agree with feature_info: one NCHW map per out_index, channels and stride as told."""
    model.eval()
    outs = model(torch.randn(2, 3, size, size))
    info = model.feature_info
    assert isinstance(outs, list)
    assert len(outs) == len(info.channels()) == len(info.reduction()) == len(info.out_indices)
    for out, chs, red in zip(outs, info.channels(), info.reduction()):
        assert out.ndim == 4 and out.shape[0] == 2
        assert out.shape[1] == chs
        assert size / out.shape[-2] == red and size / out.shape[-1] == red
    return outs


def test_cnn_families_give_features_and_vits_refuse():
    assert FEATURES and NO_FEATURES
    for name in ZOO:
        if get_family(name) in CNN_FAMILIES:
            assert name in FEATURES, name
        if get_family(name) == "evit":
            assert name in NO_FEATURES, name


@pytest.mark.parametrize("name", FEATURES)
def test_features_match_feature_info_all_levels_and_subset(name):
    size = _size(name)
    model = vizoo.create_model(name, features_only=True)
    outs = _check_outputs(model, size)
    # timm's default: every level (five, strides 2..32, for these CNNs).
    assert len(outs) == len(model.feature_info) == 5
    assert model.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert model.vizoo_name == name and model.vizoo_kwargs == {"features_only": True}
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and "num_classes" not in cfg and "classifier" not in cfg
    assert model.default_cfg is cfg

    sub = vizoo.create_model(name, features_only=True, out_indices=(1, 2, 3))
    sub_outs = _check_outputs(sub, size)
    assert len(sub_outs) == 3
    assert sub.feature_info.channels() == model.feature_info.channels()[1:4]
    assert sub.feature_info.reduction() == [4, 8, 16]
    assert sub.feature_info.module_name() == model.feature_info.module_name()[1:4]


@pytest.mark.parametrize("name", ["mobilenetv2_100_evos0", "affnet_et", "resnet50v2_evob0"])
def test_negative_and_last_n_out_indices(name):
    full = vizoo.create_model(name, features_only=True).feature_info
    neg = vizoo.create_model(name, features_only=True, out_indices=(-2, -1))
    assert neg.feature_info.channels() == full.channels()[-2:]
    assert neg.feature_info.reduction() == [16, 32]
    _check_outputs(neg, _size(name))
    last3 = vizoo.create_model(name, features_only=True, out_indices=3)  # timm: int n = last n levels
    assert last3.feature_info.reduction() == [8, 16, 32]


@pytest.mark.parametrize("name", ["mobilenetv2_100_evos0", "mobilenetv2_100_ulsam_a", "mobilenetv1_100_ulsam",
                                  "affnet_et", "affnet_t"])
def test_detector_backbone_strides_4_to_32(name):
    model = vizoo.create_model(name, features_only=True, out_indices=(1, 2, 3, 4))
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    chans = model.feature_info.channels()
    assert len(chans) == 4 and all(isinstance(c, int) and c > 0 for c in chans)
    outs = _check_outputs(model, 64)
    assert [o.shape[1] for o in outs] == chans
    # FeatureListNet: each level's module is a direct child (stages.1 -> stages_1), e.g. to freeze.
    children = {n for n, _ in model.named_children()}
    assert {m.replace(".", "_") for m in model.feature_info.module_name()} <= children


def _trunk_and_head(model: nn.Module):
    """forward_features = head(trunk(x)); the deepest feature level is trunk(x) (last stage output)."""
    if isinstance(model, EfficientNet):  # EvoNorm EfficientNet/MobileNetV2, ULSAM MobileNets
        return (lambda x: model.blocks(model.bn1(model.conv_stem(x))),
                lambda y: model.bn2(model.conv_head(y)))
    if isinstance(model, ResNetV2):  # pre-activation: final norm-act after the last stage
        return lambda x: model.stages(model.stem(x)), model.norm
    if isinstance(model, AFFNet):
        return lambda x: model.stages(model.stem(x)), model.final_conv
    raise AssertionError(type(model))


# One model per family / class (same weights through a checkpoint or pretrained=path).
@pytest.mark.parametrize("name,load", [
    ("mobilenetv2_100_evos0", "checkpoint_path"), ("efficientnet_b0_evob0", "pretrained"),
    ("resnet50v2_evos0", "checkpoint_path"), ("mobilenetv1_100_ulsam", "pretrained"),
    ("mobilenetv2_100_ulsam_add", "checkpoint_path"), ("affnet_et", "checkpoint_path"),
])
@torch.no_grad()
def test_features_equal_full_model_with_same_weights(name, load, tmp_path):
    full = vizoo.create_model(name).eval()
    for m in full.modules():  # non-trivial norm statistics, so a wrong tap cannot match by chance
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = hub.save_model(full, tmp_path / "full.safetensors")
    feats = vizoo.create_model(name, features_only=True, **{load: path}).eval()
    size = _size(name)
    x = torch.randn(2, 3, size, size)

    # Every level equals the output of the module feature_info names, hooked in the full model.
    taps = {}
    names = feats.feature_info.module_name()
    hooks = [full.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: taps.__setitem__(n, o))
             for n in names]
    full(x)
    for h in hooks:
        h.remove()
    outs = feats(x)
    for n, out in zip(names, outs):
        torch.testing.assert_close(out, taps[n], rtol=1e-5, atol=1e-5)

    # The deepest level is the tensor forward_features computes before its head conv / final norm.
    trunk, head = _trunk_and_head(full)
    deepest = trunk(x)
    torch.testing.assert_close(head(deepest), full.forward_features(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[-1], deepest, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_feature_cls_getter_equals_default_list(tmp_path):
    name = "mobilenetv2_100_ulsam_a"
    path = hub.save_model(vizoo.create_model(name), tmp_path / "full.safetensors")
    listed = vizoo.create_model(name, features_only=True, out_indices=(1, 2, 3, 4), checkpoint_path=path)
    getter = vizoo.create_model(name, features_only=True, out_indices=(1, 2, 3, 4), checkpoint_path=path,
                                feature_cls="getter")
    assert type(listed).__name__ == "FeatureListNet" and type(getter).__name__ == "FeatureGetterNet"
    assert getter.feature_info.channels() == listed.feature_info.channels()
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(listed.eval()(x), getter.eval()(x)):
        torch.testing.assert_close(a, b)


@torch.no_grad()
def test_features_model_checkpoint_round_trip(tmp_path):
    model = vizoo.create_model("affnet_et", features_only=True, out_indices=(1, 2, 3, 4)).eval()
    path = hub.save_model(model, tmp_path / "backbone.safetensors")
    again = hub.load_model(path).eval()  # rebuilt from the sidecar: features_only, same out_indices
    assert again.feature_info.out_indices == model.feature_info.out_indices
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(model(x), again(x)):
        torch.testing.assert_close(a, b)
    with pytest.raises(hub.CheckpointError, match="features_only model"):
        vizoo.create_model("affnet_et", features_only=True, out_indices=(1, 2), checkpoint_path=path)


@pytest.mark.parametrize("name", NO_FEATURES + ["evit_deit_small_patch16_224.r0p7_fuse"])
def test_models_without_features_refuse_in_one_line(name):
    with pytest.raises(ValueError) as e:
        vizoo.create_model(name, features_only=True, out_indices=(1, 2, 3))
    msg = str(e.value)
    assert msg.startswith(f"{name} cannot return feature maps (features_only): ")
    assert msg.endswith("`vizoo list --features-only` lists models that can")
    assert "\n" not in msg


def test_bad_out_indices_are_clear_errors():
    with pytest.raises(ValueError, match="5 feature levels"):
        vizoo.create_model("affnet_et", features_only=True, out_indices=(1, 5))
    with pytest.raises(ValueError, match="increasing"):
        vizoo.create_model("affnet_et", features_only=True, out_indices=(3, 1))
    with pytest.raises(ValueError, match="features_only=True"):
        vizoo.create_model("affnet_et", out_indices=(1, 2))


def test_list_models_and_cli_list_features_only(capsys):
    assert set(FEATURES) <= set(vizoo.list_models(features_only=True))
    assert not set(vizoo.list_models(features_only=True)) & set(NO_FEATURES)
    assert vizoo.list_models("affnet*.*", features_only=True) == ["affnet.in1k", "affnet_et.in1k", "affnet_t.in1k"]
    assert vizoo.list_models("evit*", features_only=True) == []
    from vizoo.cli import main

    assert main(["list", "--features-only"]) == 0
    listed = capsys.readouterr().out.split()
    assert set(FEATURES) <= set(listed) and not set(listed) & set(NO_FEATURES)


# --- the mechanism for any hand-written model: feature_info + a registered feature_cfg ------------

class _TinySeqNet(nn.Module):
    def __init__(self, num_classes: int = 3, **kwargs):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.stages = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(6, 8, 3, stride=2, padding=1))
        self.head = nn.Linear(8, num_classes)
        self.feature_info = [dict(num_chs=4, reduction=2, module="stem"),
                             dict(num_chs=6, reduction=4, module="stages.0"),
                             dict(num_chs=8, reduction=8, module="stages.1")]

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


@register_model(feature_cfg=dict(flatten_sequential=True))
def tiny_features_net(**kwargs):
    return _TinySeqNet(**kwargs)


def test_registered_feature_cfg_serves_a_hand_written_model():
    assert "tiny_features_net" in vizoo.list_models("tiny_*", features_only=True)
    model = vizoo.create_model("tiny_features_net", features_only=True, out_indices=(0, -1))
    assert model.feature_info.channels() == [4, 8]
    _check_outputs(model, 32)

"""EvoNorm networks: the paper's search-time architectures with every BN+activation replaced.

Liu, Brock, Simonyan, Le, "Evolving Normalization-Activation Layers", NeurIPS 2020
(arXiv 2004.02967). The paper swaps each BN-ReLU (BN-Swish in EfficientNet) for one EvoNorm layer
in a pre-activation ResNet-50, MobileNetV2 and EfficientNet-B0; a BN with no activation after it
becomes an EvoNorm with the nonlinearity off (affine ``x·γ + β`` only), as in the TF reference.

Architectures are timm's classes, given our EvoNorm layers as ``norm_layer``:

- ``resnet50v2_evo{b0,s0}``: timm ``ResNetV2`` in the TF ``resnet_v2`` form (7×7/2 stem conv with
  no norm, max-pool, bottleneck blocks that begin with norm-act, projection shortcut on the
  pre-activated input, stride on the 3×3 conv, final norm-act before pooling). Every norm here is
  followed by an activation. One known difference: the stem max-pool pads symmetrically
  (PyTorch/timm ``resnetv2_50``) where TF uses 'SAME' (pad only at the end).
- ``mobilenetv2_100_evo{b0,s0}``, ``efficientnet_b0_evo{b0,s0}``: timm ``EfficientNet`` with the
  MobileNetV2 / EfficientNet-B0 block definitions. Channel counts that 32 does not divide use the
  TF fallback (largest divisor below 32): 16->16, 24->24, 40->20, 80->20, 112->28, 144->24,
  240->30 groups. The projection (linear bottleneck) norms have no activation -> affine only.
- ``resnetv2_50d_evos``: timm's ``resnetv2_50d_evos`` architecture with our ``EvoNorm2dS0`` in
  timm-compatible mode, so timm's trained ``resnetv2_50d_evos.ah_in1k`` weights load and match.

Layer options (eps, groups, ``timm_compatible``) pass through ``norm_kwargs``.

``create_model(name, features_only=True, out_indices=...)`` works as in timm: timm's
``FeatureListNet`` (``flatten_sequential``, as timm's ``_create_resnetv2``) over timm's own
``feature_info`` of each class: EfficientNet stage ends ``blocks.{0,1,2,4,6}``, ResNetV2
``stem.conv``, ``stages.0-3``, at strides 2, 4, 8, 16, 32. ``feature_cls='getter'`` selects timm's
``FeatureGetterNet`` over ``forward_intermediates`` instead.
"""
from __future__ import annotations

from typing import Any, Optional

from timm.layers import create_conv2d
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet
from timm.models.resnetv2 import ResNetV2

from ..layers.evonorm import evonorm_norm_act
from ..registry import PretrainedCfg, register_model, register_pretrained_cfgs

__all__: list[str] = []

_PAPER = "Evolving Normalization-Activation Layers (NeurIPS 2020)"
_PAPER_URL = "https://arxiv.org/abs/2004.02967"
_NO_WEIGHTS = ("No official EvoNorm weights exist (the paper's TF code publishes none); train with "
               "`vizoo train`. The only trained ImageNet EvoNorm ResNet available is timm's, registered "
               "here as `resnetv2_50d_evos`.")

_MOBILENETV2_ARCH = [
    ["ds_r1_k3_s1_c16"],
    ["ir_r2_k3_s2_e6_c24"],
    ["ir_r3_k3_s2_e6_c32"],
    ["ir_r4_k3_s2_e6_c64"],
    ["ir_r3_k3_s1_e6_c96"],
    ["ir_r3_k3_s2_e6_c160"],
    ["ir_r1_k3_s1_e6_c320"],
]
_EFFICIENTNET_B0_ARCH = [
    ["ds_r1_k3_s1_e1_c16_se0.25"],
    ["ir_r2_k3_s2_e6_c24_se0.25"],
    ["ir_r2_k5_s2_e6_c40_se0.25"],
    ["ir_r3_k3_s2_e6_c80_se0.25"],
    ["ir_r3_k5_s1_e6_c112_se0.25"],
    ["ir_r4_k5_s2_e6_c192_se0.25"],
    ["ir_r1_k3_s1_e6_c320_se0.25"],
]


# --- builders -----------------------------------------------------------------------------------

def _create_resnetv2(kind: str, *, stem_type: str = "", avg_down: bool = False,
                     norm_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any) -> ResNetV2:
    """Pre-activation ResNet-50 with EvoNorm ``kind`` at every norm-act."""
    return ResNetV2(
        layers=[3, 4, 6, 3], conv_layer=create_conv2d, stem_type=stem_type, avg_down=avg_down,
        norm_layer=evonorm_norm_act(kind, **(norm_kwargs or {})), **kwargs)


def _create_efficientnet(kind: str, arch_def: list[list[str]], act_layer: str, *,
                         norm_kwargs: Optional[dict[str, Any]] = None, **kwargs: Any) -> EfficientNet:
    """MobileNetV2 / EfficientNet-B0 (width and depth multiplier 1.0) with EvoNorm ``kind``."""
    from timm.layers import get_act_layer

    return EfficientNet(
        block_args=decode_arch_def(arch_def, depth_multiplier=1.0), num_features=1280, stem_size=32,
        round_chs_fn=round_channels, act_layer=get_act_layer(act_layer),
        norm_layer=evonorm_norm_act(kind, **(norm_kwargs or {})), **kwargs)


# --- pretrained configs -----------------------------------------------------------------------------

def _cfg(**kwargs: Any) -> PretrainedCfg:
    return PretrainedCfg(paper=_PAPER, paper_url=_PAPER_URL, notes=_NO_WEIGHTS, **kwargs)


#: ``features_only`` wrappers, as timm builds them for these classes (see vizoo.features).
_FEATURES = dict(flatten_sequential=True)

_RESNET = dict(first_conv="stem.conv", classifier="head.fc")
_EFFNET = dict(first_conv="conv_stem", classifier="classifier")

register_pretrained_cfgs({
    "resnet50v2_evob0": _cfg(**_RESNET),
    "resnet50v2_evos0": _cfg(**_RESNET),
    "mobilenetv2_100_evob0": _cfg(**_EFFNET),
    "mobilenetv2_100_evos0": _cfg(**_EFFNET),
    "efficientnet_b0_evob0": _cfg(**_EFFNET),
    "efficientnet_b0_evos0": _cfg(**_EFFNET),
    "resnetv2_50d_evos.ah_in1k": PretrainedCfg(
        source="hf-hub:timm/resnetv2_50d_evos.ah_in1k",
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.95,
        first_conv="stem.conv1", classifier="head.fc", paper=_PAPER, paper_url=_PAPER_URL,
        paper_metrics={"params_m": 25.6, "macs_g": 4.3,
                       "reference": "timm model card resnetv2_50d_evos.ah_in1k, not the EvoNorm paper"},
        notes=("timm's ImageNet-1k weights (trained by timm, not the paper's authors); test size 288 "
               "with crop 1.0 per timm. EvoNorm2dS0 in timm-compatible mode. The weights are on the "
               "Hugging Face hub; offline, pass pretrained='/path/model.safetensors' or a file:// URL."),
    ),
})


# --- entry points -----------------------------------------------------------------------------------

@register_model(feature_cfg=_FEATURES)
def resnet50v2_evob0(**kwargs: Any) -> ResNetV2:
    """Pre-activation ResNet-50 (TF resnet_v2 form) with EvoNorm-B0 at every BN-ReLU."""
    return _create_resnetv2("b0", **kwargs)


@register_model(feature_cfg=_FEATURES)
def resnet50v2_evos0(**kwargs: Any) -> ResNetV2:
    """Pre-activation ResNet-50 (TF resnet_v2 form) with EvoNorm-S0 at every BN-ReLU."""
    return _create_resnetv2("s0", **kwargs)


@register_model(feature_cfg=_FEATURES)
def mobilenetv2_100_evob0(**kwargs: Any) -> EfficientNet:
    """MobileNetV2 1.0 with EvoNorm-B0 for BN-ReLU6 (affine-only for linear bottlenecks)."""
    return _create_efficientnet("b0", _MOBILENETV2_ARCH, "relu6", **kwargs)


@register_model(feature_cfg=_FEATURES)
def mobilenetv2_100_evos0(**kwargs: Any) -> EfficientNet:
    """MobileNetV2 1.0 with EvoNorm-S0 for BN-ReLU6 (affine-only for linear bottlenecks)."""
    return _create_efficientnet("s0", _MOBILENETV2_ARCH, "relu6", **kwargs)


@register_model(feature_cfg=_FEATURES)
def efficientnet_b0_evob0(**kwargs: Any) -> EfficientNet:
    """EfficientNet-B0 with EvoNorm-B0 for BN-Swish (SE keeps its Swish)."""
    return _create_efficientnet("b0", _EFFICIENTNET_B0_ARCH, "swish", **kwargs)


@register_model(feature_cfg=_FEATURES)
def efficientnet_b0_evos0(**kwargs: Any) -> EfficientNet:
    """EfficientNet-B0 with EvoNorm-S0 for BN-Swish (SE keeps its Swish)."""
    return _create_efficientnet("s0", _EFFICIENTNET_B0_ARCH, "swish", **kwargs)


@register_model(feature_cfg=_FEATURES)
def resnetv2_50d_evos(**kwargs: Any) -> ResNetV2:
    """timm's ResNetV2-50d (deep stem, avg-pool shortcut) with our EvoNorm-S0, timm-compatible."""
    norm_kwargs = {"timm_compatible": True, **kwargs.pop("norm_kwargs", {})}
    return _create_resnetv2("s0", stem_type="deep", avg_down=True, norm_kwargs=norm_kwargs, **kwargs)

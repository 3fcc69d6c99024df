"""MobileNet-V1 / V2 with ULSAM subspace attention (Saini et al., WACV 2020, arXiv 2006.15102).

The paper puts ULSAM into MobileNets two ways: *added* (inserted, nothing removed) and
*replacing* whole layers (fewer MACs and params). No model code, placement table or checkpoint was
released (the official repo ``Nandan91/ULSAM`` holds only the module), so the placements here are
reconstructed from the paper's exact (params, MACs) pairs (spec §1.5):

- MV1 replace (``mobilenetv1_{100,075,050}_ulsam``): one of the five stride-1 14x14 512a->512a
  depthwise-separable layers (L7..L11) becomes ULSAM(512a, g): 569 - 52.28 + 0.2 = 517M MACs.
  Which of the five the paper used is not recoverable; we replace the last (L11, ``blocks.3.5``).
- MV1 add (``mobilenetv1_100_ulsam_add``): +0.2M MACs = 2*512*14*14, so ULSAM sits on the
  14x14x512 map; we insert it after L11 (``blocks.3.6``, the end of the 14x14 stage).
- MV2 replace: stride-1 repeats of the 96-ch (14x14) and 160-ch (7x7) stages become ULSAM(C, g)
  (the stage's first, stride/width-changing block always stays). cfg A = one 96 + one 160
  (300 - 38.17 + 0.05 = 261.88M), B = two 160 (269.07M), C = two 96 + two 160 (223.77M). The
  repeat index is not recoverable; we replace the last repeats (A: ``blocks.4.2``,
  ``blocks.5.2``; B: ``blocks.5.1-2``; C: ``blocks.4.1-2``, ``blocks.5.1-2``).
- MV2 add (``mobilenetv2_100_ulsam_add``): the paper's +0.01M MACs fits only the smallest map,
  160x7x7 (2*160*49 = 0.016M; every other map gives >= 0.025M); we insert after the last 160-ch
  block (``blocks.5.3``).

Replacing or appending at the *end* of a stage leaves every other parameter name equal to
timm's ``mobilenetv1_100`` / ``mobilenetv2_100``, so timm's ImageNet weights for the vanilla
network load into all non-ULSAM keys (``strict=False``) as a fine-tuning start.

Backbones are timm's own definitions (``EfficientNet`` class + ``EfficientNetBuilder``): MV1 =
the standard 13 depthwise-separable layers with no skips, ReLU6 as in TF-slim (timm
``mobilenetv1_100``: 4.23M params / 568.7M MACs, 0.75: 2.59M / 325.4M, 0.5: 1.33M / 149.5M, the
MobileNet paper's 4.2/569, 2.6/325, 1.3/149); MV2 = timm ``mobilenetv2_100`` (3.50M / 300.8M; the
paper quotes MobileNetV2's 3.4M / 300M, so compare *changes*, not absolute counts). Training
recipe: not released; use a standard MobileNet ImageNet recipe.

``create_model(name, features_only=True, out_indices=...)`` works as in timm: the ULSAM edits keep
timm's stage structure, so timm's ``feature_info`` (stage ends ``blocks.N`` at strides 2-32, with
any ULSAM inside its stage) serves timm's ``FeatureListNet`` (``flatten_sequential``);
``feature_cls='getter'`` uses timm's ``EfficientNet.forward_intermediates`` instead.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch.nn as nn
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models.efficientnet import EfficientNet

from ..layers.ulsam import OFFICIAL_BN_MOMENTUM, ULSAM, ulsam_checkpoint_filter
from ..registry import PretrainedCfg, register_model, register_pretrained_cfgs

__all__ = ["MobileNetULSAM"]

# Standard definitions, in timm's block-string notation (same as timm's _gen_mobilenet_v1/_v2).
_MV1_ARCH = [
    ["dsa_r1_k3_s1_c64"],     # L1 @112
    ["dsa_r2_k3_s2_c128"],    # L2-L3 @56
    ["dsa_r2_k3_s2_c256"],    # L4-L5 @28
    ["dsa_r6_k3_s2_c512"],    # L6 (s2) + L7-L11 @14   <- stage 3
    ["dsa_r2_k3_s2_c1024"],   # L12-L13 @7
]
_MV2_ARCH = [
    ["ds_r1_k3_s1_c16"],
    ["ir_r2_k3_s2_e6_c24"],
    ["ir_r3_k3_s2_e6_c32"],
    ["ir_r4_k3_s2_e6_c64"],
    ["ir_r3_k3_s1_e6_c96"],   # stage 4 @14
    ["ir_r3_k3_s2_e6_c160"],  # stage 5 @7
    ["ir_r1_k3_s1_e6_c320"],
]
_MV1_STAGE_14 = 3            # the 14x14 stage: blocks.3.0 = L6 (stride 2), blocks.3.k = L(6+k)
_MV1_FIRST_LAYER_OF_STAGE = 6

#: (stage, block index, "replace" | "after") per MV2 configuration.
_MV2_EDITS = {
    "a": ((4, 2, "replace"), (5, 2, "replace")),
    "b": ((5, 1, "replace"), (5, 2, "replace")),
    "c": ((4, 1, "replace"), (4, 2, "replace"), (5, 1, "replace"), (5, 2, "replace")),
    "add": ((5, 2, "after"),),
}

Edit = tuple[int, int, str]


def _convs(block: nn.Module) -> list[nn.Conv2d]:
    return [m for m in block.modules() if isinstance(m, nn.Conv2d)]


def _out_channels(block: nn.Module) -> int:
    return _convs(block)[-1].out_channels


def _check_replaceable(block: nn.Module, where: str) -> None:
    """Only a block that keeps shape (stride 1, C in == C out) can become a shape-keeping ULSAM."""
    convs = _convs(block)
    if any(s != 1 for c in convs for s in c.stride) or convs[0].in_channels != convs[-1].out_channels:
        raise ValueError(f"{where} changes stride or width, so ULSAM (shape-preserving) cannot replace it; "
                         "pick a stride-1 repeat of a stage")


def _apply_ulsam_edits(blocks: nn.Sequential, edits: Sequence[Edit], num_groups: int,
                       bn_momentum: float) -> None:
    """Replace blocks by ULSAM or insert ULSAM after them, in place (stage by stage, last index
    first so that insertions never shift an index still to be edited)."""
    for stage_idx, block_idx, op in sorted(edits, key=lambda e: (e[0], -e[1])):
        stage = blocks[stage_idx]
        if not 0 <= block_idx < len(stage):
            raise ValueError(f"stage {stage_idx} has {len(stage)} blocks; no block {block_idx}")
        where = f"blocks.{stage_idx}.{block_idx}"
        ulsam = ULSAM(_out_channels(stage[block_idx]), num_groups, bn_momentum=bn_momentum)
        if op == "replace":
            _check_replaceable(stage[block_idx], where)
            stage[block_idx] = ulsam
        elif op == "after":
            mods = list(stage)
            mods.insert(block_idx + 1, ulsam)
            blocks[stage_idx] = nn.Sequential(*mods)
        else:
            raise ValueError(f"unknown ULSAM edit {op!r}; use 'replace' or 'after'")


class MobileNetULSAM(EfficientNet):
    """A timm MobileNet (``EfficientNet`` class) with ULSAM modules placed by ``ulsam_edits``.

    ``forward_features``, ``forward_head(x, pre_logits=False)``, ``reset_classifier`` and
    ``get_classifier`` are timm's. ULSAM layers keep PyTorch's default init, as the official code.
    """

    def __init__(self, block_args: Any, ulsam_edits: Sequence[Edit], g: int = 4,
                 ulsam_bn_momentum: float = OFFICIAL_BN_MOMENTUM, **kwargs: Any) -> None:
        super().__init__(block_args=block_args, **kwargs)
        self.ulsam_edits = tuple(tuple(e) for e in ulsam_edits)
        self.num_groups = g
        _apply_ulsam_edits(self.blocks, self.ulsam_edits, g, ulsam_bn_momentum)


#: ``features_only`` through timm's FeatureListNet over feature_info (see vizoo.features).
_FEATURES = dict(flatten_sequential=True)


def _create_mobilenet_ulsam(arch_def: list[list[str]], width: float, num_features: int,
                            edits: Sequence[Edit], **kwargs: Any) -> MobileNetULSAM:
    round_chs_fn = partial(round_channels, multiplier=width)
    norm_layer = kwargs.pop("norm_layer", None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs))
    act_layer = resolve_act_layer(kwargs, "relu6")
    return MobileNetULSAM(
        block_args=decode_arch_def(arch_def), ulsam_edits=edits, num_features=num_features,
        stem_size=32, round_chs_fn=round_chs_fn, norm_layer=norm_layer, act_layer=act_layer, **kwargs)


def _mv1_edits(mode: str, position: int) -> tuple[Edit, ...]:
    """``position`` is the MobileNet-V1 layer number: 7..11 to replace, 6..11 to insert after."""
    lo = _MV1_FIRST_LAYER_OF_STAGE + (1 if mode == "replace" else 0)
    if not lo <= position <= 11:
        raise ValueError(f"position={position}: ULSAM can {'replace' if mode == 'replace' else 'follow'} "
                         f"MobileNet-V1 layers {lo}..11 (the 14x14 stride-1 layers)")
    return ((_MV1_STAGE_14, position - _MV1_FIRST_LAYER_OF_STAGE, "replace" if mode == "replace" else "after"),)


def _create_mv1_ulsam(width: float, mode: str, position: int = 11, **kwargs: Any) -> MobileNetULSAM:
    return _create_mobilenet_ulsam(_MV1_ARCH, width, 0, _mv1_edits(mode, position), **kwargs)


def _create_mv2_ulsam(cfg: str, **kwargs: Any) -> MobileNetULSAM:
    return _create_mobilenet_ulsam(_MV2_ARCH, 1.0, 1280, _MV2_EDITS[cfg], **kwargs)


# --- configs: no weights; the paper's numbers (slides p.7-9 and poster, WACV 2020) -----------

_PAPER = ("ULSAM: Ultra-Lightweight Subspace Attention Module for Compact Convolutional Neural "
          "Networks (Saini, Jha, Das, Mittal, Mohan; WACV 2020)")
_NOTES = ("No official checkpoint: the ULSAM repo (Nandan91/ULSAM) publishes only the module. "
          "Train with `vizoo train`. Checkpoints whose ULSAM layers use the official per-subspace "
          "layout (subspaces.{n}.*) load through the config's filter. The paper's top-1/params/MACs "
          "are for g=4 (other g under *_by_g); params/MACs differ from ours in absolute terms "
          "(paper baselines 4.2M/569M for MV1, 3.4M/300M for MV2) but match as changes. ULSAM is "
          "inert on maps of 2x2 or less (MV1's 14x14 stage at 32 px input): train at >= 64 px.")


def _cfg(**kwargs: Any) -> PretrainedCfg:
    return PretrainedCfg(
        source="", input_size=(3, 224, 224), interpolation="bilinear", crop_pct=0.875,
        classifier="classifier", first_conv="conv_stem", paper=_PAPER,
        paper_url="https://arxiv.org/abs/2006.15102", notes=_NOTES, filter_fn=ulsam_checkpoint_filter,
        test_input_size=(3, 64, 64), **kwargs)


_MV1_100 = {"params_m": 4.2, "macs_g": 0.569, "top1": 70.65, "top5": 89.76}
_MV2_100 = {"params_m": 3.4, "macs_g": 0.300, "top1": 71.25, "top5": 90.19}

register_pretrained_cfgs({
    "mobilenetv1_100_ulsam": _cfg(paper_metrics={
        "params_m": 3.9, "macs_g": 0.517, "top1": 70.43, "top5": 89.92, "g": 4,
        "top1_by_g": {1: 69.92, 2: 70.14, 4: 70.43, 8: 70.29, 16: 70.04},
        "top5_by_g": {1: 89.25, 2: 89.67, 4: 89.92, 8: 89.96, 16: 89.98},
        "fine_grained_top1_by_g": {"food101": {1: 81.28, 4: 81.30, 8: 81.19, 16: 81.62},
                                   "birds": {1: 62.46, 4: 63.52, 8: 64.44, 16: 63.47},
                                   "dogs": {1: 62.73, 4: 63.06, 8: 63.30, 16: 62.75}},
        "vanilla": _MV1_100}),
    "mobilenetv1_075_ulsam": _cfg(paper_metrics={
        "params_m": 2.4, "macs_g": 0.296, "top1": 67.81, "top5": 88.43, "g": 4,
        "top1_by_g": {1: 67.98, 4: 67.81}, "top5_by_g": {1: 88.06, 4: 88.43},
        "vanilla": {"params_m": 2.6, "macs_g": 0.325, "top1": 67.48, "top5": 88.00}}),
    "mobilenetv1_050_ulsam": _cfg(paper_metrics={
        "params_m": 1.2, "macs_g": 0.136, "top1": 63.25, "top5": 84.81, "g": 4,
        "top1_by_g": {1: 63.42, 4: 63.25}, "top5_by_g": {1: 84.70, 4: 84.81},
        "vanilla": {"params_m": 1.3, "macs_g": 0.149, "top1": 63.22, "top5": 84.63}}),
    # The slides give three insertion positions (labels illegible): a, b at 569.2M (14x14x512,
    # ours), c at 569.1M (7x7x1024). No single top-1 is ours for sure, so all three are listed.
    "mobilenetv1_100_ulsam_add": _cfg(paper_metrics={
        "params_m": 4.2, "macs_g": 0.5692, "g": 4,
        "top1_by_position_g": {"a": {1: 70.69, 2: 70.84, 4: 70.77, 8: 70.59, 16: 70.89},
                               "b": {1: 70.62, 2: 70.88, 4: 70.61, 8: 70.92, 16: 70.73},
                               "c (7x7x1024, 569.1M)": {1: 70.63, 2: 70.85, 4: 70.86, 8: 70.74, 16: 70.82}},
        "vanilla": _MV1_100}),
    "mobilenetv2_100_ulsam_a": _cfg(paper_metrics={
        "params_m": 2.96, "macs_g": 0.26188, "top1": 71.52, "top5": 90.25, "g": 4,
        "fine_grained_top1_by_g": {"food101": {1: 81.57, 4: 81.69, 8: 82.13, 16: 81.84},
                                   "birds": {1: 63.35, 4: 64.70, 8: 65.41, 16: 63.31}},
        "vanilla": _MV2_100}),
    "mobilenetv2_100_ulsam_b": _cfg(paper_metrics={
        "params_m": 2.77, "macs_g": 0.26907, "top1": 70.74, "top5": 89.15, "g": 4,
        "fine_grained_top1_by_g": {"birds": {1: 64.19, 4: 64.57, 8: 64.61, 16: 65.03}},
        "vanilla": _MV2_100}),
    "mobilenetv2_100_ulsam_c": _cfg(paper_metrics={
        "params_m": 2.54, "macs_g": 0.22377, "top1": 69.72, "top5": 87.79, "g": 4,
        "vanilla": _MV2_100}),
    "mobilenetv2_100_ulsam_add": _cfg(paper_metrics={
        "params_m": 3.4, "macs_g": 0.30001, "top1": 71.64, "g": 4,
        "top1_by_g": {1: 71.31, 2: 71.39, 4: 71.64, 8: 71.35, 16: 71.42},
        "vanilla": _MV2_100}),
})


@register_model(feature_cfg=_FEATURES)
def mobilenetv1_100_ulsam(**kwargs: Any) -> MobileNetULSAM:
    """MobileNet-V1 1.0, layer L11 (``position``) replaced by ULSAM(512, g)."""
    return _create_mv1_ulsam(1.0, "replace", **kwargs)


@register_model(feature_cfg=_FEATURES)
def mobilenetv1_075_ulsam(**kwargs: Any) -> MobileNetULSAM:
    """MobileNet-V1 0.75, layer L11 (``position``) replaced by ULSAM(384, g)."""
    return _create_mv1_ulsam(0.75, "replace", **kwargs)


@register_model(feature_cfg=_FEATURES)
def mobilenetv1_050_ulsam(**kwargs: Any) -> MobileNetULSAM:
    """MobileNet-V1 0.5, layer L11 (``position``) replaced by ULSAM(256, g)."""
    return _create_mv1_ulsam(0.5, "replace", **kwargs)


@register_model(feature_cfg=_FEATURES)
def mobilenetv1_100_ulsam_add(**kwargs: Any) -> MobileNetULSAM:
    """MobileNet-V1 1.0 with ULSAM(512, g) inserted after layer L11 (``position``)."""
    return _create_mv1_ulsam(1.0, "add", **kwargs)


@register_model(feature_cfg=_FEATURES)
def mobilenetv2_100_ulsam_a(**kwargs: Any) -> MobileNetULSAM:
    """MobileNet-V2 1.0, last 96-ch and last 160-ch repeats replaced by ULSAM (paper cfg A)."""
    return _create_mv2_ulsam("a", **kwargs)


@register_model(feature_cfg=_FEATURES)
def mobilenetv2_100_ulsam_b(**kwargs: Any) -> MobileNetULSAM:
    """MobileNet-V2 1.0, both 160-ch repeats replaced by ULSAM (paper cfg B)."""
    return _create_mv2_ulsam("b", **kwargs)


@register_model(feature_cfg=_FEATURES)
def mobilenetv2_100_ulsam_c(**kwargs: Any) -> MobileNetULSAM:
    """MobileNet-V2 1.0, both 96-ch and both 160-ch repeats replaced by ULSAM (paper cfg C)."""
    return _create_mv2_ulsam("c", **kwargs)


@register_model(feature_cfg=_FEATURES)
def mobilenetv2_100_ulsam_add(**kwargs: Any) -> MobileNetULSAM:
    """MobileNet-V2 1.0 with ULSAM(160, g) inserted after the last 160-ch block."""
    return _create_mv2_ulsam("add", **kwargs)

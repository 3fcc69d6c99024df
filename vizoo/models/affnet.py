"""AFFNet: adaptive frequency filters as efficient global token mixers.

Huang et al., "Adaptive Frequency Filters As Efficient Global Token Mixers", ICCV 2023
(https://arxiv.org/abs/2307.14008); official code: ``microsoft/TokenMixers``, folder
"Adaptive Frequency Filters" (a trimmed ``apple/ml-cvnets``).

A MobileViT-shaped network whose attention is replaced by the AFF token mixer
(:class:`vizoo.layers.aff.AdaptiveFrequencyFilter`): MobileNetV2 stages at high resolution, then
three stages of [stride-2 inverted residual, AFF stage]. An AFF stage runs N blocks
``x + AFF(GN(IR(GN(x))))`` (channel mixer first, token mixer second; both the IR and the AFF keep
their own skips), a final GroupNorm(1), a 1x1 projection and a 1x1 fusion with the stage input.

Inputs are RGB in [0, 1] without mean/std normalisation (cvnets' convention), 256x256.
Inside :func:`vizoo.layers.export_mode.export_mode` the AFF mixers use their FFT-free form, so the
model converts to CoreML/TFLite; those files are then specific to the exported input size.

Initialisation follows what cvnets intends (conv kaiming-normal fan-out, linear trunc-normal 0.02,
norms 1/0, AFF mask weights 0.02 N(0,1)); the official TokenMixers copy leaves PyTorch defaults.
Module names follow timm (``stem``, ``stages``, ``conv_pw``/``bn1``...); :func:`checkpoint_filter_fn`
maps the official cvnets keys, so the released EMA checkpoints load from a local file.

``create_model(name, features_only=True, out_indices=...)``: timm's ``FeatureListNet`` over
``feature_info`` (``stages.0-4``, strides 2, 4, 8, 16, 32; the deepest level is the last stage's
output, before ``final_conv``), e.g. ``out_indices=(1, 2, 3, 4)`` for a detector's strides 4-32.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, ConvNormAct, DropPath, GroupNorm1, trunc_normal_
from timm.models._efficientnet_blocks import InvertedResidual

from ..layers.aff import AdaptiveFrequencyFilter
from ..layers.export_mode import ExportAware
from ..registry import PretrainedCfg, register_model, register_pretrained_cfgs

__all__ = ["AFFNet", "AFFBlock", "AFFStage", "checkpoint_filter_fn"]


# --- private blocks -----------------------------------------------------------------------------

class _LayerNorm2d(ExportAware, GroupNorm1):
    """GroupNorm with one group (cvnets "layer_norm_2d": statistics over C, H, W per sample).

    Export form: mean/variance written out channels-last. The converters' own group-norm
    decomposition puts BROADCAST_TO ops in TFLite files (XNNPACK takes none, so each splits the
    graph), and a channels-first form keeps the norm in NCHW between NHWC convs (two transposes per
    norm); channels-last, the permutes cancel against the converter's own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.exporting:
            return super().forward(x)
        x = x.permute(0, 2, 3, 1)
        centred = x - x.mean(dim=(1, 2, 3), keepdim=True)
        inv_std = torch.rsqrt((centred * centred).mean(dim=(1, 2, 3), keepdim=True) + self.eps)
        return (centred * inv_std * self.weight + self.bias).permute(0, 3, 1, 2)


def _inverted_residual(in_chs: int, out_chs: int, stride: int, exp_ratio: float) -> InvertedResidual:
    """MobileNetV2 block as cvnets builds it: SiLU, BN, hidden = make_divisible(in * exp, 8) (timm's
    make_divisible is the cvnets/TF rule: nearest multiple of 8, at least 8, at most 10 % down)."""
    return InvertedResidual(in_chs, out_chs, stride=stride, exp_ratio=exp_ratio, act_layer=nn.SiLU)


class AFFBlock(nn.Module):
    """One AFFNet block: ``x + drop_path(AFF(norm2(IR(norm1(x)))))`` (official ``Block``)."""

    def __init__(self, dim: int, mlp_ratio: float = 2.0, num_groups: int = 8,
                 mask_act: str = "silu", sparsity_threshold: float = 0.01,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _LayerNorm2d(dim)
        self.channel_mixer = _inverted_residual(dim, dim, stride=1, exp_ratio=mlp_ratio)
        self.norm2 = _LayerNorm2d(dim)
        self.token_mixer = AdaptiveFrequencyFilter(dim, num_groups=num_groups, act_layer=mask_act,
                                                   sparsity_threshold=sparsity_threshold)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.token_mixer(self.norm2(self.channel_mixer(self.norm1(x))))
        return x + self.drop_path(y)


class AFFStage(nn.Module):
    """Global stage (official ``AFFBlock``): blocks -> GroupNorm -> 1x1 proj (BN, no act) ->
    1x1 fusion of ``concat[input, proj]`` (BN, SiLU). Without fusion the input is not reused."""

    def __init__(self, dim: int, depth: int, mlp_ratio: float = 2.0, fuse: bool = True,
                 drop_path: Sequence[float] | float = 0.0, **block_kwargs) -> None:
        super().__init__()
        rates = [drop_path] * depth if isinstance(drop_path, (int, float)) else list(drop_path)
        self.blocks = nn.Sequential(*[AFFBlock(dim, mlp_ratio, drop_path=r, **block_kwargs)
                                      for r in rates])
        self.norm = _LayerNorm2d(dim)
        self.conv_proj = ConvNormAct(dim, dim, 1, apply_act=False)
        self.conv_fusion = ConvNormAct(2 * dim, dim, 1, act_layer=nn.SiLU) if fuse else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_proj(self.norm(self.blocks(x)))
        return self.conv_fusion(torch.cat([x, y], dim=1)) if self.conv_fusion is not None else y


# --- model --------------------------------------------------------------------------------------

class AFFNet(nn.Module):
    """AFFNet classifier.

    Args:
        widths: output channels of the five stages (two MobileNetV2 stages, three AFF stages).
        depths: AFF blocks in stages 3-5.
        mv2_exp: expansion of every MobileNetV2 block outside the AFF blocks.
        ffn_ratio: expansion of the IR channel mixer inside AFF blocks (ffn_dim / dim).
        stem_chs: stem width; ``layer2_blocks``: IR blocks of stage 2.
        head_exp / head_max: width of the last 1x1 conv, ``min(head_exp * widths[-1], head_max)``.
        num_groups, mask_act, sparsity_threshold: AFF token mixer settings (official: 8, SiLU, 0.01).
        fuse: per AFF stage, fuse with the stage input (all True in the released models).
    """

    def __init__(self, widths: Sequence[int] = (32, 48, 64, 104, 144), depths: Sequence[int] = (2, 4, 3),
                 mv2_exp: float = 2.0, ffn_ratio: float = 2.0, stem_chs: int = 16, layer2_blocks: int = 3,
                 head_exp: int = 4, head_max: int = 960, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.1, drop_path_rate: float = 0.0, global_pool: str = "avg",
                 num_groups: int = 8, mask_act: str = "silu", sparsity_threshold: float = 0.01,
                 fuse: Sequence[bool] = (True, True, True)) -> None:
        super().__init__()
        if len(widths) != 5 or len(depths) != 3 or len(fuse) != 3:
            raise ValueError("AFFNet needs 5 widths, 3 AFF depths and 3 fuse flags")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = ConvNormAct(in_chans, stem_chs, 3, stride=2, act_layer=nn.SiLU)

        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages = [nn.Sequential(_inverted_residual(stem_chs, widths[0], 1, mv2_exp))]
        stages.append(nn.Sequential(*[
            _inverted_residual(widths[0] if i == 0 else widths[1], widths[1], 2 if i == 0 else 1, mv2_exp)
            for i in range(layer2_blocks)]))
        in_chs = widths[1]
        for i, (dim, depth) in enumerate(zip(widths[2:], depths)):
            rates, dpr = dpr[:depth], dpr[depth:]
            stages.append(nn.Sequential(
                _inverted_residual(in_chs, dim, 2, mv2_exp),
                AFFStage(dim, depth, mlp_ratio=ffn_ratio, fuse=fuse[i], drop_path=rates,
                         num_groups=num_groups, mask_act=mask_act, sparsity_threshold=sparsity_threshold)))
            in_chs = dim
        self.stages = nn.Sequential(*stages)
        # One level per stride, at each stage's end (as timm's MobileNets; stages.0 at stride 2 is
        # the deepest stride-2 map, so the stem is not a level): strides 2, 4, 8, 16, 32.
        self.feature_info = [dict(num_chs=w, reduction=r, module=f"stages.{i}")
                             for i, (w, r) in enumerate(zip(widths, (2, 4, 8, 16, 32)))]

        self.num_features = self.head_hidden_size = min(head_exp * widths[-1], head_max)
        self.final_conv = ConvNormAct(widths[-1], self.num_features, 1, act_layer=nn.SiLU)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(_init_weights)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        if isinstance(self.head.fc, nn.Linear):
            _init_weights(self.head.fc)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(module: nn.Module) -> None:
    """cvnets' intended init (its ``reset_parameters``); AFF mask weights keep their 0.02 N(0,1)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --- official checkpoint keys -------------------------------------------------------------------

# Applied in order to every official (cvnets) key. Block-internal names first, then prefixes.
_KEY_RULES = (
    (r"\.block\.exp_1x1\.block\.conv\.", ".conv_pw."), (r"\.block\.exp_1x1\.block\.norm\.", ".bn1."),
    (r"\.block\.conv_3x3\.block\.conv\.", ".conv_dw."), (r"\.block\.conv_3x3\.block\.norm\.", ".bn2."),
    (r"\.block\.red_1x1\.block\.conv\.", ".conv_pwl."), (r"\.block\.red_1x1\.block\.norm\.", ".bn3."),
    (r"\.global_rep\.(\d+)\.(weight|bias)$", r".norm.\2"),            # final GroupNorm of a stage
    (r"\.global_rep\.(\d+)\.mlp\.", r".blocks.\1.channel_mixer."),
    (r"\.global_rep\.(\d+)\.filter\.", r".blocks.\1.token_mixer."),
    (r"\.global_rep\.(\d+)\.", r".blocks.\1."),                       # norm1 / norm2
    (r"\.fusion\.", ".conv_fusion."),
    (r"\.block\.conv\.", ".conv."), (r"\.block\.norm\.", ".bn."),      # cvnets ConvLayer
    (r"^conv_1\.", "stem."), (r"^conv_1x1_exp\.", "final_conv."), (r"^classifier\.fc\.", "head.fc."),
)


def _map_official_key(key: str) -> str:
    key = re.sub(r"^layer_(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", key)
    for pattern, repl in _KEY_RULES:
        key = re.sub(pattern, repl, key)
    return key


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an official AFFNet (cvnets) state dict onto :class:`AFFNet`; vizoo's own keys pass.

    The official checkpoints (OneDrive links in the TokenMixers README, e.g.
    ``checkpoint_ema_score_73.0238.pt`` for AFFNet-ET) hold a plain state dict of tensors: load one
    with ``create_model("affnet_et", pretrained="/path/to/checkpoint_ema_....pt")``.
    """
    if "conv_1.block.conv.weight" not in state_dict:
        return state_dict
    return {_map_official_key(k): v for k, v in state_dict.items()}


# --- builders and configs -----------------------------------------------------------------------

_VARIANTS = {
    # official modes xx_small / x_small / small (config/affnet.py)
    "affnet_et": dict(widths=(32, 48, 64, 104, 144), depths=(2, 4, 3), mv2_exp=2.0),
    "affnet_t": dict(widths=(32, 48, 96, 160, 192), depths=(2, 4, 3), mv2_exp=4.0),
    "affnet": dict(widths=(32, 64, 128, 256, 320), depths=(2, 4, 3), mv2_exp=4.0),
}


def _create_affnet(variant: str, **kwargs) -> AFFNet:
    return AFFNet(**{**_VARIANTS[variant], **kwargs})


_PAPER = "Adaptive Frequency Filters As Efficient Global Token Mixers (ICCV 2023)"
_PAPER_URL = "https://arxiv.org/abs/2307.14008"
_WEIGHTS_NOTE = ("Official ImageNet-1k EMA weights are on OneDrive (links in the microsoft/TokenMixers "
                 "README, folder 'Adaptive Frequency Filters'), which cannot be fetched automatically: "
                 "download the checkpoint by hand and pass create_model(name, pretrained='/path/to/"
                 "checkpoint_ema_*.pt'); the official keys are mapped by checkpoint_filter_fn. "
                 "Inputs: RGB in [0, 1], no mean/std; eval resize 288 -> center crop 256, bilinear.")
_MACS_NOTE = ("torch.utils.flop_counter counts convs, linears and the AFF mask MLP but not the "
              "FFTs (rfft2/irfft2); the official profiler adds 5*N*floor(ln N)*C per FFT. The "
              "paper's 'FLOPs' are cvnets MACs.")


def _cfg(**kwargs) -> PretrainedCfg:
    return PretrainedCfg(
        source="", input_size=(3, 256, 256), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        interpolation="bilinear", crop_pct=256 / 288, classifier="head.fc", first_conv="stem.conv",
        license="mit", paper=_PAPER, paper_url=_PAPER_URL, filter_fn=checkpoint_filter_fn,
        notes=_WEIGHTS_NOTE, macs_note=_MACS_NOTE, **kwargs)


register_pretrained_cfgs({
    "affnet_et.in1k": _cfg(paper_metrics=dict(params_m=1.4, macs_g=0.4, top1=73.0)),
    "affnet_t.in1k": _cfg(paper_metrics=dict(params_m=2.6, macs_g=0.8, top1=77.0)),
    "affnet.in1k": _cfg(paper_metrics=dict(params_m=5.5, macs_g=1.5, top1=79.8)),
})


# --- entry points -------------------------------------------------------------------------------

#: ``features_only`` through timm's FeatureListNet (stages.N flattened to stages_N; see vizoo.features).
_FEATURES = dict(flatten_sequential=True)


@register_model(feature_cfg=_FEATURES)
def affnet_et(**kwargs) -> AFFNet:
    """AFFNet-ET (official mode xx_small): 1.44M params, 73.0% top-1 at 256 px."""
    return _create_affnet("affnet_et", **kwargs)


@register_model(feature_cfg=_FEATURES)
def affnet_t(**kwargs) -> AFFNet:
    """AFFNet-T (official mode x_small): 2.65M params, 77.0% top-1 at 256 px."""
    return _create_affnet("affnet_t", **kwargs)


@register_model(feature_cfg=_FEATURES)
def affnet(**kwargs) -> AFFNet:
    """AFFNet (official mode small): 5.57M params, 79.8% top-1 at 256 px."""
    return _create_affnet("affnet", **kwargs)

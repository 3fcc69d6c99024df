"""StageInteractor: a query-based detector whose decoder stages interact.

Teng et al., "StageInteractor: Query-based Object Detector with Cross-stage Interaction",
ICCV 2023 (https://arxiv.org/abs/2304.04978); official code (mmdet):
https://github.com/MCG-NJU/StageInteractor.

Pipeline: backbone (any timm or vizoo model built with ``features_only=True``) -> ``ChannelMapping``
(a 1x1 conv per level to D channels and one GroupNorm shared by all levels; no top-down path) ->
N object queries (``LayerNorm(Embedding(N, D))``, every box starts as the whole image, kept as
``xyzr``) -> L decoder stages, each:

1. self-attention among queries with the box embedding added and a per-head ``tau * log(IoF)``
   logit bias (:class:`vizoo.layers.box_attention.BoxSelfAttention`), then LayerNorm;
2. 3-D sub-box sampling of the feature levels (:class:`vizoo.layers.query_sampling.SubBoxSampler`);
3. adaptive mixing; from stage ``reuse_from`` on, with the channel/spatial filters of earlier
   stages reused through lightweight adapters (:class:`vizoo.layers.adaptive_mixing.CascadeAdaptiveMixing`);
4. FFN + LayerNorm; classification (sigmoid) and box heads; the box is refined and detached
   before the next stage (queries and the filter bank are not detached).

``reuse=False`` gives the AdaMixer-style baseline decoder. The cross-stage label assigner (CSLA)
is part of the training loss, not of this module: ``csla`` / ``csla_iou`` are only stored for it.

Outputs: ``forward`` gives per-stage ``{"logits": [B, N, C], "boxes": [B, N, 4] xyxy pixels}``;
``predict`` the last stage's top-N (score, label, box) per image without NMS, as the paper
evaluates; ``forward_export`` the last stage's sigmoid scores and boxes (what exporters convert).
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.adaptive_mixing import CascadeAdaptiveMixing
from ..layers.box_attention import BoxSelfAttention
from ..layers.box_ops import refine_xyzr, whole_image_xyzr, xyzr_position_embedding, xyzr_to_xyxy
from ..layers.query_sampling import SubBoxSampler
from ..registry import IMAGENET_MEAN, IMAGENET_STD, PretrainedCfg, register_model, register_pretrained_cfgs

__all__ = ["StageInteractor", "StageInteractorStage", "ChannelMapping", "stageinteractor_filter_fn",
           "create_feature_backbone"]


# --- backbone and neck --------------------------------------------------------------------------

def create_feature_backbone(name: str, out_indices: Sequence[int], pretrained: bool = False,
                            in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A multi-level feature extractor: ``timm:<name>`` through timm, other names through vizoo,
    both with ``features_only=True``."""
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[len("timm:"):], features_only=True, out_indices=tuple(out_indices),
                                 pretrained=pretrained, in_chans=in_chans, **kwargs)
    from ..factory import create_model

    return create_model(name, pretrained=pretrained, in_chans=in_chans, features_only=True,
                        out_indices=tuple(out_indices), **kwargs)


def _feature_channels_and_strides(backbone: nn.Module, in_chans: int) -> tuple[list[int], list[int]]:
    info = getattr(backbone, "feature_info", None)
    if info is not None and hasattr(info, "channels") and hasattr(info, "reduction"):
        return list(info.channels()), list(info.reduction())
    # no timm-style feature_info: probe with a dummy image
    param = next(backbone.parameters())
    size = 256
    with torch.no_grad():
        feats = backbone(torch.zeros(1, in_chans, size, size, device=param.device, dtype=param.dtype))
    return [f.shape[1] for f in feats], [size // f.shape[-1] for f in feats]


class ChannelMapping(nn.Module):
    """Per level a 1x1 conv to ``dim`` channels, then one GroupNorm shared by all levels."""

    def __init__(self, in_channels: Sequence[int], dim: int, num_groups: int = 32):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        self.norm = nn.GroupNorm(num_groups, dim)
        for conv in self.lateral:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.norm(conv(f)) for conv, f in zip(self.lateral, feats)]


# --- one decoder stage --------------------------------------------------------------------------

class StageInteractorStage(nn.Module):
    """Self-attention -> 3-D sampling -> adaptive mixing -> FFN -> class / box heads."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, groups: int, num_sub_boxes: int,
                 points_per_sub_box: int, out_patterns: int, num_classes: int, num_reused: int = 0,
                 prior_prob: float = 0.01):
        super().__init__()
        self.attn = BoxSelfAttention(dim, num_heads)
        self.attn_norm = nn.LayerNorm(dim)
        self.sampler = SubBoxSampler(dim, groups, num_sub_boxes, points_per_sub_box)
        self.mixing = CascadeAdaptiveMixing(dim, groups, num_sub_boxes, points_per_sub_box,
                                            out_patterns, num_reused=num_reused)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.cls_branch = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True))
        self.cls_head = nn.Linear(dim, num_classes)
        self.reg_branch = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.ReLU(inplace=True))
        self.reg_head = nn.Linear(dim, 4)
        with torch.no_grad():
            for lin in (self.ffn[0], self.ffn[2], self.cls_branch[0], self.reg_branch[0], self.cls_head):
                nn.init.xavier_uniform_(lin.weight)      # biases keep PyTorch's default init
            nn.init.constant_(self.cls_head.bias, -math.log((1 - prior_prob) / prior_prob))
            nn.init.zeros_(self.reg_head.weight)
            nn.init.zeros_(self.reg_head.bias)

    def forward(self, q: torch.Tensor, xyzr: torch.Tensor, feats: Sequence[torch.Tensor],
                strides: Sequence[int], bank=None, with_logits: bool = True):
        """Returns (queries, logits or None, box delta (dx, dy, dz, dr), this stage's filter entry)."""
        x = q + xyzr_position_embedding(xyzr, q.shape[-1])
        q = self.attn_norm(self.attn(x, xyzr_to_xyxy(xyzr)))
        v = self.sampler(feats, strides, q, xyzr)
        q, entry = self.mixing(v, q, bank)
        q = self.ffn_norm(q + self.ffn(q))
        logits = self.cls_head(self.cls_branch(q)) if with_logits else None
        delta = self.reg_head(self.reg_branch(q))
        return q, logits, delta, entry


# --- the detector -------------------------------------------------------------------------------

class StageInteractor(nn.Module):
    """StageInteractor detector (see the module docstring).

    Args:
        backbone: ``"timm:<name>"`` or a vizoo model name (built with ``features_only=True``), or
            a ready module returning a list of feature maps.
        out_indices: backbone feature levels to use.
        points: (P, K) sub-boxes per group and points per sub-box of stage 0.
        points_later: (P, K) of stages 1..L-1.
        out_patterns: P_out, spatial-mixing output patterns.
        reuse / reuse_from: cross-stage filter reuse, from stage ``reuse_from`` on.
        csla / csla_iou: stored for the loss (cross-stage label assignment, IoU threshold).
        neck_groups: GroupNorm groups of the neck.
        frozen_stages: freeze the stem and this many backbone levels (timm feature backbones).
        norm_eval: keep the backbone's BatchNorms in eval mode while training.
        detach_boxes: detach boxes between stages (the paper's setting).
    """

    #: the exporter verifies forward_export (scores, boxes) with detection-aware parity
    export_task = "detection"

    def __init__(self, backbone: str | nn.Module = "timm:resnet50", num_classes: int = 80,
                 num_queries: int = 100, num_stages: int = 6, dim: int = 256, groups: int = 4,
                 points: tuple[int, int] = (8, 8), points_later: tuple[int, int] = (4, 8),
                 out_patterns: int = 128, ffn_dim: int = 2048, num_heads: int = 8,
                 reuse: bool = True, reuse_from: int = 2, csla: bool = True, csla_iou: float = 0.5,
                 out_indices: Sequence[int] = (1, 2, 3, 4), neck_groups: int = 32,
                 backbone_pretrained: bool = False, backbone_kwargs: dict | None = None,
                 frozen_stages: int = 0, norm_eval: bool = False, detach_boxes: bool = True,
                 in_chans: int = 3):
        super().__init__()
        if reuse and reuse_from < 1:
            raise ValueError(f"reuse_from must be >= 1 (a stage reuses earlier stages), got {reuse_from}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_stages = num_stages
        self.dim = dim
        self.reuse = reuse
        self.reuse_from = reuse_from
        self.csla = csla
        self.csla_iou = csla_iou
        self.detach_boxes = detach_boxes
        self.norm_eval = norm_eval

        if isinstance(backbone, str):
            backbone = create_feature_backbone(backbone, out_indices, pretrained=backbone_pretrained,
                                               in_chans=in_chans, **(backbone_kwargs or {}))
        self.backbone = backbone
        channels, strides = _feature_channels_and_strides(backbone, in_chans)
        self.strides = [int(s) for s in strides]
        self.size_divisor = max(self.strides)
        self.neck = ChannelMapping(channels, dim, neck_groups)
        self.query_embed = nn.Embedding(num_queries, dim)
        nn.init.normal_(self.query_embed.weight, 0.0, 1.0)

        self.stage_points = [tuple(points)] + [tuple(points_later)] * (num_stages - 1)
        self.stages = nn.ModuleList()
        for s, (P, K) in enumerate(self.stage_points):
            num_reused = s - reuse_from + 1 if reuse and s >= reuse_from else 0
            if num_reused:
                P_prev, K_prev = self.stage_points[s - 1]
                if P_prev < P or K_prev != K:
                    raise ValueError(f"stage {s} cannot reuse stage {s - 1}'s spatial filter: it needs "
                                     f"at least P={P} sub-boxes of K={K} points, stage {s - 1} has "
                                     f"P={P_prev}, K={K_prev}")
            self.stages.append(StageInteractorStage(dim, num_heads, ffn_dim, groups, P, K, out_patterns,
                                                    num_classes, num_reused=num_reused))
        self._freeze_backbone(frozen_stages)
        self.train(self.training)      # frozen parts / BatchNorms into eval mode from the start

    # --- backbone training behaviour ---

    def _freeze_backbone(self, frozen_stages: int) -> None:
        self.frozen_modules: list[str] = []
        if frozen_stages <= 0:
            return
        info = getattr(self.backbone, "feature_info", None)
        if info is None or not hasattr(info, "module_name"):
            raise ValueError("frozen_stages needs a timm-style backbone with feature_info (a vizoo or "
                             "timm model built with features_only=True); pass frozen_stages=0 otherwise")
        stop = info.module_name()[frozen_stages - 1].replace(".", "_")
        children = [n for n, _ in self.backbone.named_children()]
        if stop not in children:
            raise ValueError(f"frozen_stages={frozen_stages}: no backbone child named {stop!r} (children: "
                             f"{children}); use the default feature wrapper or frozen_stages=0")
        self.frozen_modules = children[: children.index(stop) + 1]
        for name in self.frozen_modules:
            for p in getattr(self.backbone, name).parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "StageInteractor":
        super().train(mode)
        if mode:
            for name in self.frozen_modules:
                getattr(self.backbone, name).eval()
            if self.norm_eval:
                for m in self.backbone.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    # --- forward ---

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        H, W = images.shape[-2:]
        d = self.size_divisor
        pad_h, pad_w = (-H) % d, (-W) % d
        if pad_h or pad_w:   # bottom/right zero padding, so features align with pixel coordinates
            images = F.pad(images, (0, pad_w, 0, pad_h))
        return self.neck(self.backbone(images))

    def _decode(self, images: torch.Tensor, img_sizes: torch.Tensor | None, all_logits: bool):
        B, _, H, W = images.shape
        feats = self._features(images)
        if img_sizes is None:  # the tensor's size: the boxes are constants (no ops in an exported graph)
            whole = [0.5 * W, 0.5 * H, 0.5 * math.log2(W * H), math.log2(H / W)]
            xyzr = torch.tensor([[whole] * self.num_queries] * B, dtype=feats[0].dtype, device=images.device)
        else:
            xyzr = whole_image_xyzr(img_sizes, self.num_queries).to(feats[0].dtype)
        q = F.layer_norm(self.query_embed.weight, (self.dim,))
        # batch 1 (an exported file) needs no expand: TFLite's BROADCAST_TO would split XNNPACK's graph
        q = q.unsqueeze(0) if B == 1 else q.unsqueeze(0).expand(B, -1, -1)
        bank: list = []
        outs = []
        for s, stage in enumerate(self.stages):
            reused = stage.mixing.num_reused
            with_logits = all_logits or s == len(self.stages) - 1
            q, logits, delta, entry = stage(q, xyzr, feats, self.strides,
                                            bank[-reused:] if reused else None, with_logits)
            new_xyzr = refine_xyzr(xyzr, delta)
            outs.append({"logits": logits, "boxes": xyzr_to_xyxy(new_xyzr)})
            bank = bank + [entry] if reused else [entry]
            xyzr = new_xyzr.detach() if self.detach_boxes else new_xyzr
        return outs

    def forward(self, images: torch.Tensor, img_sizes: torch.Tensor | None = None) -> list[dict]:
        """Per stage ``{"logits": [B, N, C] (pre-sigmoid), "boxes": [B, N, 4] xyxy pixels}``.

        ``img_sizes`` ``[B, 2]`` holds each image's (h, w) before padding (default: the batch's
        H, W); initial boxes cover that area. Padding to a multiple of the largest stride is added
        here (bottom/right)."""
        return self._decode(images, img_sizes, all_logits=True)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, img_sizes: torch.Tensor | None = None) -> list[dict]:
        """Last stage, per image: the N best (query, class) pairs by sigmoid score, no NMS:
        ``{"boxes": [N, 4] xyxy pixels, "scores": [N], "labels": [N] int64}``, sorted by score."""
        last = self._decode(images, img_sizes, all_logits=False)[-1]
        scores = last["logits"].sigmoid().flatten(1)                    # [B, N*C]
        top, idx = scores.topk(self.num_queries, dim=1)
        C = self.num_classes
        results = []
        for b in range(images.shape[0]):
            results.append({"boxes": last["boxes"][b, idx[b] // C], "scores": top[b],
                            "labels": (idx[b] % C).to(torch.int64)})
        return results

    def forward_export(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last stage at the input's fixed size: (sigmoid scores ``[B, N, C]``, xyxy boxes
        ``[B, N, 4]``); top-k and label decoding are left to the application."""
        last = self._decode(images, None, all_logits=False)[-1]
        return last["logits"].sigmoid(), last["boxes"]


# --- official checkpoints -----------------------------------------------------------------------

_STAGE_KEY_MAP = (   # official (mmdet) stage-module prefix -> ours; the trailing dots keep them unambiguous
    ("attention.attn.in_proj_weight", "attn.qkv.weight"),
    ("attention.attn.in_proj_bias", "attn.qkv.bias"),
    ("attention.attn.out_proj.", "attn.proj."),
    ("attention_norm.", "attn_norm."),
    ("iof_tau", "attn.iof_tau"),
    ("ffn.layers.0.0.", "ffn.0."),
    ("ffn.layers.1.", "ffn.2."),
    ("ffn_norm.", "ffn_norm."),
    ("cls_fcs.", "cls_branch."),
    ("fc_cls.", "cls_head."),
    ("reg_fcs.", "reg_branch."),
    ("fc_reg.", "reg_head."),
    ("feat_extractor.gen_one_d.0.", "sampler.sub_box_offsets."),
    ("feat_extractor.gen_double_d.0.", "sampler.point_offsets."),
    ("dynamic_conv.parameter_generator.", "mixing.generator."),
    ("dynamic_conv.mix_bias.", "mixing.mix_bias."),
    ("dynamic_conv.Wv.", "mixing.out_proj."),
    ("dynamic_conv.Wv_layer_norm.", "mixing.out_norm."),
    ("dynamic_conv.subbox_local_list.", "mixing.sub_adapters."),
    ("dynamic_conv.axis_atten_list.", "mixing.axis_adapters."),
    ("dynamic_conv.M_score_list.", "mixing.filter_gates."),
    ("dynamic_conv.M_score_list_mix_bias.", "mixing.reuse_bias."),
    ("dynamic_conv.S_score_list.", "mixing.pattern_gate."),
    ("dynamic_conv.S_score_list2.", "mixing.point_gate."),
)
# Dropped: a SyncBatchNorm used as a constant, a softmax over a singleton dim (always 1), and the
# constant whole-image proposal buffer.
_STAGE_DROP = ("iou_snyc_statistics.", "dynamic_conv.subbox_score_list.")
_TOP_KEY_MAP = (
    ("neck.gn_out.", "neck.norm."),
    ("rpn_head.init_content_features.", "query_embed."),
)
_TOP_DROP = ("rpn_head.init_proposal_bboxes",)


def _map_stage_key(rest: str) -> str | None:
    if rest.startswith(_STAGE_DROP):
        return None
    for old, new in _STAGE_KEY_MAP:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest     # unknown: left for the strict loader to report


def stageinteractor_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict:
    """Map an official StageInteractor (mmdet) checkpoint onto :class:`StageInteractor`.

    Accepts the mmcv checkpoint dict (``{'meta', 'state_dict', 'optimizer'}``) or its
    ``state_dict``. ``backbone.*`` keys pass unchanged (mmdet's ResNet uses torchvision's names, as
    timm's ResNet does); vizoo's own checkpoints pass unchanged.
    """
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not any(k.startswith("roi_head.bbox_head.") for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_TOP_DROP):
            continue
        m = re.match(r"roi_head\.bbox_head\.(\d+)\.(.*)$", key)
        if m:
            rest = _map_stage_key(m.group(2))
            if rest is not None:
                out[f"stages.{m.group(1)}.{rest}"] = value
            continue
        m = re.match(r"neck\.lateral_convs\.(\d+)\.conv\.(.*)$", key)
        if m:
            out[f"neck.lateral.{m.group(1)}.{m.group(2)}"] = value
            continue
        for old, new in _TOP_KEY_MAP:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


# --- configs and entry points -------------------------------------------------------------------

_PAPER = "StageInteractor: Query-based Object Detector with Cross-stage Interaction (ICCV 2023)"
_PAPER_URL = "https://arxiv.org/abs/2304.04978"
_R50_NOTES = (
    "COCO val, R50, 100 queries, 12 epochs, single scale 1333x800: 44.8 AP (APs/APm/APl 27.5/48.0/"
    "61.3; +2.2 over the AdaMixer-style baseline, i.e. reuse=False, csla=False). With 300 queries, "
    "36 epochs, crop + multi-scale training: R50 48.9, R101 49.9, ResNeXt-101-DCN 51.3, Swin-S 52.7 "
    "AP (README / ICCV version; the arXiv v1 abstract gives 51.1 / 52.2). Official checkpoints are on "
    "Google Drive (MCG-NJU/StageInteractor README) and cannot be fetched automatically: download one "
    "and pass create_model(name, pretrained='/path/to/epoch_12.pth'); stageinteractor_filter_fn maps "
    "the mmdet keys. Training recipe: AdamW lr 2.5e-5, wd 1e-4, grad clip 1.0, batch 16, steps at "
    "epochs 8 and 11, backbone stem + first stage frozen, BN in eval mode.")
_TINY_NOTES = (
    "Scaled-down configuration for CPU experiments on 128x128 procedural-shape data (5 classes): "
    "random-init ResNet-10-T at widths 16/32/64/128, D=64, 4 stages (reuse at stages 2 and 3), "
    "24 queries. No weights. Baselines: reuse=False and/or csla=False.")


def _cfg(**kwargs) -> PretrainedCfg:
    return PretrainedCfg(source="", mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear",
                         crop_pct=1.0, classifier="", license="apache-2.0", paper=_PAPER,
                         paper_url=_PAPER_URL, filter_fn=stageinteractor_filter_fn,
                         export_formats=("coreml", "tflite"), task="detection", **kwargs)


register_pretrained_cfgs({
    "stageinteractor_r50_1x": _cfg(
        input_size=(3, 800, 1333), test_input_size=(3, 128, 128), num_classes=80,
        first_conv="backbone.conv1", paper_metrics={"box_ap": 44.8}, notes=_R50_NOTES),
    "stageinteractor_tiny": _cfg(
        input_size=(3, 128, 128), num_classes=5, first_conv="backbone.conv1.0", notes=_TINY_NOTES),
})


@register_model
def stageinteractor_r50_1x(**kwargs) -> StageInteractor:
    """StageInteractor R50, 100 queries, 6 stages (the paper's 44.8 AP 1x setting).

    The backbone is timm's ``resnet50.tv_in1k`` (torchvision's ImageNet weights, as the official
    config); pass ``backbone_pretrained=True`` to load them. Stem + first stage frozen, BN in eval mode.
    """
    args = dict(backbone="timm:resnet50.tv_in1k", num_classes=80, num_queries=100, num_stages=6, dim=256,
                groups=4, points=(8, 8), points_later=(4, 8), out_patterns=128, ffn_dim=2048,
                num_heads=8, neck_groups=32, frozen_stages=1, norm_eval=True)
    return StageInteractor(**{**args, **kwargs})


@register_model
def stageinteractor_tiny(**kwargs) -> StageInteractor:
    """Tiny CPU StageInteractor: every mechanism, D=64, 4 stages, 24 queries, 5 classes, 128 px."""
    args = dict(backbone="timm:resnet10t", backbone_kwargs={"channels": (16, 32, 64, 128), "stem_width": 16},
                num_classes=5, num_queries=24, num_stages=4, dim=64, groups=4, points=(4, 4),
                points_later=(2, 4), out_patterns=32, ffn_dim=256, num_heads=4, neck_groups=8)
    return StageInteractor(**{**args, **kwargs})

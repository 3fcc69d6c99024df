"""EViT: DeiT/ViT with token reorganisation (keep attentive tokens, fuse the inattentive ones).

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022 (https://arxiv.org/abs/2202.07800); official code
https://github.com/youweiliang/evit.

Built on timm's ``VisionTransformer``/``Block``/``Attention``: EViT adds no parameters, so timm
DeiT/ViT checkpoints load unchanged (and official EViT checkpoints after unwrapping ``'model'``).
Blocks in ``drop_loc`` (default 3, 6, 9) reorganise tokens between attention and MLP
(:class:`vizoo.layers.token_reorg.TokenReorganizer`). Those blocks compute the class token's
attention row separately, so every block keeps the fused attention kernel (SDPA).

The keep rate can change at run time (``model.set_keep_rate(r)``, ``model(x, keep_rate=r)``) and
follows the paper's schedule during training through ``model.on_train_step(epoch_progress)``,
which the engine calls before each optimisation step.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn

from ..layers.token_reorg import EXPORT_FORMS, TokenReorganizer, class_attention, keep_count
from ..registry import PretrainedCfg, register_features, register_model, register_pretrained_cfgs

__all__ = ["EViT", "EViTBlock", "EViTAttention", "keep_rate_schedule", "convert_official_checkpoint"]

DEFAULT_DROP_LOC = (3, 6, 9)


# --- private blocks -----------------------------------------------------------------------------

class EViTAttention(Attention):
    """timm ``Attention`` that can also return the head-averaged class attention (B, n).

    With the fused kernel the attention matrix never exists, so the class row is recomputed from
    the class query and all keys (:func:`class_attention`); it equals row 0 of the full matrix.
    With attention dropout active in training, the explicit path is taken so the class attention
    is the dropped-out one, as in the official code.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                return_cls_attn: bool = False):
        if not return_cls_attn:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal or self.gate is not None:
            raise NotImplementedError("EViT token reorganisation takes no attention mask or gate")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        explicit = not self.fused_attn or (self.training and self.attn_drop.p > 0)
        if explicit:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            attn = self.attn_drop(attn)
            cls_attn = attn[:, :, 0, 1:].mean(dim=1)
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
            cls_attn = class_attention(q[:, :, :1], k, self.scale)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.proj_drop(self.proj(x))
        return x, cls_attn


class EViTBlock(Block):
    """timm ``Block``; when it is a reorganising block with a rate < 1, tokens are selected (and
    the rest fused) between attention and MLP, so the MLP already runs on the reduced set."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("attn_layer") in (None, Attention, "", "attn"):  # timm's default attention
            kwargs["attn_layer"] = EViTAttention
        super().__init__(*args, **kwargs)
        self.reorganizes = False  # block index in drop_loc
        self.base_keep_rate = 1.0  # configured rate (what a fresh model / checkpoint uses)
        self.keep_rate = 1.0  # current rate (run-time / schedule)
        self.reorg = TokenReorganizer(fuse_token=False)

    def extra_repr(self) -> str:
        return f"reorganizes={self.reorganizes}, keep_rate={self.keep_rate}" if self.reorganizes else ""

    def num_kept(self, num_tokens: int, keep_rate: float | None = None, keep_tokens: int | None = None) -> int:
        """Image tokens this block keeps out of ``num_tokens`` (``num_tokens`` = no reduction)."""
        if keep_tokens is not None:
            return min(int(keep_tokens), num_tokens)
        if not self.reorganizes:
            return num_tokens
        rate = self.keep_rate if keep_rate is None else keep_rate
        return num_tokens if rate >= 1 else keep_count(rate, num_tokens)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.forward_reorg(x)[0]

    def forward_reorg(self, x: torch.Tensor, keep_rate: float | None = None,
                      keep_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new tokens and the kept indices into this block's image tokens (or None)."""
        n = x.shape[1] - 1
        keep = self.num_kept(n, keep_rate, keep_tokens)
        if keep >= n:  # a plain ViT block: no token removed, no fused token
            return super().forward(x), None
        y, cls_attn = self.attn(self.norm1(x), return_cls_attn=True)
        x = x + self.drop_path1(self.ls1(y))
        x, idx = self.reorg(x, cls_attn, keep)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, idx


def keep_rate_schedule(epoch_progress: float, target: float, shrink_start_epoch: float = 10,
                       shrink_epochs: float = 100) -> float:
    """The paper's keep-rate schedule (official ``adjust_keep_rate``, per iteration).

    1 before ``shrink_start_epoch``; then a cosine from 1 down to ``target`` over
    ``shrink_epochs``; ``target`` afterwards (immediately when ``shrink_epochs`` is 0).
    """
    t = float(epoch_progress) - shrink_start_epoch
    if t < 0:
        return 1.0
    if t >= shrink_epochs:
        return float(target)
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * t / shrink_epochs))


# --- model --------------------------------------------------------------------------------------

class EViT(VisionTransformer):
    """Vision Transformer whose ``drop_loc`` blocks keep ``ceil(keep_rate * n)`` image tokens.

    Args:
        keep_rate: rate at every ``drop_loc`` block, or one rate per block (then ``drop_loc`` is
            the blocks whose rate is < 1).
        drop_loc: indices (0-based) of the reorganising blocks.
        fuse_token: fuse the inattentive tokens into one (True) or drop them (False).
        shrink_start_epoch / shrink_epochs: keep-rate schedule during training
            (:func:`keep_rate_schedule`); ``shrink_epochs=0`` uses the target rate from the start.
        export_form: token-selection form used inside :func:`vizoo.layers.export_mode.export_mode`.
        **kwargs: timm ``VisionTransformer`` arguments (img_size, embed_dim, depth, ...).
    """

    def __init__(self, keep_rate: float | Sequence[float] = 0.7, drop_loc: Sequence[int] = DEFAULT_DROP_LOC,
                 fuse_token: bool = True, shrink_start_epoch: float = 10, shrink_epochs: float = 100,
                 export_form: str = "rank_matmul", **kwargs) -> None:
        kwargs.setdefault("block_fn", EViTBlock)
        kwargs.setdefault("attn_layer", EViTAttention)
        if not issubclass(kwargs["block_fn"], EViTBlock):
            raise ValueError("EViT needs block_fn to be EViTBlock (or a subclass)")
        if kwargs.get("reg_tokens", 0) or not kwargs.get("class_token", True) \
                or kwargs.get("global_pool", "token") != "token":
            raise ValueError("EViT ranks tokens by the class token's attention: it needs class_token=True, "
                             "no register tokens and global_pool='token'")
        super().__init__(**kwargs)
        depth = len(self.blocks)
        if isinstance(keep_rate, (list, tuple)):
            if len(keep_rate) != depth:
                raise ValueError(f"a per-block keep_rate needs {depth} entries, got {len(keep_rate)}")
            rates = [float(r) for r in keep_rate]
            drop_loc = tuple(i for i, r in enumerate(rates) if r < 1)
        else:
            drop_loc = tuple(int(i) for i in drop_loc)
            rates = [float(keep_rate) if i in drop_loc else 1.0 for i in range(depth)]
        bad = [i for i in drop_loc if not 0 <= i < depth]
        if bad:
            raise ValueError(f"drop_loc {bad} outside the {depth} blocks")
        for r in rates:
            keep_count(r, 1)  # validates 0 < r <= 1
        if export_form not in EXPORT_FORMS:
            raise ValueError(f"export_form must be one of {EXPORT_FORMS}, got {export_form!r}")
        self.drop_loc = drop_loc
        self.fuse_token = bool(fuse_token)
        self.shrink_start_epoch = float(shrink_start_epoch)
        self.shrink_epochs = float(shrink_epochs)
        for i, blk in enumerate(self.blocks):
            blk.reorganizes = i in drop_loc
            blk.base_keep_rate = blk.keep_rate = rates[i]
            blk.reorg = TokenReorganizer(fuse_token=self.fuse_token, export_form=export_form)

    # --- keep rate at run time
    @property
    def reorg_blocks(self) -> list[EViTBlock]:
        return [b for b in self.blocks if b.reorganizes]

    @property
    def keep_rate(self) -> float:
        """Current rate of the reorganising blocks (the first one's, when they differ)."""
        blocks = self.reorg_blocks
        return blocks[0].keep_rate if blocks else 1.0

    def set_keep_rate(self, keep_rate: float | None = None) -> None:
        """Set the rate of every reorganising block; ``None`` restores the configured rates."""
        for blk in self.reorg_blocks:
            if keep_rate is None:
                blk.keep_rate = blk.base_keep_rate
            else:
                keep_count(keep_rate, 1)
                blk.keep_rate = float(keep_rate)

    def on_train_step(self, epoch_progress: float) -> None:
        """Engine hook (before each optimisation step): each reorganising block follows
        :func:`keep_rate_schedule` from 1 to its configured rate. Evaluation during training
        therefore uses the current scheduled rate, as the official code does."""
        for blk in self.reorg_blocks:
            blk.keep_rate = keep_rate_schedule(epoch_progress, blk.base_keep_rate,
                                               self.shrink_start_epoch, self.shrink_epochs)

    def token_counts(self, keep_rate: float | Sequence[float] | None = None) -> list[int]:
        """Image tokens after each block for this model's input size (the paper's §3.2 table)."""
        n = self.patch_embed.num_patches
        rates = self._per_block(keep_rate, None)[0]
        counts = []
        for blk, rate in zip(self.blocks, rates):
            keep = blk.num_kept(n, rate)
            if keep < n:
                n = keep + int(self.fuse_token)
            counts.append(n)
        return counts

    def _per_block(self, keep_rate, keep_tokens):
        depth = len(self.blocks)
        rates = list(keep_rate) if isinstance(keep_rate, (list, tuple)) else [keep_rate] * depth
        tokens = list(keep_tokens) if isinstance(keep_tokens, (list, tuple)) else [keep_tokens] * depth
        if len(rates) != depth or len(tokens) != depth:
            raise ValueError(f"per-block keep_rate / keep_tokens need {depth} entries")
        return rates, tokens

    # --- forward
    def forward_features(self, x: torch.Tensor, keep_rate: float | Sequence[float] | None = None,
                         keep_tokens: Sequence[int | None] | None = None,
                         return_kept: bool = False):
        """Tokens after the final norm. ``keep_rate`` overrides the current rate at the
        reorganising blocks (a scalar, or one per block); ``keep_tokens`` gives explicit kept
        counts per block (``None`` entries use the rate). With ``return_kept`` also returns, per
        block that reduced tokens, the kept indices into that block's image tokens."""
        rates, tokens = self._per_block(keep_rate, keep_tokens)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        kept = []
        for blk, rate, n_keep in zip(self.blocks, rates, tokens):
            x, idx = blk.forward_reorg(x, rate, n_keep)
            if idx is not None:
                kept.append(idx)
        x = self.norm(x)
        return (x, kept) if return_kept else x

    def forward(self, x: torch.Tensor, keep_rate: float | Sequence[float] | None = None,
                keep_tokens: Sequence[int | None] | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, keep_rate, keep_tokens))


# --- checkpoints --------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict, model: EViT) -> dict:
    """Official EViT / DeiT / timm ViT checkpoints -> this model (timm's ViT filter: unwraps
    ``'model'``, reshapes old linear patch embeddings, resamples ``pos_embed`` for the
    higher-resolution variants). The resampling is bicubic without antialiasing, as the official
    code's ``F.interpolate``; antialiased bicubic uses another kernel (a = -0.5) and differs."""
    state_dict = {k: v for k, v in state_dict.items() if k not in ("dist_token", "head_dist.weight",
                                                                     "head_dist.bias")}
    return _vit_checkpoint_filter_fn(state_dict, model, interpolation="bicubic", antialias=False)


def convert_official_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, key: str = "model") -> Path:
    """Write the ``key`` weights of an official EViT/DeiT training checkpoint as safetensors.

    Checkpoints saved by the official ``main.py`` also pickle an ``argparse.Namespace``, which
    ``torch.load(weights_only=True)`` refuses. This allows exactly that one class (and still no
    code execution), takes ``'model'`` (or ``'model_ema'``), and saves tensors only.
    """
    from safetensors.torch import save_file

    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and key in obj:
        obj = obj[key]
    elif isinstance(obj, dict) and key != "model":
        raise KeyError(f"{src} has no {key!r} entry (keys: {sorted(obj)[:10]})")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{src}: no state dict found under {key!r}")
    dst = Path(dst).with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in obj.items()}, str(dst))
    return dst


# --- builders -----------------------------------------------------------------------------------

def _create_evit(**kwargs) -> EViT:
    kwargs.setdefault("drop_loc", DEFAULT_DROP_LOC)
    return EViT(**kwargs)


def _rate_tag(rate: float, fuse: bool) -> str:
    return f"r{rate:.1f}".replace(".", "p") + ("_fuse" if fuse else "")


_PAPER = "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations (ICLR 2022)"
_PAPER_URL = "https://arxiv.org/abs/2202.07800"
_DEIT_WEIGHTS = {
    "tiny": "hf-hub:timm/deit_tiny_patch16_224.fb_in1k",
    "small": "hf-hub:timm/deit_small_patch16_224.fb_in1k",
    "base": "hf-hub:timm/deit_base_patch16_224.fb_in1k",
}
_EVIT_DRIVE = "https://github.com/youweiliang/evit#model-zoo"
_WEIGHTS_NOTE = (
    "pretrained=True loads the DeiT ImageNet-1k weights EViT is fine-tuned from (configs/evit/evit_"
    "deit_small_r0p7_fuse_finetune.yaml; EViT adds no parameters). Paper throughput: img/s, GPU, "
    "batch 64. Official EViT-DeiT-S checkpoints are on "
    f"Google Drive ({_EVIT_DRIVE}): download, then pretrained='/path/to/file' (use "
    "vizoo.models.evit.convert_official_checkpoint first if torch refuses its pickled args)."
)

# README model zoo, EViT-DeiT-S @224 (throughput: img/s on the paper's GPU, batch 64, fp32).
_DEIT_S_ZOO = {
    (0.9, True): (79.8, 95.0, 4.0, 3197), (0.8, True): (79.8, 94.9, 3.5, 3619),
    (0.7, True): (79.5, 94.8, 3.0, 4385), (0.6, True): (78.9, 94.5, 2.6, 4722),
    (0.5, True): (78.5, 94.2, 2.3, 5408), (0.9, False): (79.9, 94.9, 4.0, 3201),
    (0.8, False): (79.7, 94.8, 3.5, 3772), (0.7, False): (79.4, 94.7, 3.0, 4249),
    (0.6, False): (79.1, 94.5, 2.6, 4967), (0.5, False): (78.4, 94.1, 2.3, 5325),
}
_RATES = (0.7, 0.9, 0.8, 0.6, 0.5)  # first = default tag


def _cfg(source: str = "", **kwargs) -> PretrainedCfg:
    kwargs.setdefault("notes", _WEIGHTS_NOTE if source else "")
    return PretrainedCfg(source=source, paper=_PAPER, paper_url=_PAPER_URL, first_conv="patch_embed.proj",
                         classifier="head", filter_fn=checkpoint_filter_fn, **kwargs)


def _tagged_cfgs(arch: str, size: str, input_size: int = 224, rates=_RATES, metrics=None) -> dict:
    cfgs = {}
    for fuse in (True, False):
        for rate in rates:
            cfgs[f"{arch}.{_rate_tag(rate, fuse)}"] = _cfg(
                _DEIT_WEIGHTS[size], input_size=(3, input_size, input_size),
                model_kwargs=dict(keep_rate=rate, fuse_token=fuse),
                paper_metrics=dict((metrics or {}).get((rate, fuse), {})))
    return cfgs


def _deit_s_metrics() -> dict:
    return {k: dict(params_m=22.1, top1=t1, top5=t5, macs_g=macs, throughput=thr)
            for k, (t1, t5, macs, thr) in _DEIT_S_ZOO.items()}


register_pretrained_cfgs({
    **_tagged_cfgs("evit_deit_small_patch16_224", "small", metrics=_deit_s_metrics()),
    # Author, issue #1: EViT/0.7-DeiT-B 81.3% top-1, 59% faster than DeiT-B.
    **_tagged_cfgs("evit_deit_base_patch16_224", "base",
                   metrics={(0.7, True): dict(params_m=86.6, top1=81.3, speedup_vs_deit=1.59)}),
    **_tagged_cfgs("evit_deit_tiny_patch16_224", "tiny"),
    # Higher-resolution DeiT-S at about DeiT-S-224 cost (paper: +1% top-1 at the same MACs); the
    # official code defines them with the DeiT-S-224 weights' pos_embed resampled at load time.
    **_tagged_cfgs("evit_deit_small_patch16_272", "small", 272, rates=(0.7,)),
    **_tagged_cfgs("evit_deit_small_patch16_288", "small", 288, rates=(0.6,)),
    **_tagged_cfgs("evit_deit_small_patch16_304", "small", 304, rates=(0.5,)),
    # Small ViT for the bundled digits (patch 4 at 32 px: 64 tokens), trained from scratch.
    "evit_vit_tiny_patch4_32.r0p7_fuse": _cfg(
        input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_classes=10, crop_pct=1.0,
        model_kwargs=dict(keep_rate=0.7, fuse_token=True),
        notes="no published weights: a from-scratch demo for the bundled digits (`vizoo train`)"),
    "evit_vit_tiny_patch4_32.r0p7": _cfg(
        input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), num_classes=10, crop_pct=1.0,
        model_kwargs=dict(keep_rate=0.7, fuse_token=False)),
})


# --- entry points -------------------------------------------------------------------------------

@register_model
def evit_deit_tiny_patch16_224(**kwargs) -> EViT:
    """EViT on DeiT-Tiny (192 dim, 3 heads), 224 px."""
    return _create_evit(**dict(dict(
        img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs))


@register_model
def evit_deit_small_patch16_224(**kwargs) -> EViT:
    """EViT on DeiT-Small (384 dim, 6 heads), 224 px: the paper's main model."""
    return _create_evit(**dict(dict(
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs))


@register_model
def evit_deit_base_patch16_224(**kwargs) -> EViT:
    """EViT on DeiT-Base (768 dim, 12 heads), 224 px."""
    return _create_evit(**dict(dict(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs))


@register_model
def evit_deit_small_patch16_272(**kwargs) -> EViT:
    """EViT-DeiT-S at 272 px, keep rate 0.7 (official ``deit_small_patch16_272_shrink``)."""
    return _create_evit(**dict(dict(
        img_size=272, patch_size=16, embed_dim=384, depth=12, num_heads=6, keep_rate=0.7), **kwargs))


@register_model
def evit_deit_small_patch16_288(**kwargs) -> EViT:
    """EViT-DeiT-S at 288 px, keep rate 0.6 (official ``deit_small_patch16_288_shrink06``)."""
    return _create_evit(**dict(dict(
        img_size=288, patch_size=16, embed_dim=384, depth=12, num_heads=6, keep_rate=0.6), **kwargs))


@register_model
def evit_deit_small_patch16_304(**kwargs) -> EViT:
    """EViT-DeiT-S at 304 px, keep rate 0.5 (official ``deit_small_patch16_304_shrink05``)."""
    return _create_evit(**dict(dict(
        img_size=304, patch_size=16, embed_dim=384, depth=12, num_heads=6, keep_rate=0.5), **kwargs))


@register_model
def evit_vit_tiny_patch4_32(**kwargs) -> EViT:
    """A small EViT (64 dim, 2 heads, 12 blocks, reorganising at 3/6/9) for 32 px digits."""
    return _create_evit(**dict(dict(
        img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=12, num_heads=2), **kwargs))


# No features_only: from the first reorganising block on, EViT keeps only the attentive tokens (and
# fuses the rest into one), so the later blocks' tokens no longer form a spatial grid.
register_features([n for n in __all__ if n.startswith("evit_")], reason=(
    "EViT keeps only the attentive tokens (fusing the rest) from its first reorganising block on, "
    "so its later blocks have no spatial grid to return as NCHW maps"))

"""EViT token reorganisation: keep the tokens the class token attends to, fuse the rest into one.

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations" (ICLR 2022). Between the attention and the MLP of a reorganising block, the n
image tokens are ranked by the class token's attention (softmax probabilities averaged over
heads); the top ``k = ceil(r * n)`` are kept in descending-attention order and, with fusion, the
others are summed into one token weighted by their class attention (not renormalised), appended
last.

Forms that compute the same tokens:

- eager: ``topk`` + ``gather`` (+ a scatter-masked weighted sum for the fused token);
- ``rank_matmul`` (export default): no topk, gather, scatter, sort or comparison op. Each token's
  rank is counted from pairwise differences with SUB/RELU/CEIL/MINIMUM, the rank-to-slot
  one-hot matrix is built with ABS/RELU, and selection and fusion are batched matmuls. Every op
  runs inside XNNPACK, so a TFLite graph is not split around the selection;
- ``onehot_matmul``: ``topk`` indices turned into a one-hot matrix (EQUAL + CAST), then matmuls;
- ``topk_gather``: one full-length ``topk`` gives the kept set and its complement, both gathered.

All forms are exact rearrangements of the same numbers (one-hot matmuls multiply by 1.0 and add
zeros); only the summation order of the fused token differs. ``benchmarks/evit_throughput.py``
measures the three export forms in TFLite; the fastest is the default ``export_form``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .export_mode import ExportAware

EXPORT_FORMS = ("rank_matmul", "onehot_matmul", "topk_gather")


def keep_count(keep_rate: float, num_tokens: int) -> int:
    """Kept tokens ``ceil(r * n)``, in Python float64 as the official code does.

    In float32, 0.6 * 45 rounds to 27.000002 and the ceiling becomes 28: computing k from a tensor
    would silently change the token counts (and the MACs) of some rates.
    """
    keep_rate = float(keep_rate)
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
    return max(1, math.ceil(keep_rate * int(num_tokens)))


def class_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float,
                    num_prefix_tokens: int = 1) -> torch.Tensor:
    """Class-token attention to the image tokens, averaged over heads: (B, n).

    ``q_cls`` is the class token's query (B, H, 1, d), ``k`` all keys (B, H, N, d). This is row 0
    of ``softmax(Q K^T * scale)`` computed alone, so the rest of the attention may run in a fused
    kernel (SDPA) that never materialises the attention matrix.
    """
    attn = ((q_cls * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, 1, N)
    return attn[:, :, 0, num_prefix_tokens:].mean(dim=1)


def _step(x: torch.Tensor) -> torch.Tensor:
    """Exactly ``[x > 0]`` as 0./1. with ops XNNPACK runs (RELU, CEIL, MINIMUM).

    ``ceil(relu(x))`` is 0 for x <= 0 and a whole number >= 1 for any x > 0 (also a tiny one:
    IEEE subtraction of distinct floats is never 0). ``clamp(x, 0, 1)`` would lower to
    RELU_0_TO_1, which XNNPACK rejects, and comparisons lower to GREATER/SELECT, also outside it.
    """
    return torch.ceil(F.relu(x)).clamp(max=1.0)


class TokenReorganizer(ExportAware, nn.Module):
    """Select the ``keep`` most attended image tokens and optionally fuse the rest (no parameters).

    ``forward(x, cls_attn, keep)`` takes the block's post-attention tokens ``x`` (B, 1 + n, C)
    with the class token first, and the head-averaged class attention ``cls_attn`` (B, n). It
    returns the new sequence ``[cls, kept (descending attention), fused?]`` and the kept indices
    (B, keep) into the n image tokens (eager form only; ``None`` when exporting).
    """

    def __init__(self, fuse_token: bool = False, export_form: str = "rank_matmul") -> None:
        super().__init__()
        if export_form not in EXPORT_FORMS:
            raise ValueError(f"export_form must be one of {EXPORT_FORMS}, got {export_form!r}")
        self.fuse_token = fuse_token
        self.export_form = export_form

    def extra_repr(self) -> str:
        return f"fuse_token={self.fuse_token}, export_form={self.export_form!r}"

    def forward(self, x: torch.Tensor, cls_attn: torch.Tensor,
                keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = x.shape[1] - 1
        if cls_attn.shape != (x.shape[0], n):
            raise ValueError(f"cls_attn must be (B, n) = {(x.shape[0], n)}, got {tuple(cls_attn.shape)}")
        if not 1 <= keep <= n:
            raise ValueError(f"keep must be in [1, {n}], got {keep}")
        cls_tok, tokens = x[:, :1], x[:, 1:]
        form = self.export_form if self.exporting else "eager"
        if form == "eager":
            kept, fused, idx = self._eager(tokens, cls_attn, keep)
        elif form == "rank_matmul":
            kept, fused, idx = self._rank_matmul(tokens, cls_attn, keep)
        elif form == "onehot_matmul":
            kept, fused, idx = self._onehot_matmul(tokens, cls_attn, keep)
        else:
            kept, fused, idx = self._topk_gather(tokens, cls_attn, keep)
        parts = [cls_tok, kept] + ([fused] if self.fuse_token else [])
        return torch.cat(parts, dim=1), idx

    # --- eager: topk + gather; the fused token's weights are the attention with kept ones zeroed.
    def _eager(self, tokens, attn, keep):
        idx = attn.topk(keep, dim=1, largest=True, sorted=True).indices
        kept = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        fused = None
        if self.fuse_token:
            weights = attn.scatter(1, idx, 0.0)
            fused = weights.unsqueeze(1) @ tokens
        return kept, fused, idx

    # --- rank_matmul: ranks from pairwise differences; only ops XNNPACK takes.
    def _rank_matmul(self, tokens, attn, keep):
        n = attn.shape[1]
        diff = attn.unsqueeze(1) - attn.unsqueeze(2)  # [b, i, j] = a_j - a_i
        beats, beaten = _step(diff), _step(-diff)  # a_j > a_i, a_j < a_i
        pos = torch.arange(n, device=attn.device).to(attn.dtype)  # int arange + cast: CoreML-safe
        earlier = _step(pos.unsqueeze(1) - pos.unsqueeze(0))  # [j < i]; folds to a constant
        # rank_i = #{j: a_j > a_i} + #{j < i: a_j == a_i}: a permutation of 0..n-1 even with ties.
        rank = (beats + earlier * (1.0 - beats - beaten)).sum(-1)  # (B, n), whole numbers
        slots = torch.arange(keep, device=attn.device).to(attn.dtype).view(1, keep, 1)
        onehot = F.relu(1.0 - (rank.unsqueeze(1) - slots).abs())  # (B, keep, n): [rank_i == r]
        kept = onehot @ tokens
        fused = None
        if self.fuse_token:
            dropped = _step(rank - (keep - 0.5))  # [rank_i >= keep]
            fused = (attn * dropped).unsqueeze(1) @ tokens
        return kept, fused, None

    # --- onehot_matmul: topk indices -> one-hot matrix -> matmuls (no gather / scatter / sort).
    def _onehot_matmul(self, tokens, attn, keep):
        n = attn.shape[1]
        idx = attn.topk(keep, dim=1, largest=True, sorted=True).indices
        positions = torch.arange(n, device=attn.device).view(1, 1, n)
        onehot = (idx.unsqueeze(-1) == positions).to(tokens.dtype)  # (B, keep, n)
        kept = onehot @ tokens
        fused = None
        if self.fuse_token:
            dropped = 1.0 - onehot.sum(1)
            fused = (attn * dropped).unsqueeze(1) @ tokens
        return kept, fused, None

    # --- topk_gather: one full-length topk orders all tokens; its tail is the complement.
    def _topk_gather(self, tokens, attn, keep):
        n, c = attn.shape[1], tokens.shape[-1]
        order = attn.topk(n if self.fuse_token else keep, dim=1, largest=True, sorted=True).indices
        idx = order[:, :keep]
        kept = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, c))
        fused = None
        if self.fuse_token:
            rest = order[:, keep:]
            rest_tokens = tokens.gather(1, rest.unsqueeze(-1).expand(-1, -1, c))
            fused = attn.gather(1, rest).unsqueeze(1) @ rest_tokens
        return kept, fused, None

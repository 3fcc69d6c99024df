"""Self-attention among object queries with a box-overlap prior (StageInteractor / AdaMixer style).

Every head adds ``tau_h * log(IoF(box_i, box_j) + 1e-7)`` to its attention logits, so a query
attends mostly to queries whose boxes cover part of its own box. Attention is written as
matmul + softmax (no ``nn.MultiheadAttention``), which exports to CoreML and TFLite; the packed
``qkv`` projection uses ``nn.MultiheadAttention``'s layout (rows q | k | v, heads contiguous), so
its ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj`` load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .box_ops import box_iof

__all__ = ["iof_attention_bias", "BoxSelfAttention"]


def iof_attention_bias(boxes_xyxy: torch.Tensor, tau: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``[B, N, 4]`` boxes and per-head ``tau [H]`` -> additive logit bias ``[B, H, N, N]``;
    row i is query i, column j the attended query."""
    log_iof = torch.log(box_iof(boxes_xyxy, boxes_xyxy) + eps)
    return log_iof[:, None] * tau.view(1, -1, 1, 1)


class BoxSelfAttention(nn.Module):
    """Multi-head self-attention with an additive per-head bias; returns the attention output
    *plus* its input (the residual), as mmcv's attention wrapper does. The caller applies the norm."""

    def __init__(self, dim: int, num_heads: int, tau_init: tuple[float, float] = (0.0, 4.0)):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.iof_tau = nn.Parameter(torch.empty(num_heads))
        self._tau_init = tau_init
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.qkv.weight)      # the packed [3D, D] matrix as one tensor
        nn.init.zeros_(self.qkv.bias)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        nn.init.uniform_(self.iof_tau, *self._tau_init)

    def forward(self, x: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H, hd = self.num_heads, self.head_dim
        bias = iof_attention_bias(boxes_xyxy, self.iof_tau)
        q, k, v = self.qkv(x).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, hd]
        logits = torch.matmul(q * hd ** -0.5, k.transpose(-2, -1)) + bias
        attn = torch.softmax(logits, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, N, D)
        return x + self.proj(out)

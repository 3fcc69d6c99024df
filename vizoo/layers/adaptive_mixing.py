"""Adaptive (query-generated) channel and spatial mixing, with cross-stage filter reuse.

Base mixing (AdaMixer style). Per query and channel group, one Linear on the query generates a
channel-mixing matrix ``M [C_g, C_g]`` and a spatial-mixing matrix ``S [P_out, P*K]`` (output layout
per group: ``[C_g*C_g for M | P_out*P*K for S]``, both row-major, M indexed (in, out)); a second
Linear gives the biases (per group ``[C_g | P_out]``). With ``LN2`` a LayerNorm over the last two
dims without affine parameters:

    V1 = ReLU(LN2(V @ M + b_M));  V2 = ReLU(LN2(S @ V1 + b_S));  q = LN(q + W_v flatten(V2))

Reuse (StageInteractor): a stage that reuses ``R`` earlier stages receives their filters
``(M_j, S_j)`` (oldest first), generates a fresh ``M_s`` and only half of the spatial patterns,
and deepens its channel mixing with one extra mixing per reused filter:

    R_0 = V;  H_0 = ReLU(LN2(V @ M_s + b_M))
    R_j = R_{j-1} + A_sub_j(H_{j-1}) + A_axis_j(H_{j-1})
    M'_j = c_j * (r_j * M_j + (1 - r_j) * M_s) + (1 - c_j) * M_s
    H_j = ReLU(LN2(R_j @ M'_j + b_j))

``A_sub_j`` is a static Linear over the K points of a sub-box (``K*C_g`` features), ``A_axis_j``
one across the P sub-boxes at the same point index (``P*C_g``); both start at zero, so
``R_j = V`` at initialisation. The gates ``r_j`` (per input channel) and ``c_j`` (per output
channel) are sigmoids of a Linear on the query (zero-initialised: 0.5 at first), ``b_j`` comes
from another Linear. The spatial matrix is the fresh half stacked on top of the previous stage's
first ``P_out/2`` patterns (restricted to the current P sub-boxes), blended with the fresh half by
a per-pattern and then a per-input-point sigmoid gate of the same form.

The generator, bias generator and ``W_v`` start with zero weights (default Linear biases), so a
fresh model's mixing output is a function of the biases only.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["layer_norm2", "CascadeAdaptiveMixing", "FilterBank"]

#: One bank entry per stage: (fresh M ``[B*N*G, C_g, C_g]``, S as used ``[B*N*G, P_out, P, K]``).
FilterBank = Sequence[tuple[torch.Tensor, torch.Tensor]]


def layer_norm2(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last two dims, no affine parameters."""
    return F.layer_norm(x, x.shape[-2:])


class CascadeAdaptiveMixing(nn.Module):
    """Adaptive mixing of ``[B, N, G, P*K, C_g]`` sampled features into the queries ``[B, N, D]``.

    ``num_reused = 0`` is plain adaptive mixing; ``num_reused = R > 0`` reuses the ``R`` filters
    passed as ``bank`` (see the module docstring). ``forward`` returns the updated queries and
    this stage's bank entry.
    """

    def __init__(self, dim: int, groups: int, num_sub_boxes: int, points_per_sub_box: int,
                 out_patterns: int, num_reused: int = 0):
        super().__init__()
        if dim % groups:
            raise ValueError(f"dim {dim} is not divisible by groups {groups}")
        if num_reused and out_patterns % 2:
            raise ValueError(f"filter reuse needs an even number of output patterns, got {out_patterns}")
        self.dim, self.groups = dim, groups
        self.channels = dim // groups
        self.num_sub_boxes, self.points_per_sub_box = num_sub_boxes, points_per_sub_box
        self.num_points = num_sub_boxes * points_per_sub_box
        self.out_patterns = out_patterns
        self.num_reused = num_reused
        self.fresh_patterns = out_patterns // 2 if num_reused else out_patterns
        G, C, PK = groups, self.channels, self.num_points
        self.generator = nn.Linear(dim, G * (C * C + self.fresh_patterns * PK))
        self.mix_bias = nn.Linear(dim, G * (C + out_patterns))
        self.out_proj = nn.Linear(out_patterns * dim, dim)
        self.out_norm = nn.LayerNorm(dim)
        if num_reused:
            K, P = points_per_sub_box, num_sub_boxes
            self.sub_adapters = nn.ModuleList(nn.Linear(K * C, K * C) for _ in range(num_reused))
            self.axis_adapters = nn.ModuleList(nn.Linear(P * C, P * C) for _ in range(num_reused))
            self.filter_gates = nn.Linear(dim, G * C * 2 * num_reused)   # (g, c, [col, row], j)
            self.reuse_bias = nn.Linear(dim, G * num_reused * C)         # (g, j, c)
            self.pattern_gate = nn.Linear(dim, G * self.fresh_patterns)
            self.point_gate = nn.Linear(dim, G * PK)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for lin in (self.generator, self.mix_bias, self.out_proj):
            nn.init.zeros_(lin.weight)       # biases keep PyTorch's default init
        if self.num_reused:
            for lin in [*self.sub_adapters, *self.axis_adapters, self.filter_gates,
                        self.pattern_gate, self.point_gate]:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
            nn.init.zeros_(self.reuse_bias.weight)

    def generate(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh ``M [B*N*G, C_g, C_g]`` and ``S [B*N*G, fresh_patterns, P, K]`` for queries ``q``."""
        C, PK = self.channels, self.num_points
        params = self.generator(q).reshape(-1, C * C + self.fresh_patterns * PK)
        M, S = params.split([C * C, self.fresh_patterns * PK], dim=-1)
        return (M.reshape(-1, C, C),
                S.reshape(-1, self.fresh_patterns, self.num_sub_boxes, self.points_per_sub_box))

    def _reuse_channels(self, x: torch.Tensor, h: torch.Tensor, M: torch.Tensor, q: torch.Tensor,
                        bank: FilterBank) -> torch.Tensor:
        BNG = x.shape[0]
        G, C, R = self.groups, self.channels, self.num_reused
        P, K = self.num_sub_boxes, self.points_per_sub_box
        gates = torch.sigmoid(self.filter_gates(q)).view(BNG, C, 2, R)
        biases = self.reuse_bias(q).view(BNG, R, C)
        res = x
        for j, (M_j, _) in enumerate(bank):
            sub = self.sub_adapters[j](h.reshape(BNG // G, G, P, K * C)).reshape(BNG, P * K, C)
            across = h.reshape(BNG, P, K, C).transpose(1, 2).reshape(BNG, K, P * C)
            across = self.axis_adapters[j](across).reshape(BNG, K, P, C).transpose(1, 2)
            res = res + sub + across.reshape(BNG, P * K, C)
            row = gates[:, :, 1, j].unsqueeze(-1)          # [BNG, C, 1]: input channels
            col = gates[:, :, 0, j].unsqueeze(-2)          # [BNG, 1, C]: output channels
            M_mix = row * M_j + (1.0 - row) * M
            M_mix = col * M_mix + (1.0 - col) * M
            h = F.relu(layer_norm2(torch.bmm(res, M_mix) + biases[:, j].unsqueeze(1)))
        return h

    def _reuse_patterns(self, S: torch.Tensor, q: torch.Tensor, bank: FilterBank) -> torch.Tensor:
        BNG, fresh, P, K = S.shape
        prev = bank[-1][1]
        # slice only where needed: a full-range slice exports as an 'alias' op CoreML rejects
        if prev.shape[1] > fresh:
            prev = prev[:, :fresh]
        if prev.shape[2] > P:
            prev = prev[:, :, :P]
        if prev.shape != S.shape:
            raise ValueError(f"the previous stage's spatial filter {tuple(bank[-1][1].shape)} cannot be "
                             f"reused for {tuple(S.shape)} (it needs at least as many sub-boxes and "
                             "the same points per sub-box)")
        g_pattern = torch.sigmoid(self.pattern_gate(q)).view(BNG, fresh, 1, 1)
        g_point = torch.sigmoid(self.point_gate(q)).view(BNG, 1, P, K)
        blended = g_pattern * prev + (1.0 - g_pattern) * S
        blended = g_point * blended + (1.0 - g_point) * S
        return torch.cat([S, blended], dim=1)

    def forward(self, v: torch.Tensor, q: torch.Tensor, bank: FilterBank | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, N, G, PK, C = v.shape
        BNG = B * N * G
        if self.num_reused and (bank is None or len(bank) != self.num_reused):
            raise ValueError(f"this mixing reuses {self.num_reused} earlier filters; got "
                             f"{0 if bank is None else len(bank)}")
        M, S = self.generate(q)
        b_M, b_S = self.mix_bias(q).reshape(BNG, C + self.out_patterns).split([C, self.out_patterns], -1)
        x = v.reshape(BNG, PK, C)
        h = F.relu(layer_norm2(torch.bmm(x, M) + b_M.unsqueeze(1)))
        if self.num_reused:
            h = self._reuse_channels(x, h, M, q, bank)
            S = self._reuse_patterns(S, q, bank)
        out = torch.bmm(S.reshape(BNG, self.out_patterns, PK), h) + b_S.unsqueeze(-1)
        out = F.relu(layer_norm2(out))                                  # [BNG, P_out, C]
        q = self.out_norm(q + self.out_proj(out.reshape(B, N, G * self.out_patterns * C)))
        return q, (M, S)

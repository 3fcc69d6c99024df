"""Quantized attention for diffusers ``Attention``: explicit matmul + softmax with fake-quantized operands.

QuEST quantizes the two attention matmuls' operands — q and k before QKᵀ, the softmax output
(unsigned, ``sm_abits``) and v before PV — which SDPA hides inside one kernel; an explicit
matmul + softmax also exports as plain ops. The quantizers are submodules of the ``Attention``
module (``act_quantizer_{q,k,w,v}``) so they sit in its ``state_dict``; the processor itself is
stateless apart from the attention's original processor, which it calls while no quantizer is
enabled so that FP mode is bit-identical to the float model.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from vizoo.layers.quantizers import UniformQuantizer

__all__ = ["QuantAttnProcessor", "ATTN_QUANTIZERS", "add_attention_quantizers", "attention_quantizers"]

#: attribute names of the operand quantizers on a diffusers ``Attention``
ATTN_QUANTIZERS = ("act_quantizer_q", "act_quantizer_k", "act_quantizer_w", "act_quantizer_v")


def add_attention_quantizers(attn: nn.Module, a_bits: int, sm_abits: int, a_per_channel: bool,
                             num_sets: int) -> None:
    """Attach the four operand quantizers to ``attn`` and route it through :class:`QuantAttnProcessor`.

    q, k, v are quantized as [B, T, C] tokens (per C when ``a_per_channel``); the softmax output is
    unsigned and per tensor.
    """
    inner_q = attn.to_q.out_features
    inner_kv = attn.to_k.out_features
    axis = -1 if a_per_channel else None
    attn.act_quantizer_q = UniformQuantizer(a_bits, channel_axis=axis, num_sets=num_sets, num_channels=inner_q)
    attn.act_quantizer_k = UniformQuantizer(a_bits, channel_axis=axis, num_sets=num_sets, num_channels=inner_kv)
    attn.act_quantizer_w = UniformQuantizer(sm_abits, unsigned=True, num_sets=num_sets)
    attn.act_quantizer_v = UniformQuantizer(a_bits, channel_axis=axis, num_sets=num_sets, num_channels=inner_kv)
    attn.set_processor(QuantAttnProcessor(fp_processor=attn.processor))


def attention_quantizers(attn: nn.Module) -> list[UniformQuantizer]:
    """The operand quantizers of ``attn`` (empty if it has none)."""
    return [getattr(attn, name) for name in ATTN_QUANTIZERS if isinstance(getattr(attn, name, None), UniformQuantizer)]


class QuantAttnProcessor:
    """diffusers attention processor with fake-quantized matmul operands.

    ``explicit``: None (default) takes the explicit path only while a quantizer is enabled and
    otherwise defers to ``fp_processor`` (the attention's original processor: exact FP parity);
    True always takes the explicit path (export; the parity test); False never quantizes.
    Follows diffusers 0.42's ``AttnProcessor2_0`` step by step (spatial norm, 4-D input, mask,
    group norm, cross-attention norm, q/k norms, residual, output rescale).
    """

    def __init__(self, fp_processor: Any = None, explicit: bool | None = None):
        if fp_processor is None:
            from diffusers.models.attention_processor import AttnProcessor2_0
            fp_processor = AttnProcessor2_0()
        self.fp_processor = fp_processor
        self.explicit = explicit

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        quantizers = attention_quantizers(attn)
        explicit = self.explicit if self.explicit is not None else any(q.enabled for q in quantizers)
        if not explicit:
            return self.fp_processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _quantizer(attn: nn.Module, name: str):
    quantizer = getattr(attn, name, None)
    return _identity if quantizer is None else quantizer


def _to_heads(x: torch.Tensor, heads: int, norm: nn.Module | None, quantizer) -> torch.Tensor:
    """[B, T, C] → quantized [B, heads, T, C/heads]; with a q/k norm the quantizer sees the normed operand."""
    batch, tokens, channels = x.shape
    if norm is None:
        return quantizer(x).view(batch, tokens, heads, channels // heads).transpose(1, 2)
    x = norm(x.view(batch, tokens, heads, channels // heads).transpose(1, 2))
    x = quantizer(x.transpose(1, 2).reshape(batch, tokens, channels))
    return x.view(batch, tokens, heads, channels // heads).transpose(1, 2)


def explicit_attention(attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
    """``AttnProcessor2_0`` with SDPA spelled out as matmul → softmax → matmul and the operands quantized."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                      else encoder_hidden_states.shape)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads

    query = _to_heads(query, attn.heads, attn.norm_q, _quantizer(attn, "act_quantizer_q"))
    key = _to_heads(key, attn.heads, attn.norm_k, _quantizer(attn, "act_quantizer_k"))
    value = _to_heads(value, attn.heads, None, _quantizer(attn, "act_quantizer_v"))

    scores = torch.matmul(query, key.transpose(-1, -2)) * (head_dim ** -0.5 if attn.scale_qk else attn.scale)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    if attn.upcast_softmax:
        scores = scores.float()
    probs = _quantizer(attn, "act_quantizer_w")(scores.softmax(dim=-1).to(query.dtype))
    hidden_states = torch.matmul(probs, value)

    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor

"""QuantModule: a Conv2d / Linear / Embedding with a weight fake-quantizer and an input quantizer.

It takes over the float layer's own ``weight``/``bias`` Parameters under the same attribute names,
so a wrapped model's parameter names (``...time_emb_proj.weight``) match the float model's and
``trainable`` patterns written for the float model select the same layers. With both quantizers
off it calls the same functional op with the same arguments as the float layer: bit-identical.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vizoo.layers.quantizers import AdaRoundQuantizer, UniformQuantizer

__all__ = ["QuantModule", "QUANTIZABLE"]

#: layer types replaced by QuantModule
QUANTIZABLE = (nn.Conv2d, nn.Linear, nn.Embedding)


class QuantModule(nn.Module):
    """Fake-quantized replacement of ``module`` (weights per output channel, input per tensor/channel).

    ``a_bits=None`` builds no input quantizer (an Embedding's input is an index). ``num_sets`` is
    the number of per-timestep activation rows.
    """

    def __init__(self, module: nn.Module, w_bits: int, a_bits: int | None, a_per_channel: bool = False,
                 num_sets: int = 1):
        super().__init__()
        if not isinstance(module, QUANTIZABLE):
            raise TypeError(f"QuantModule wraps {[c.__name__ for c in QUANTIZABLE]}, got {type(module).__name__}")
        self.kind = _kind_of(module)
        self.weight = module.weight
        self.bias = getattr(module, "bias", None)
        self._copy_attributes(module)
        self.weight_quantizer = AdaRoundQuantizer(w_bits, tuple(self.weight.shape), channel_axis=0)
        if a_bits is None or self.kind == "embedding":
            self.act_quantizer = None
        else:
            channels = module.in_channels if self.kind == "conv" else module.in_features
            axis = (1 if self.kind == "conv" else -1) if a_per_channel else None
            self.act_quantizer = UniformQuantizer(a_bits, channel_axis=axis, num_sets=num_sets, num_channels=channels)
        self.use_weight_quant = False

    def _copy_attributes(self, module: nn.Module) -> None:
        """Keep the float layer's hyper-parameters (diffusers and exporters read some of them)."""
        if self.kind == "conv":
            if module.padding_mode != "zeros":
                raise ValueError(f"QuantModule supports zero-padded convs only, got {module.padding_mode!r}")
            for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
                setattr(self, name, getattr(module, name))
        elif self.kind == "linear":
            self.in_features, self.out_features = module.in_features, module.out_features
        else:
            for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                         "scale_grad_by_freq", "sparse"):
                setattr(self, name, getattr(module, name))

    @property
    def use_act_quant(self) -> bool:
        return self.act_quantizer is not None and self.act_quantizer.enabled

    @use_act_quant.setter
    def use_act_quant(self, value: bool) -> None:
        if self.act_quantizer is not None:
            self.act_quantizer.enabled = bool(value)

    def set_quant_state(self, weight: bool, act: bool) -> None:
        self.use_weight_quant = bool(weight)
        self.use_act_quant = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is not None and self.act_quantizer.enabled:
            x = self.act_quantizer(x)
        weight = self._quantized_weight_for_forward() if self.use_weight_quant else self.weight
        return self.apply_weight(x, weight)

    def _quantized_weight_for_forward(self) -> torch.Tensor:
        """Fake-quantized weight; reused between forwards while nothing it depends on changed.

        Sampling runs the same weights dozens of times; recomputing the AdaRound grid each
        forward costs as much as the activations' fake-quant. Under autograd (finetuning,
        reconstruction) it is always recomputed so gradients flow.
        """
        wq = self.weight_quantizer
        if torch.is_grad_enabled() and (self.weight.requires_grad or wq.alpha.requires_grad):
            self._weight_cache = None
            return wq(self.weight)
        key = (wq.mode, self.weight.data_ptr(), self.weight._version, wq.alpha._version, wq.delta._version,
               wq.zero_point._version, wq.delta.data_ptr(), self.weight.device, self.weight.dtype)
        cache = getattr(self, "_weight_cache", None)
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = (key, wq(self.weight))
            self._weight_cache = cache
        return cache[1]

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The float layer's op with ``weight`` in place of its own (same call as torch's modules)."""
        if self.kind == "conv":
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.kind == "linear":
            return F.linear(x, weight, self.bias)
        return F.embedding(x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The dequantized weight the quantized forward uses (hard decision if still in soft mode)."""
        wq = self.weight_quantizer
        if wq.mode == "soft":
            return wq.dequantize(wq.int_weight(self.weight))
        return wq(self.weight).detach()

    def extra_repr(self) -> str:
        if self.kind == "conv":
            shape = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        elif self.kind == "linear":
            shape = f"in_features={self.in_features}, out_features={self.out_features}"
        else:
            shape = f"{self.num_embeddings}, {self.embedding_dim}"
        return f"{self.kind}: {shape}, w_quant={self.use_weight_quant}, a_quant={self.use_act_quant}"


def _kind_of(module: nn.Module) -> str:
    """Subclasses of the torch layers (e.g. LoRA-compatible convs) map onto their base kind."""
    for cls, kind in ((nn.Conv2d, "conv"), (nn.Linear, "linear"), (nn.Embedding, "embedding")):
        if isinstance(module, cls):
            return kind
    raise TypeError(type(module).__name__)

"""Parameter and MAC counting with `torch.utils.flop_counter` (MACs = FLOPs / 2, the papers' unit).

Attention is counted under the math SDPA backend: the fused CPU kernel is invisible to the counter
(DeiT-S would count 4.24 G instead of 4.60 G). FFTs are not counted by the counter at all; models
that use them say so in their config's ``macs_note``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

COUNTER_NAME = "torch.utils.flop_counter (MACs = FLOPs/2, batch 1)"


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def example_inputs(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1) -> tuple[Any, ...]:
    """Inputs for one forward: the model's own ``example_inputs`` if it defines one (detectors,
    diffusion UNets), else a random image batch of ``input_size``."""
    if hasattr(model, "example_inputs"):
        return tuple(model.example_inputs(batch_size=batch_size, input_size=input_size))
    return (torch.randn(batch_size, *input_size),)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...] | None = None,
               inputs: tuple[Any, ...] | None = None) -> int:
    """Multiply-accumulates of one batch-1 forward in eval mode."""
    was_training = model.training
    model.eval()
    if inputs is None:
        if input_size is None:
            input_size = tuple(model.pretrained_cfg["input_size"])
        inputs = example_inputs(model, input_size)
    counter = FlopCounterMode(display=False)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:
            model(*inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2

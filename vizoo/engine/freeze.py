"""Freezing parameters by name pattern (CLR trains only its reprogramming convs, BN and head;
QuEST only selected layers).

A pattern is a shell wildcard on the parameter name (``"blocks.*.attn.*"``) or, with the prefix
``re:``, a regular expression searched in it (``"re:^head\\."``). A pattern that matches no
parameter is an error (a typo would otherwise silently train everything).
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Sequence

import torch.nn as nn


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_patterns(names: Sequence[str], patterns: Iterable[str], what: str) -> None:
    for p in patterns:
        if not any(matches(n, p) for n in names):
            raise ValueError(f"--{what} pattern {p!r} matches no parameter; names look like: "
                             f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}")


def apply_freeze(model: nn.Module, freeze: Sequence[str] = (), trainable: Sequence[str] = ()) -> tuple[int, int]:
    """Set ``requires_grad``: with ``trainable`` only matching parameters train; then every
    parameter matching ``freeze`` is frozen. Returns (trainable count, total count)."""
    names = [n for n, _ in model.named_parameters()]
    _check_patterns(names, trainable, "trainable")
    _check_patterns(names, freeze, "freeze")
    for name, p in model.named_parameters():
        train = any(matches(name, t) for t in trainable) if trainable else p.requires_grad
        if any(matches(name, f) for f in freeze):
            train = False
        p.requires_grad_(train)
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_train == 0:
        raise ValueError("every parameter is frozen; loosen --freeze or --trainable")
    return n_train, total


def frozen_norm_layers(model: nn.Module) -> list[nn.Module]:
    """Layers with running statistics (BatchNorm, EvoNorm-B0, ...) whose own parameters are all
    frozen: the Trainer keeps these in eval mode while training, so their statistics stay those
    of the frozen network (a frozen backbone stays exactly frozen)."""
    out = []
    for m in model.modules():
        has_stats = any(name in ("running_mean", "running_var") for name, _ in m.named_buffers(recurse=False))
        params = list(m.parameters(recurse=False))
        if has_stats and params and not any(p.requires_grad for p in params):
            out.append(m)
    return out

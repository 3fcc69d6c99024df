"""Normalization MIL ops. Statistics are accumulated in float64, applied in fp32."""
from __future__ import annotations

import numpy as np

from .registry import OpContext, register


def _channel(param: np.ndarray, rank: int) -> np.ndarray:
    return param.reshape((1, -1) + (1,) * (rank - 2))


def _normalize(x: np.ndarray, axes: tuple[int, ...], eps: float) -> np.ndarray:
    """(x - E[x]) / sqrt(Var[x] + eps) over ``axes`` (biased variance, as PyTorch and MIL)."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = np.square(x64 - mean).mean(axis=axes, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + eps)).astype(np.float32)


@register("batch_norm")
def _batch_norm(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    rank = x.ndim
    mean = _channel(ctx.tensor("mean"), rank)
    var = _channel(ctx.tensor("variance"), rank)
    eps = np.float32(ctx.scalar("epsilon", 1e-5))
    y = (x - mean) / np.sqrt(var + eps)
    if ctx.has("gamma"):
        y = y * _channel(ctx.tensor("gamma"), rank)
    if ctx.has("beta"):
        y = y + _channel(ctx.tensor("beta"), rank)
    return y


@register("instance_norm")
def _instance_norm(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    eps = float(ctx.scalar("epsilon", 1e-5))
    y = _normalize(x, tuple(range(2, x.ndim)), eps)
    if ctx.has("gamma"):
        y = y * _channel(ctx.tensor("gamma"), x.ndim)
    if ctx.has("beta"):
        y = y + _channel(ctx.tensor("beta"), x.ndim)
    return y


@register("layer_norm")
def _layer_norm(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    axes = ctx.ints("axes", None)
    axes = tuple(range(x.ndim)) if axes is None else tuple(a % x.ndim for a in axes)
    eps = float(ctx.scalar("epsilon", 1e-5))
    y = _normalize(x, axes, eps)
    # gamma / beta have shape x.shape[axes]; place them on those axes
    param_shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if ctx.has("gamma"):
        y = y * _place(ctx.tensor("gamma"), axes, param_shape)
    if ctx.has("beta"):
        y = y + _place(ctx.tensor("beta"), axes, param_shape)
    return y


def _place(param: np.ndarray, axes: tuple[int, ...], shape: list[int]) -> np.ndarray:
    if list(axes) != sorted(axes):
        order = np.argsort(axes)  # param dims follow the order the axes were given in
        param = np.transpose(param, order)
    return param.reshape(shape)


@register("l2_norm")
def _l2_norm(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    eps = float(ctx.scalar("epsilon", 1e-6))
    axes = tuple(range(max(x.ndim - 3, 0), x.ndim))  # the last three dims, leading dims are batch
    norm = np.sqrt(np.sum(np.square(x.astype(np.float64)), axis=axes, keepdims=True) + eps)
    return (x / norm).astype(np.float32)


@register("local_response_norm")
def _local_response_norm(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    size = int(ctx.scalar("size"))
    alpha = float(ctx.scalar("alpha", 1e-4))
    beta = float(ctx.scalar("beta", 0.75))
    k = float(ctx.scalar("k", 1.0))
    sq = np.square(x.astype(np.float64))
    channels = x.shape[1]
    pad_before, pad_after = size // 2, (size - 1) // 2  # window placement of torch.nn.LocalResponseNorm
    padded = np.pad(sq, [(0, 0), (pad_before, pad_after)] + [(0, 0)] * (x.ndim - 2))
    acc = sum(padded[:, i : i + channels] for i in range(size))
    return (x / np.power(k + alpha / size * acc, beta)).astype(np.float32)

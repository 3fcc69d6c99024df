"""Matrix MIL ops: linear, matmul, einsum, scaled_dot_product_attention."""
from __future__ import annotations

import math

import numpy as np
from scipy import special

from .registry import OpContext, register


def _exact_int(x: np.ndarray, y: np.ndarray) -> bool:
    return np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer)


def _blas(a: np.ndarray) -> np.ndarray:
    """fp32 and C-contiguous: np.matmul only reaches BLAS for such operands (else a slow loop)."""
    return np.ascontiguousarray(a, dtype=np.float32)


@register("linear")
def _linear(ctx: OpContext) -> np.ndarray:
    x, w = ctx.tensor("x"), ctx.tensor("weight")  # weight [D_out, D_in]
    if not _exact_int(x, w):
        x, w = _blas(x), _blas(w)
    out = np.matmul(x, w.T)
    if ctx.has("bias"):
        out = out + ctx.tensor("bias")
    return out


@register("matmul")
def _matmul(ctx: OpContext) -> np.ndarray:
    x, y = ctx.tensor("x"), ctx.tensor("y")
    if bool(ctx.scalar("transpose_x", False)) and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if bool(ctx.scalar("transpose_y", False)) and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    if not _exact_int(x, y):
        x, y = _blas(x), _blas(y)
    return np.matmul(x, y)


@register("einsum")
def _einsum(ctx: OpContext) -> np.ndarray:
    values = [v.astype(np.float32, copy=False) for v in ctx.tensors("values")]
    equation = ctx.scalar("equation").replace(" ", "")
    return np.einsum(equation, *values, optimize=True)


@register("scaled_dot_product_attention")
def _sdpa(ctx: OpContext) -> np.ndarray:
    q, k, v = _blas(ctx.tensor("query")), _blas(ctx.tensor("key")), _blas(ctx.tensor("value"))
    scores = np.matmul(q, _blas(np.swapaxes(k, -1, -2))) / np.float32(math.sqrt(q.shape[-1]))
    if ctx.has("attn_mask"):
        mask = ctx.tensor("attn_mask")
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, -np.inf)
        else:
            scores = scores + mask
    return np.matmul(_blas(special.softmax(scores, axis=-1)), v)

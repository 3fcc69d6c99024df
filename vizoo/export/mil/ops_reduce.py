"""Reduction MIL ops (``reduce_*``) and arg-reductions."""
from __future__ import annotations

import numpy as np

from .registry import OpContext, register


def _axes(ctx: OpContext, x: np.ndarray) -> tuple[int, ...]:
    axes = ctx.ints("axes", None)
    if axes is None:  # default: all dimensions
        return tuple(range(x.ndim))
    return tuple(a % x.ndim if x.ndim else 0 for a in axes)


def _reduction(fn):
    def run(ctx: OpContext) -> np.ndarray:
        x = ctx.tensor("x")
        keep = bool(ctx.scalar("keep_dims", False))
        if x.ndim == 0:
            return fn(x, axis=None, keepdims=False)
        return fn(x, axis=_axes(ctx, x), keepdims=keep)

    return run


def _mean(x, axis, keepdims):
    # float64 accumulation keeps long reductions (global pooling, layer stats) exact to fp32
    return np.mean(x, axis=axis, keepdims=keepdims, dtype=np.float64)


def _sum(x, axis, keepdims):
    if np.issubdtype(x.dtype, np.integer):
        return np.sum(x, axis=axis, keepdims=keepdims)
    return np.sum(x, axis=axis, keepdims=keepdims, dtype=np.float64)


_REDUCTIONS = {
    "reduce_mean": _mean,
    "reduce_sum": _sum,
    "reduce_max": np.max,
    "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_l1_norm": lambda x, axis, keepdims: _sum(np.abs(x), axis, keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(_sum(np.square(x), axis, keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: _sum(np.square(x), axis, keepdims),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(_sum(x, axis, keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: _logsumexp(x, axis, keepdims),
}


def _logsumexp(x: np.ndarray, axis, keepdims: bool) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True, dtype=np.float64)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


for _name, _fn in _REDUCTIONS.items():
    register(_name)(_reduction(_fn))


def _arg_reduction(fn):
    def run(ctx: OpContext) -> np.ndarray:
        x = ctx.tensor("x")
        axis = ctx.scalar("axis", -1)
        out = fn(x, axis=axis)  # first occurrence on ties
        if bool(ctx.scalar("keep_dims", False)):
            out = np.expand_dims(out, axis)
        return out

    return run


register("reduce_argmax")(_arg_reduction(np.argmax))
register("reduce_argmin")(_arg_reduction(np.argmin))

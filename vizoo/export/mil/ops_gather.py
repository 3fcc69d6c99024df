"""Index MIL ops: gather / scatter families, topk, argsort, one_hot, cumsum.

Out-of-range indices raise instead of wrapping: from iOS17 on, Core ML treats negative or
too-large indices as out of bounds (undefined result), so a model that relies on them is
broken on the device and parity must not pass.
"""
from __future__ import annotations

import numpy as np

from .registry import IOS17, OpContext, register


def _checked(ctx: OpContext, indices: np.ndarray, size: int, what: str = "indices") -> np.ndarray:
    idx = np.asarray(indices).astype(np.int64)
    if ctx.opset < IOS17:
        idx = np.where(idx < 0, idx + size, idx)  # iOS15/16 accept negative indices
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise ctx.fail(
            f"{what} out of range [0, {size}) (min {idx.min()}, max {idx.max()}); "
            "Core ML's result would be undefined"
        )
    return idx


@register("gather")
def _gather(ctx: OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    axis = int(ctx.scalar("axis", 0)) % x.ndim
    batch_dims = int(ctx.scalar("batch_dims", 0))
    idx = _checked(ctx, ctx.raw("indices"), x.shape[axis])
    if batch_dims == 0:
        return np.take(x, idx, axis=axis)
    batch = x.shape[:batch_dims]
    xb = x.reshape((-1,) + x.shape[batch_dims:])
    ib = idx.reshape((-1,) + idx.shape[batch_dims:])
    out = np.stack([np.take(xi, ii, axis=axis - batch_dims) for xi, ii in zip(xb, ib)])
    return out.reshape(batch + out.shape[1:])


@register("gather_along_axis")
def _gather_along_axis(ctx: OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    axis = int(ctx.scalar("axis", 0)) % x.ndim
    idx = _checked(ctx, ctx.raw("indices"), x.shape[axis])
    return np.take_along_axis(x, idx, axis=axis)


def _gather_nd_plain(ctx: OpContext, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    k = idx.shape[-1]
    cols = tuple(
        _checked(ctx, idx[..., i], x.shape[i], f"indices[..., {i}]") for i in range(k)
    )
    return x[cols]


@register("gather_nd")
def _gather_nd(ctx: OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    idx = np.asarray(ctx.raw("indices"))
    batch_dims = int(ctx.scalar("batch_dims", 0))
    if batch_dims == 0:
        return _gather_nd_plain(ctx, x, idx)
    batch = x.shape[:batch_dims]
    xb = x.reshape((-1,) + x.shape[batch_dims:])
    ib = idx.reshape((-1,) + idx.shape[batch_dims:])
    out = np.stack([_gather_nd_plain(ctx, xi, ii) for xi, ii in zip(xb, ib)])
    return out.reshape(batch + out.shape[1:])


_SCATTER_UFUNC = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
}


def _scatter_into(ctx: OpContext, data: np.ndarray, index: tuple, updates: np.ndarray) -> None:
    mode = ctx.scalar("mode", "update" if ctx.op_type == "scatter" else "add")
    if mode == "update":
        data[index] = updates
    elif mode in _SCATTER_UFUNC:
        _SCATTER_UFUNC[mode].at(data, index, updates)
    else:
        raise ctx.unsupported(f"scatter mode {mode!r}")


@register("scatter")
def _scatter(ctx: OpContext) -> np.ndarray:
    data = ctx.tensor("data").copy()
    axis = int(ctx.scalar("axis", 0)) % data.ndim
    idx = _checked(ctx, ctx.raw("indices"), data.shape[axis])
    data_m = np.moveaxis(data, axis, 0)  # a view: writes land in data
    updates = np.moveaxis(ctx.tensor("updates"), axis, 0)
    _scatter_into(ctx, data_m, (idx,), updates)
    return data


@register("scatter_along_axis")
def _scatter_along_axis(ctx: OpContext) -> np.ndarray:
    data = ctx.tensor("data").copy()
    axis = int(ctx.scalar("axis", 0)) % data.ndim
    idx = _checked(ctx, ctx.raw("indices"), data.shape[axis])
    grid = list(np.indices(idx.shape, sparse=True))
    grid[axis] = idx
    _scatter_into(ctx, data, tuple(grid), ctx.tensor("updates"))
    return data


@register("scatter_nd")
def _scatter_nd(ctx: OpContext) -> np.ndarray:
    data = ctx.tensor("data").copy()
    idx = np.asarray(ctx.raw("indices"))
    cols = tuple(
        _checked(ctx, idx[..., i], data.shape[i], f"indices[..., {i}]")
        for i in range(idx.shape[-1])
    )
    _scatter_into(ctx, data, cols, ctx.tensor("updates"))
    return data


def _order(x: np.ndarray, axis: int, ascending: bool) -> np.ndarray:
    """Stable sort order: ties keep the lower index first (as torch.topk / argsort do on CPU)."""
    keys = x if ascending else _descending_key(x)
    return np.argsort(keys, axis=axis, kind="stable")


def _descending_key(x: np.ndarray) -> np.ndarray:
    if np.issubdtype(x.dtype, np.unsignedinteger):
        return np.iinfo(x.dtype).max - x
    if np.issubdtype(x.dtype, np.integer):
        return -(x.astype(np.int64))
    return -x


@register("topk")
def _topk(ctx: OpContext):
    x = ctx.tensor("x")
    axis = int(ctx.scalar("axis", -1)) % x.ndim
    k = int(ctx.scalar("k", 1))
    if k == -1:
        k = x.shape[axis]
    ascending = bool(ctx.scalar("ascending", False))
    order = np.take(_order(x, axis, ascending), np.arange(k), axis=axis)
    values = np.take_along_axis(x, order, axis=axis)
    if not bool(ctx.scalar("return_indices", True)):
        return values
    return values, order.astype(ctx.out_dtype(1))


@register("argsort")
def _argsort(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    axis = int(ctx.scalar("axis", -1)) % x.ndim
    return _order(x, axis, bool(ctx.scalar("ascending", False))).astype(np.int32)


@register("one_hot")
def _one_hot(ctx: OpContext) -> np.ndarray:
    idx = np.asarray(ctx.raw("indices")).astype(np.int64)
    size = int(ctx.scalar("one_hot_vector_size"))
    axis = int(ctx.scalar("axis", -1))
    on, off = ctx.scalar("on_value", 1), ctx.scalar("off_value", 0)
    hot = idx[..., None] == np.arange(size)
    out = np.where(hot, on, off).astype(ctx.out_dtype())
    return np.moveaxis(out, -1, axis % (idx.ndim + 1))


@register("cumsum")
def _cumsum(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    axis = int(ctx.scalar("axis", 0)) % x.ndim
    reverse = bool(ctx.scalar("reverse", False))
    exclusive = bool(ctx.scalar("exclusive", False))
    acc_dtype = np.float64 if np.issubdtype(x.dtype, np.floating) else x.dtype
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=acc_dtype)
    if exclusive:
        out = out - x
    if reverse:
        out = np.flip(out, axis)
    return out

"""Shape and layout MIL ops: reshape, transpose, slicing, concat/split, pad, tile, ..."""
from __future__ import annotations

import numpy as np

from .registry import IOS17, OpContext, register


@register("reshape")
def _reshape(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    shape = ctx.ints("shape")
    if 0 in shape:
        if ctx.opset >= IOS17:  # a 0 copies the dim of x counted from the right (1 if none)
            offset = x.ndim - len(shape)
            shape = [
                (x.shape[i + offset] if 0 <= i + offset < x.ndim else 1) if s == 0 else s
                for i, s in enumerate(shape)
            ]
        else:
            shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return np.reshape(x, shape)


@register("reshape_like")
def _reshape_like(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    refs = ctx.raw("ref_tensors")
    begins = [int(b) for b in ctx.raw("begins")]
    ends = [int(e) for e in ctx.raw("ends")]
    masks = [bool(m) for m in ctx.raw("end_masks")]
    shape: list[int] = []
    for ref, b, e, m in zip(refs, begins, ends, masks):
        dims = np.shape(ref)
        shape.extend(dims[b:] if m else dims[b:e])
    return np.reshape(x, shape)


@register("transpose")
def _transpose(ctx: OpContext) -> np.ndarray:
    return np.transpose(ctx.raw("x"), ctx.ints("perm"))


@register("squeeze")
def _squeeze(ctx: OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    axes = ctx.ints("axes", None)
    if axes is None:
        return np.squeeze(x)
    # PyTorch semantics: axes whose size is not 1 are left alone
    axes = tuple(a % x.ndim for a in axes if x.shape[a % x.ndim] == 1)
    return np.squeeze(x, axis=axes)


@register("expand_dims")
def _expand_dims(ctx: OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    axes = ctx.ints("axes")
    rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(a % rank for a in axes))


@register("flatten2d")
def _flatten2d(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    axis = int(ctx.scalar("axis", 1))
    if axis < 0:
        axis += x.ndim
    return np.reshape(x, (int(np.prod(x.shape[:axis])), -1))


@register("concat")
def _concat(ctx: OpContext) -> np.ndarray:
    values = [np.asarray(v) for v in ctx.raw("values")]
    axis = int(ctx.scalar("axis"))
    if not bool(ctx.scalar("interleave", False)):
        return np.concatenate(values, axis=axis)
    axis %= values[0].ndim
    stacked = np.stack(values, axis=axis + 1)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


@register("stack")
def _stack(ctx: OpContext) -> np.ndarray:
    return np.stack([np.asarray(v) for v in ctx.raw("values")], axis=int(ctx.scalar("axis")))


@register("split")
def _split(ctx: OpContext) -> tuple[np.ndarray, ...]:
    x = ctx.raw("x")
    axis = int(ctx.scalar("axis")) % x.ndim
    sizes = ctx.ints("split_sizes", None)
    if sizes is None:
        n = int(ctx.scalar("num_splits"))
        if x.shape[axis] % n:
            raise ctx.fail(f"dim {x.shape[axis]} is not divisible by num_splits={n}")
        sizes = [x.shape[axis] // n] * n
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _slice_index(ctx: OpContext, x: np.ndarray) -> tuple:
    rank = x.ndim
    begin = ctx.ints("begin")
    end = ctx.ints("end")
    stride = ctx.ints("stride", None) or [1] * rank
    begin_mask = ctx.bools("begin_mask", None) or [False] * rank
    end_mask = ctx.bools("end_mask", None) or [False] * rank
    squeeze_mask = ctx.bools("squeeze_mask", None) or [False] * rank
    index: list = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(begin[i])  # pure index: the dim disappears
            continue
        b = None if begin_mask[i] else begin[i]
        e = None if end_mask[i] else end[i]
        index.append(slice(b, e, stride[i]))
    return tuple(index)


@register("slice_by_index")
def _slice_by_index(ctx: OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    return np.array(x[_slice_index(ctx, x)])


@register("slice_update")
def _slice_update(ctx: OpContext) -> np.ndarray:
    x = np.array(ctx.raw("x"), copy=True)
    x[_slice_index(ctx, x)] = ctx.raw("update")
    return x


@register("slice_by_size")
def _slice_by_size(ctx: OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    begin = ctx.ints("begin")
    size = ctx.ints("size")
    index = []
    for b, s, dim in zip(begin, size, x.shape):
        b = b + dim if b < 0 else b
        index.append(slice(b, dim if s == -1 else b + s))
    return np.array(x[tuple(index)])


@register("pad")
def _pad(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    pad = ctx.ints("pad")
    n = len(pad) // 2  # the last n dims are padded, in order
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = ctx.scalar("mode", "constant")
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=ctx.scalar("constant_val", 0.0))
    if mode == "reflect":
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise ctx.unsupported(f"pad mode {mode!r}")


@register("tile")
def _tile(ctx: OpContext) -> np.ndarray:
    return np.tile(ctx.raw("x"), ctx.ints("reps"))


@register("reverse")
def _reverse(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    axes = ctx.ints("axes", None)
    return np.flip(x, axis=None if axes is None else tuple(axes))


@register("reverse_sequence")
def _reverse_sequence(ctx: OpContext) -> np.ndarray:
    x = np.asarray(ctx.raw("x"))
    lengths = ctx.ints("lengths")
    seq_axis = int(ctx.scalar("seq_axis", 0)) % x.ndim
    batch_axis = int(ctx.scalar("batch_axis", 0)) % x.ndim
    out = x.copy()
    for b, length in enumerate(lengths):
        src = [slice(None)] * x.ndim
        src[batch_axis] = b
        src[seq_axis] = slice(0, length)
        dst = list(src)
        src[seq_axis] = slice(length - 1, None, -1) if length > 0 else slice(0, 0)
        out[tuple(dst)] = x[tuple(src)]
    return out


@register("shape")
def _shape(ctx: OpContext) -> np.ndarray:
    return np.array(np.shape(ctx.raw("x")), dtype=np.int32)


@register("fill")
def _fill(ctx: OpContext) -> np.ndarray:
    return np.full(ctx.ints("shape"), ctx.scalar("value", 0.0), dtype=ctx.out_dtype())


@register("fill_like")
def _fill_like(ctx: OpContext) -> np.ndarray:
    shape = np.shape(ctx.raw("ref_tensor"))
    return np.full(shape, ctx.scalar("value", 0.0), dtype=ctx.out_dtype())


@register("range_1d")
def _range_1d(ctx: OpContext) -> np.ndarray:
    start, end, step = ctx.scalar("start"), ctx.scalar("end"), ctx.scalar("step")
    return np.arange(start, end, step, dtype=ctx.out_dtype())


@register("band_part")
def _band_part(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    lower, upper = int(ctx.scalar("lower", -1)), int(ctx.scalar("upper", -1))
    m, n = x.shape[-2:]
    rows, cols = np.arange(m)[:, None], np.arange(n)[None, :]
    keep = ((lower < 0) | (rows - cols <= lower)) & ((upper < 0) | (cols - rows <= upper))
    return np.where(keep, x, np.zeros((), dtype=x.dtype))


@register("crop")
def _crop(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    top, bottom = ctx.ints("crop_height")
    left, right = ctx.ints("crop_width")
    return np.array(x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right])


@register("non_zero")
def _non_zero(ctx: OpContext) -> np.ndarray:
    return np.argwhere(np.asarray(ctx.raw("x")) != 0).astype(np.int32)


@register("sliding_windows")
def _sliding_windows(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    axis = int(ctx.scalar("axis")) % x.ndim
    size = int(ctx.scalar("size"))
    stride = int(ctx.scalar("stride", 1))
    win = np.lib.stride_tricks.sliding_window_view(x, size, axis=axis)  # window dim last
    win = np.moveaxis(win, -1, axis + 1)
    sel = [slice(None)] * win.ndim
    sel[axis] = slice(None, None, stride)
    return np.array(win[tuple(sel)])


# --------------------------------------------------------------- depth <-> space moves
@register("pixel_shuffle")
def _pixel_shuffle(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    f = int(ctx.scalar("upscale_factor"))
    n, c, h, w = x.shape
    y = x.reshape(n, c // (f * f), f, f, h, w).transpose(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (f * f), h * f, w * f)


@register("pixel_unshuffle")
def _pixel_unshuffle(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    f = int(ctx.scalar("downscale_factor"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // f, f, w // f, f).transpose(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * f * f, h // f, w // f)


@register("depth_to_space")
def _depth_to_space(ctx: OpContext) -> np.ndarray:
    # DCR order, as TensorFlow's depth_to_space: channel (i*b + j)*C' + c -> pixel (i, j) of c
    x = ctx.raw("x")
    b = int(ctx.scalar("block_size"))
    n, c, h, w = x.shape
    y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register("space_to_depth")
def _space_to_depth(ctx: OpContext) -> np.ndarray:
    x = ctx.raw("x")
    b = int(ctx.scalar("block_size"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).transpose(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)

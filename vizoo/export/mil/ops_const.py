"""Constants and compressed-weight MIL ops (constexpr_*), plus quantize / dequantize.

coremltools.optimize.coreml stores compressed weights as constexpr ops that Core ML expands
at load time. Expanding them here from the stored bits (not from coremltools' own value
inference) is what lets parity catch a wrong scale, LUT or bit order in the file.
"""
from __future__ import annotations

import numpy as np

from .registry import OpContext, register


@register("const")
def _const(ctx: OpContext):  # the executor binds const values directly; kept for the table
    return ctx.op.outputs[0].val


def _along_axis(param: np.ndarray, rank: int, axis: int) -> np.ndarray:
    """A scalar or per-channel vector shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    param = np.asarray(param)
    if param.size == 1:
        return param.reshape(())
    shape = [1] * rank
    shape[axis % rank] = -1
    return param.reshape(shape)


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Values packed LSB-first, one byte after the other (the iOS16 constexpr layout)."""
    bits = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    bits = bits[: count * nbits].reshape(count, nbits).astype(np.int64)
    return (bits << np.arange(nbits)).sum(axis=1)


# ----------------------------------------------------------------------- affine / cast
@register("constexpr_affine_dequantize")
def _affine_dequantize(ctx: OpContext) -> np.ndarray:
    q = np.asarray(ctx.raw("quantized_data"))
    axis = int(ctx.scalar("axis", 0))
    scale = _along_axis(ctx.tensor("scale"), q.ndim, axis).astype(np.float32)
    zero = _along_axis(ctx.raw("zero_point"), q.ndim, axis).astype(np.float32)
    return scale * (q.astype(np.float32) - zero)


@register("dequantize")
def _dequantize(ctx: OpContext) -> np.ndarray:
    q = np.asarray(ctx.raw("input"))
    axis = int(ctx.scalar("axis", 0))
    scale = _along_axis(ctx.tensor("scale"), q.ndim, axis).astype(np.float32)
    zero = ctx.raw("zero_point", None)
    zero = 0.0 if zero is None else _along_axis(zero, q.ndim, axis).astype(np.float32)
    return scale * (q.astype(np.float32) - zero)


@register("quantize")
def _quantize(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("input")
    axis = int(ctx.scalar("axis", 0))
    scale = _along_axis(ctx.tensor("scale"), x.ndim, axis).astype(np.float32)
    zero = ctx.raw("zero_point", None)
    zero = 0.0 if zero is None else _along_axis(zero, x.ndim, axis).astype(np.float32)
    out = ctx.out_dtype()
    info = np.iinfo(out)
    return np.clip(np.rint(x / scale) + zero, info.min, info.max).astype(out)


@register("constexpr_cast")
def _constexpr_cast(ctx: OpContext) -> np.ndarray:
    return np.asarray(ctx.raw("source_val")).astype(ctx.out_dtype())


# ---------------------------------------------------------------------- block-wise
def _expand_blocks(param: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat a per-block parameter to the full tensor: block size = shape / param.shape."""
    param = np.asarray(param)
    if param.ndim != len(shape):
        raise ValueError(f"block parameter rank {param.ndim} != data rank {len(shape)}")
    for axis, (n, m) in enumerate(zip(shape, param.shape)):
        if n % m:
            raise ValueError(f"dim {n} is not a multiple of {m} blocks")
        if n != m:
            param = np.repeat(param, n // m, axis=axis)
    return param


def _shift_scale(ctx: OpContext, data: np.ndarray) -> np.ndarray:
    scale = _expand_blocks(ctx.tensor("scale"), data.shape).astype(np.float32)
    out = data.astype(np.float32)
    if ctx.has("offset"):
        out = out - _expand_blocks(ctx.raw("offset"), data.shape).astype(np.float32)
    return scale * out


@register("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(ctx: OpContext) -> np.ndarray:
    return _shift_scale(ctx, np.asarray(ctx.raw("data")))


@register("constexpr_sparse_blockwise_shift_scale")
def _sparse_blockwise_shift_scale(ctx: OpContext):
    mask = np.asarray(ctx.raw("data_mask")).astype(bool)
    dense = np.zeros(mask.shape, dtype=np.float32)
    dense[mask] = np.asarray(ctx.raw("nonzero_data"), dtype=np.float32)
    return mask.astype(np.uint8), _shift_scale(ctx, dense)[mask]


# ----------------------------------------------------------------------- palettization
def _lut_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None) -> np.ndarray:
    """iOS18 LUT expansion: per-block LUTs ``lut[*blocks, NUM_PALETTES, VECTOR_SIZE]``."""
    rank = indices.ndim
    blocks = lut.shape[:rank]
    grid = []
    for axis, (n, m) in enumerate(zip(indices.shape, blocks)):
        if n % m:
            raise ValueError(f"indices dim {n} is not a multiple of {m} LUT blocks")
        shape = [1] * rank
        shape[axis] = n
        grid.append((np.arange(n) // (n // m)).reshape(shape))
    vals = lut[tuple(grid) + (indices.astype(np.int64),)]  # indices.shape + (VECTOR_SIZE,)
    vsize = lut.shape[-1]
    if vsize == 1:
        return vals[..., 0]
    if vector_axis is None:
        raise ValueError("vector palettization without vector_axis")
    vector_axis %= rank
    out_shape = list(indices.shape)
    out_shape[vector_axis] *= vsize
    return np.moveaxis(vals, -1, vector_axis + 1).reshape(out_shape)


@register("constexpr_lut_to_dense")
def _lut_to_dense(ctx: OpContext) -> np.ndarray:
    lut = np.asarray(ctx.raw("lut"))
    if ctx.has("shape"):  # iOS16: packed uint8 indices, one flat LUT
        shape = ctx.ints("shape")
        nbits = int(np.log2(lut.shape[-1]))
        idx = _unpack_bits(ctx.raw("indices"), nbits, int(np.prod(shape)))
        return lut[idx].reshape(shape)
    vector_axis = ctx.scalar("vector_axis", None)
    try:
        return _lut_dense(np.asarray(ctx.raw("indices")), lut, vector_axis)
    except ValueError as err:
        raise ctx.fail(str(err)) from None


@register("constexpr_lut_to_sparse")
def _lut_to_sparse(ctx: OpContext):
    mask = np.asarray(ctx.raw("indices_mask")).astype(bool)
    lut = np.asarray(ctx.raw("lut"))
    vector_axis = ctx.scalar("vector_axis", None)
    indices = np.zeros(mask.shape, dtype=np.int64)
    indices[mask] = np.asarray(ctx.raw("indices_nonzero_data"))
    dense = _lut_dense(indices, lut, vector_axis)
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=vector_axis % mask.ndim)
    return mask.astype(np.uint8), dense[mask]


@register("constexpr_sparse_to_dense")
def _sparse_to_dense(ctx: OpContext) -> np.ndarray:
    data = np.asarray(ctx.raw("nonzero_data"))
    if ctx.has("shape"):  # iOS16: packed bit mask
        shape = ctx.ints("shape")
        mask = _unpack_bits(ctx.raw("mask"), 1, int(np.prod(shape))).astype(bool).reshape(shape)
    else:
        mask = np.asarray(ctx.raw("mask")).astype(bool)
    if int(mask.sum()) != data.size:
        raise ctx.fail(f"mask has {int(mask.sum())} set bits but nonzero_data has {data.size} values")
    out = np.zeros(mask.shape, dtype=data.dtype)
    out[mask] = data
    return out

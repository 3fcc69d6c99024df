"""Elementwise MIL ops: binary arithmetic and comparisons, unary math, activations.

Broadcasting in MIL is NumPy's, so each op is one NumPy expression. Integer inputs stay
integer (exact); float inputs arrive as fp32 and the executor rounds to the declared dtype.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import special

from .registry import OpContext, register

# ----------------------------------------------------------------------------- binary
_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "equal": np.equal,
    "not_equal": np.not_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
    "logical_xor": np.logical_xor,
    "floor_div": np.floor_divide,
    "mod": np.mod,
}


def _binary(fn):
    def run(ctx: OpContext) -> np.ndarray:
        return fn(ctx.tensor("x"), ctx.tensor("y"))

    return run


for _name, _fn in _BINARY.items():
    register(_name)(_binary(_fn))


@register("real_div")
def _real_div(ctx: OpContext) -> np.ndarray:
    x, y = ctx.tensor("x"), ctx.tensor("y")
    if np.issubdtype(ctx.out_dtype(), np.integer):
        # int / int: Core ML truncates toward zero, like a C division
        return np.trunc(x.astype(np.float64) / y).astype(ctx.out_dtype())
    return np.true_divide(x, y, dtype=np.float32)


@register("pow")
def _pow(ctx: OpContext) -> np.ndarray:
    x, y = ctx.tensor("x"), ctx.tensor("y")
    if np.issubdtype(x.dtype, np.integer) and np.issubdtype(y.dtype, np.integer):
        return np.power(x.astype(np.int64), np.maximum(y, 0).astype(np.int64))
    return np.power(x, y)


# ------------------------------------------------------------------------------ unary
_UNARY = {
    "abs": np.abs,
    "acos": np.arccos,
    "asin": np.arcsin,
    "atan": np.arctan,
    "atanh": np.arctanh,
    "ceil": np.ceil,
    "cos": np.cos,
    "cosh": np.cosh,
    "erf": special.erf,
    "exp": np.exp,
    "exp2": np.exp2,
    "floor": np.floor,
    "logical_not": np.logical_not,
    "round": np.round,  # half to even: MIL rounds 0.5 to 0
    "sign": np.sign,
    "sin": np.sin,
    "sinh": np.sinh,
    "sqrt": np.sqrt,
    "square": np.square,
    "tan": np.tan,
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": special.expit,
    "silu": lambda x: x * special.expit(x),
    "softplus": lambda x: np.logaddexp(0, x),
    "softsign": lambda x: x / (1 + np.abs(x)),
    "identity": lambda x: x,
}


def _unary(fn):
    def run(ctx: OpContext) -> np.ndarray:
        return fn(ctx.tensor("x"))

    return run


for _name, _fn in _UNARY.items():
    register(_name)(_unary(_fn))


@register("inverse")
def _inverse(ctx: OpContext) -> np.ndarray:
    return 1.0 / (ctx.tensor("x") + np.float32(ctx.scalar("epsilon", 1e-4)))


@register("log")
def _log(ctx: OpContext) -> np.ndarray:
    return np.log(ctx.tensor("x") + np.float32(ctx.scalar("epsilon", 1e-45)))


@register("rsqrt")
def _rsqrt(ctx: OpContext) -> np.ndarray:
    return 1.0 / np.sqrt(ctx.tensor("x") + np.float32(ctx.scalar("epsilon", 1e-12)))


@register("threshold")
def _threshold(ctx: OpContext) -> np.ndarray:
    return np.maximum(ctx.tensor("x"), ctx.tensor("alpha"))


@register("clip")
def _clip(ctx: OpContext) -> np.ndarray:
    return np.minimum(np.maximum(ctx.tensor("x"), ctx.tensor("alpha")), ctx.tensor("beta"))


@register("cast")
def _cast(ctx: OpContext) -> np.ndarray:
    # The executor converts to the declared dtype; float -> int truncates toward zero.
    x = ctx.raw("x")
    out = ctx.out_dtype()
    if out == np.bool_:
        return np.asarray(x) != 0
    return np.asarray(x).astype(out)


# -------------------------------------------------------------------------- activations
@register("gelu")
def _gelu(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    mode = ctx.scalar("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1.0 + special.erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x**3)
        return 0.5 * x * (1.0 + np.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        return x * special.expit(np.float32(1.702) * x)
    raise ctx.unsupported(f"gelu mode {mode!r}")


@register("elu")
def _elu(ctx: OpContext) -> np.ndarray:
    x, alpha = ctx.tensor("x"), ctx.tensor("alpha")
    return np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0)))


@register("leaky_relu")
def _leaky_relu(ctx: OpContext) -> np.ndarray:
    x, alpha = ctx.tensor("x"), ctx.tensor("alpha")
    return np.where(x >= 0, x, alpha * x)


@register("clamped_relu")
def _clamped_relu(ctx: OpContext) -> np.ndarray:
    x, alpha, beta = ctx.tensor("x"), ctx.tensor("alpha"), ctx.tensor("beta")
    return np.minimum(beta, np.where(x >= 0, x, alpha * x))


@register("thresholded_relu")
def _thresholded_relu(ctx: OpContext) -> np.ndarray:
    x, alpha = ctx.tensor("x"), ctx.tensor("alpha")
    return np.where(x >= alpha, x, 0)


@register("linear_activation")
def _linear_activation(ctx: OpContext) -> np.ndarray:
    return ctx.tensor("x") * ctx.tensor("alpha") + ctx.tensor("beta")


@register("scaled_tanh")
def _scaled_tanh(ctx: OpContext) -> np.ndarray:
    return ctx.tensor("alpha") * np.tanh(ctx.tensor("beta") * ctx.tensor("x"))


@register("sigmoid_hard")
def _sigmoid_hard(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    return np.clip(ctx.tensor("alpha") * x + ctx.tensor("beta"), 0, 1)


def _per_channel(param: np.ndarray, rank: int) -> np.ndarray:
    """A [C] parameter broadcast over axis 1 of an NC... tensor."""
    return param.reshape((1, -1) + (1,) * (rank - 2))


@register("prelu")
def _prelu(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    alpha = _per_channel(ctx.tensor("alpha"), x.ndim)
    return np.where(x > 0, x, alpha * x)


@register("softplus_parametric")
def _softplus_parametric(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    alpha = _per_channel(ctx.tensor("alpha"), x.ndim)
    beta = _per_channel(ctx.tensor("beta"), x.ndim)
    return alpha * np.logaddexp(0, beta * x)


@register("softmax")
def _softmax(ctx: OpContext) -> np.ndarray:
    x = ctx.tensor("x")
    axis = ctx.scalar("axis", -1)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


@register("select")
def _select(ctx: OpContext) -> np.ndarray:
    cond = ctx.tensor("cond")
    if not (ctx.has("a") and ctx.has("b")):
        raise ctx.unsupported("select without a and b (index form)")
    return np.where(cond.astype(bool), ctx.tensor("a"), ctx.tensor("b"))

"""Op table of the MIL reference executor and the view an op implementation gets.

Each MIL op type maps to one NumPy function taking an :class:`OpContext`. The context
hands out input values already widened for computing (fp16 -> fp32); the executor
rounds every result back to the dtype the program declares for it, so an fp16 program
is rounded at every op boundary exactly where Core ML stores fp16 tensors.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .dtypes import numpy_dtype
from .errors import ExecutionError, UnsupportedOpError

OpImpl = Callable[["OpContext"], Any]

_IMPLS: dict[str, OpImpl] = {}
IOS17 = 8  # ct.target.iOS17.value: gather/scatter stop accepting negative indices
_MISSING = object()


def register(*op_types: str) -> Callable[[OpImpl], OpImpl]:
    """Register ``fn`` as the reference implementation of ``op_types``."""

    def wrap(fn: OpImpl) -> OpImpl:
        for op_type in op_types:
            if op_type in _IMPLS:
                raise ValueError(f"MIL op {op_type} registered twice")
            _IMPLS[op_type] = fn
        return fn

    return wrap


def implementation(op_type: str) -> OpImpl | None:
    return _IMPLS.get(op_type)


def registered_ops() -> set[str]:
    return set(_IMPLS)


def compute_dtype(arr: np.ndarray) -> np.ndarray:
    """fp16 tensors are computed in fp32 and rounded back by the executor."""
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return arr


class OpContext:
    """Inputs and declared outputs of one op while it runs."""

    __slots__ = ("op", "env", "opset", "inputs")

    def __init__(self, op: Any, env: dict[str, Any], opset: int) -> None:
        self.op = op
        self.env = env
        self.opset = opset  # int value of the function's ct.target (iOS15 = 6 ... iOS18 = 9)
        self.inputs = op.inputs

    # ----------------------------------------------------------------- identity
    @property
    def op_type(self) -> str:
        return self.op.op_type

    @property
    def name(self) -> str:
        return self.op.name

    def unsupported(self, detail: str) -> UnsupportedOpError:
        return UnsupportedOpError(self.op_type, self.name, detail)

    def fail(self, detail: str) -> ExecutionError:
        return ExecutionError(f"op {self.op_type} ('{self.name}'): {detail}")

    # ------------------------------------------------------------------- inputs
    def has(self, key: str) -> bool:
        return self.inputs.get(key) is not None

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The stored value (dtype as the program holds it)."""
        var = self.inputs.get(key)
        if var is None:
            if default is _MISSING:
                raise self.fail(f"required input '{key}' is missing")
            return default
        if isinstance(var, (tuple, list)):
            return [self.env[v.name] for v in var]
        return self.env[var.name]

    def tensor(self, key: str, default: Any = _MISSING) -> np.ndarray:
        """A tensor input, fp16 widened to fp32 for computing."""
        val = self.raw(key, default)
        if val is None:
            return None
        return compute_dtype(np.asarray(val))

    def tensors(self, key: str) -> list[np.ndarray]:
        vals = self.raw(key)
        if not isinstance(vals, list):
            vals = [vals]
        return [compute_dtype(np.asarray(v)) for v in vals]

    def scalar(self, key: str, default: Any = _MISSING) -> Any:
        """A scalar parameter as a Python value (int, float, bool or str)."""
        val = self.raw(key, default)
        if val is None or isinstance(val, (str, bool, int, float)):
            return val
        arr = np.asarray(val)
        if arr.size != 1:
            raise self.fail(f"input '{key}' should be a scalar, got shape {arr.shape}")
        return arr.reshape(()).item()

    def ints(self, key: str, default: Any = _MISSING) -> list[int] | None:
        val = self.raw(key, default)
        if val is None:
            return None
        return [int(v) for v in np.asarray(val).reshape(-1)]

    def bools(self, key: str, default: Any = _MISSING) -> list[bool] | None:
        val = self.raw(key, default)
        if val is None:
            return None
        return [bool(v) for v in np.asarray(val).reshape(-1)]

    # ------------------------------------------------------------------ outputs
    def out_dtype(self, index: int = 0) -> np.dtype:
        return numpy_dtype(self.op.outputs[index].dtype)

    def out_shape(self, index: int = 0) -> tuple | None:
        """Declared output shape, or None where any dimension is symbolic."""
        shape = self.op.outputs[index].shape
        if shape is None or not all(isinstance(d, (int, np.integer)) for d in shape):
            return None
        return tuple(int(d) for d in shape)

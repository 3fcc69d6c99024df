"""MIL builtin types -> NumPy dtypes (sub-byte ints are held unpacked in 8 bits)."""
from __future__ import annotations

from typing import Any

import numpy as np

_CACHE: dict[Any, np.dtype] = {}


def numpy_dtype(builtin: Any) -> np.dtype:
    """NumPy dtype of a coremltools builtin type (``var.dtype``)."""
    if builtin in _CACHE:
        return _CACHE[builtin]
    from coremltools.converters.mil.mil import types

    dtype = np.dtype(types.nptype_from_builtin(builtin))
    _CACHE[builtin] = dtype
    return dtype

"""The NumPy reference executor: walks a MIL function op by op.

Every result is converted to the dtype the program declares for it (so fp16 programs round
where Core ML stores fp16) and checked against the declared static shape (so a wrong
reference implementation fails loudly instead of producing plausible numbers).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from . import (  # noqa: F401  (importing fills the op table)
    ops_classify,
    ops_const,
    ops_conv,
    ops_elementwise,
    ops_gather,
    ops_linear,
    ops_norm,
    ops_reduce,
    ops_resize,
    ops_tensor,
)
from .dtypes import numpy_dtype
from .errors import ExecutionError, UnsupportedOpError
from .image import image_to_tensor
from .program import Program, iter_ops, load_program
from .registry import OpContext, implementation, registered_ops


def supported_ops() -> set[str]:
    """MIL op types the executor can run (control flow, state, random and RNN ops are not)."""
    return registered_ops()


def unsupported_ops(program: Any) -> set[str]:
    """Op types of ``program`` (ours, a PyMIL Program or Function) the executor cannot run.

    Checked before running; a mode of a supported op that has no reference (e.g. an unknown
    sampling mode) still raises UnsupportedOpError when the op runs.
    """
    supported = supported_ops()
    return {op.op_type for op in _all_ops(program) if op.op_type not in supported}


def _all_ops(program: Any):
    if isinstance(program, Program):
        yield from iter_ops(program.function)
    elif hasattr(program, "functions"):
        for func in program.functions.values():
            yield from iter_ops(func)
    else:
        yield from iter_ops(program)


def check_supported(function: Any) -> None:
    """Raise UnsupportedOpError naming the first op the executor cannot run."""
    supported = supported_ops()
    missing = [op for op in iter_ops(function) if op.op_type not in supported]
    if missing:
        first = missing[0]
        others = sorted({op.op_type for op in missing} - {first.op_type})
        detail = f"also unsupported: {', '.join(others)}" if others else ""
        raise UnsupportedOpError(first.op_type, first.name, detail)


# --------------------------------------------------------------------------- running
def run_mlpackage(
    path: str | Path, inputs: dict[str, Any], function_name: str | None = None
) -> dict[str, Any]:
    """Run a saved ``.mlpackage`` on ``inputs`` the way Core ML would, on any OS.

    Returns outputs by the model's output names: NumPy arrays in the declared dtype; for a
    classifier, ``classLabel`` is the label (str or int) and ``classLabel_probs`` a dict
    label -> probability, as ``MLModel.predict`` returns them on macOS.
    """
    return run_program(load_program(path, function_name), inputs)


def run_program(program: Program, inputs: dict[str, Any]) -> dict[str, Any]:
    """Run a loaded :class:`Program` (see :func:`run_mlpackage`)."""
    feeds = _prepare_inputs(program, inputs)
    values = run_function(program.function, feeds, program.opset)
    return dict(zip(program.output_names, values))


def _prepare_inputs(program: Program, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    expected = program.inputs
    unknown = sorted(set(inputs) - set(expected))
    missing = sorted(set(expected) - set(inputs))
    if unknown or missing:
        raise ExecutionError(
            f"inputs do not match the model: missing {missing}, unknown {unknown}; "
            f"the model takes {sorted(expected)}"
        )
    feeds = {}
    for name, desc in expected.items():
        value = inputs[name]
        if desc.image is not None:
            arr = image_to_tensor(name, value, desc.image, desc.dtype)
        else:
            arr = np.asarray(value)
            if arr.dtype != desc.dtype:
                arr = arr.astype(desc.dtype)  # Core ML converts MultiArray feeds the same way
        _check_shape(f"input '{name}'", arr.shape, desc.shape)
        feeds[name] = arr
    return feeds


def _check_shape(what: str, shape: tuple, declared: tuple) -> None:
    ok = len(shape) == len(declared) and all(d is None or d == s for s, d in zip(shape, declared))
    if not ok:
        pretty = tuple("?" if d is None else d for d in declared)
        raise ExecutionError(f"{what} has shape {tuple(shape)}, the program declares {pretty}")


def run_function(function: Any, feeds: dict[str, np.ndarray], opset: int | None = None) -> list[Any]:
    """Run one PyMIL function on already-prepared input arrays; returns its outputs in order."""
    check_supported(function)
    if opset is None:
        opset = int(function.opset_version.value) if function.opset_version else 8
    env: dict[str, Any] = dict(feeds)
    ops = list(function.operations)
    dead_after = _liveness(ops, function.outputs)
    with _single_thread_blas(), np.errstate(all="ignore"):  # inf / nan reach the outputs, as on device
        for i, op in enumerate(ops):
            if op.op_type == "const":
                var = op.outputs[0]
                env[var.name] = _const_value(var)
            else:
                _run_op(op, env, opset)
            for name in dead_after[i]:
                env.pop(name, None)
    return [env[var.name] for var in function.outputs]


def _single_thread_blas():
    """One BLAS thread: the executor's GEMMs are small, and OpenBLAS threads that spin on a
    busy machine made them ~100x slower (measured: 3.5 s vs 0.02 s for DeiT-Ti's attention)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _run_op(op: Any, env: dict[str, Any], opset: int) -> None:
    impl = implementation(op.op_type)
    if impl is None or op.blocks:
        raise UnsupportedOpError(op.op_type, op.name)
    try:
        result = impl(OpContext(op, env, opset))
    except (UnsupportedOpError, ExecutionError):
        raise
    except Exception as err:
        raise ExecutionError(f"op {op.op_type} ('{op.name}') failed: {err}") from err
    results = result if isinstance(result, tuple) else (result,)
    if len(results) != len(op.outputs):
        raise ExecutionError(
            f"op {op.op_type} ('{op.name}') gave {len(results)} outputs, program declares {len(op.outputs)}"
        )
    for var, value in zip(op.outputs, results):
        env[var.name] = _conform(op, var, value)


def _const_value(var: Any) -> Any:
    val = var.val
    if isinstance(val, (str, list, tuple, dict)):
        return val
    from coremltools.converters.mil.mil import types

    if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
        if var.dtype == types.str:
            return val
        return np.asarray(val, dtype=numpy_dtype(var.dtype))
    return val


def _conform(op: Any, var: Any, value: Any) -> Any:
    from coremltools.converters.mil.mil import types

    sym = var.sym_type
    if not (types.is_tensor(sym) or types.is_scalar(sym)) or var.dtype == types.str:
        return value  # classify's label / dict outputs
    arr = np.asarray(value)
    dtype = numpy_dtype(var.dtype)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    if types.is_scalar(sym):
        if arr.size != 1:
            raise ExecutionError(f"op {op.op_type} ('{op.name}') gave shape {arr.shape} for a scalar")
        return arr.reshape(())
    declared = tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in var.shape)
    _check_shape(f"op {op.op_type} ('{op.name}') output '{var.name}'", arr.shape, declared)
    return arr


def _liveness(ops: list[Any], outputs: list[Any]) -> list[list[str]]:
    """Names that can be dropped after each op (keeps peak memory near one layer's worth)."""
    keep = {v.name for v in outputs}
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for var in op.outputs:
            last.setdefault(var.name, i)
        for value in op.inputs.values():
            for var in value if isinstance(value, (tuple, list)) else (value,):
                last[var.name] = i
    dead: list[list[str]] = [[] for _ in ops]
    for name, i in last.items():
        if name not in keep:
            dead[i].append(name)
    return dead

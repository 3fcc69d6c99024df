"""Errors of the MIL reference executor.

An op the executor cannot reproduce must stop verification loudly: a parity report
that silently skipped an op would claim a check that never happened.
"""
from __future__ import annotations


class UnsupportedOpError(RuntimeError):
    """An op (or one mode of an op) has no reference implementation here."""

    def __init__(self, op_type: str, op_name: str = "", detail: str = "") -> None:
        self.op_type = op_type
        self.op_name = op_name
        self.detail = detail
        where = f"'{op_name}'" if op_name else "unnamed"
        text = f"unverified: op {op_type} ({where}"
        text += f", {detail})" if detail else ")"
        text += (
            " has no NumPy reference in vizoo.export.mil; the exported file cannot be checked "
            "on this machine. Implement the op in vizoo/export/mil/ops_*.py, or verify on macOS "
            "with coremltools' MLModel.predict."
        )
        super().__init__(text)


class ExecutionError(RuntimeError):
    """The program could not be run: bad inputs, or an op produced an impossible result."""

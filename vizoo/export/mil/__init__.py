"""NumPy reference executor for Core ML ML Programs (MIL), so exports verify on Linux.

coremltools converts and saves on any OS but predicts only on macOS. This package reads a
saved ``.mlpackage`` back into its MIL program and runs it op by op in NumPy, honouring the
program's dtypes (fp16 programs round at every op boundary), decompressing constexpr
weights from their stored bits, and refusing (``UnsupportedOpError``) any op it cannot
reproduce, so a parity check never passes by skipping work.

    >>> from vizoo.export.mil import run_mlpackage
    >>> outputs = run_mlpackage("model.mlpackage", {"image": pil_image})
"""
from __future__ import annotations

from .errors import ExecutionError, UnsupportedOpError
from .executor import run_function, run_mlpackage, run_program, supported_ops, unsupported_ops
from .image import ImageSpec
from .program import InputDescription, Program, load_program

__all__ = [
    "ExecutionError",
    "ImageSpec",
    "InputDescription",
    "Program",
    "UnsupportedOpError",
    "load_program",
    "run_function",
    "run_mlpackage",
    "run_program",
    "supported_ops",
    "unsupported_ops",
]

"""Quiet by default: hide third-party messages a user cannot act on, keep everything else.

The converters print a lot that means nothing to someone exporting a model: coremltools warns
that this torch was "not tested" and that its macOS-only runtime did not load on Linux, the TFLite
runtime announces its CPU delegate, absl and oneDNN print start-up banners, and coremltools draws
one progress bar per graph pass. Each such message is listed here by a pattern, so what is hidden
is explicit and reviewable; anything not listed still reaches the user. ``vizoo ... --verbose``
(or ``VIZOO_VERBOSE=1``) turns all filtering off.

Three mechanisms, one per kind of source:
- Python ``logging`` records (coremltools, torch's pytree registry): a filter on those loggers.
- Python ``warnings``: ``warnings.filterwarnings`` with the message pattern.
- Native (C++) writes to file descriptor 2 (absl, oneDNN, the TFLite runtime): the descriptor is
  redirected around the few calls that print them and the lines not listed are written back.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Iterator

#: logger name -> messages known to be harmless there (regular expressions, ``re.search``)
HARMLESS_LOG_RECORDS: dict[str, tuple[str, ...]] = {
    "coremltools": (
        r"has not been tested with coremltools",          # torch newer than coremltools' test matrix
        r"scikit-learn version .* is not supported",       # only the sklearn converter is disabled
        r"Failed to load _ML\w*Proxy",                     # the Core ML runtime exists on macOS only
        r"Saving value type of int64 into a builtin type of int32",  # shape/index constants
        r"Saving value type of float64 into a builtin type of fp32",  # constants; files are verified
    ),
    "torch.utils._pytree": (r"is an Enum subclass and is now natively supported",),  # torchao import
    # diffusers probes torchao's tensor types for checkpoint loading; vizoo never loads torchao files
    "diffusers.quantizers.torchao.torchao_quantizer": (r"Unable to import `torchao` Tensor objects",),
}

#: Python warnings known to be harmless: (message pattern, category)
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r".*experimental_preserve_all_tensors", UserWarning),  # ai-edge-quantizer's calibration interpreter
)

#: native stderr lines known to be harmless
HARMLESS_NATIVE_LINES: tuple[str, ...] = (
    r"All log messages before absl::InitializeLog\(\) is called",
    r"oneDNN custom operations are on",
    r"Created TensorFlow Lite XNNPACK delegate for CPU",
    r"flatbuffer_export\.cc:\d+\] Estimated count of arithmetic ops",  # the converter's own MAC count
)

_state = {"installed": False, "verbose": False}


class _PatternFilter(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def is_verbose() -> bool:
    return _state["verbose"] or os.environ.get("VIZOO_VERBOSE", "") not in ("", "0")


def install(verbose: bool = False) -> None:
    """Hide the listed third-party messages for the rest of the process (idempotent)."""
    _state["verbose"] = verbose or is_verbose()
    if _state["installed"] or _state["verbose"]:
        return
    for name, patterns in HARMLESS_LOG_RECORDS.items():
        logging.getLogger(name).addFilter(_PatternFilter(patterns))
    for message, category in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    _state["installed"] = True


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Drop the listed native banner lines printed inside the block; pass every other line on.

    Python writes to ``sys.stderr`` inside the block are held back until it ends, so wrap only
    short calls (an import, an interpreter construction), never a loop with a progress bar.
    """
    if is_verbose() or not _state["installed"]:
        yield
        return
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            patterns = [re.compile(p) for p in HARMLESS_NATIVE_LINES]
            kept = [line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(p.search(line) for p in patterns)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


#: module -> the name it calls tqdm by, for the converters' per-pass progress bars; vizoo's own
#: bar (one step per format and precision) and its verification bars replace them.
THIRD_PARTY_BARS: tuple[tuple[str, str], ...] = (
    ("coremltools.converters.mil.frontend.torch.ops", "_tqdm"),            # torch ops -> MIL
    ("coremltools.converters.mil.mil.passes.pass_pipeline", "tqdm"),       # each pass pipeline
    ("coremltools.optimize.coreml._quantization_passes", "tqdm"),          # weight compression
    ("ai_edge_quantizer.utils.progress_utils", "tqdm"),                    # int8 calibration (module)
)


@contextlib.contextmanager
def third_party_bars_hidden() -> Iterator[None]:
    """Hide the converters' progress bars inside the block (they have no switch for it).

    Each listed module's ``tqdm`` name is swapped for a disabled bar and restored after; a module
    that is not installed, or has moved the name, is left alone.
    """
    if is_verbose():
        yield
        return
    import importlib
    import types

    import tqdm as tqdm_module

    def hidden(*args: object, **kwargs: object) -> object:
        return tqdm_module.tqdm(*args, **{**kwargs, "disable": True})

    saved = []
    for module_name, attr in THIRD_PARTY_BARS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        current = getattr(module, attr, None)
        if current is None:
            continue
        replacement = types.SimpleNamespace(tqdm=hidden) if isinstance(current, types.ModuleType) else hidden
        saved.append((module, attr, current))
        setattr(module, attr, replacement)
    try:
        yield
    finally:
        for module, attr, current in saved:
            setattr(module, attr, current)

"""Export errors that say what stopped a conversion, where in the model, and what to do about it.

A converter failure arrives as a bare message ("Unsupported fx node fft_rfft2", "Didn't find op
for builtin opcode 'STABLEHLO_SORT'"). :func:`diagnose` turns it into a :class:`ConversionError`
naming the op, the module path that owns it (from the ``nn_module_stack`` of the torch.export
graph, or by exporting submodules when torch.export itself fails) and the known fix.
"""
from __future__ import annotations

import importlib
import re
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from ..quiet import native_stderr_filtered

INSTALL_HINT = "pip install 'vizoo[export]'"


class ExportError(RuntimeError):
    """Base class of every exporter error."""


class MissingDependencyError(ExportError, ImportError):
    """A converter or runtime package is not installed."""


class InputSizeError(ExportError, ValueError):
    """The requested input size cannot work for this model; raised before any conversion."""


class ConversionError(ExportError):
    """A converter could not take the model; ``op``, ``module_path`` and ``fix`` say why."""

    def __init__(self, fmt: str, op: str | None, module_path: str | None, module_type: str | None,
                 fix: str, detail: str):
        self.format, self.op, self.module_path, self.module_type = fmt, op, module_path, module_type
        self.fix, self.detail = fix, detail
        where = f"module '{module_path}' ({module_type})" if module_path is not None else "the model"
        what = f"op '{op}'" if op else "an op"
        super().__init__(f"{fmt} conversion failed: {what} in {where} is not supported. "
                         f"Fix: {fix} [converter said: {detail}]")

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "module_path": self.module_path, "module_type": self.module_type,
                "fix": self.fix, "detail": self.detail}


def require(modules: tuple[str, ...], what: str) -> None:
    """Import each module or raise the one message users need: install the extra."""
    missing = []
    for name in modules:
        try:
            with native_stderr_filtered():  # converters print start-up banners when imported
                importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"{what} needs {', '.join(missing)}, which is not installed: install vizoo[export] "
            f"({INSTALL_HINT})")


# --- known fixes: (regex on the op name or message, fix) -------------------------------------
KNOWN_FIXES: tuple[tuple[str, str], ...] = (
    (r"fft|_fft_|rfft|irfft|FFT",
     "give the layer an FFT-free export form (subclass vizoo.layers.export_mode.ExportAware): a "
     "2-D DFT of a fixed size is a linear map, so write it as matmuls with precomputed cos/sin "
     "matrices, real and imaginary parts as separate real tensors"),
    (r"\bsort\b|argsort|STABLEHLO_SORT",
     "use torch.topk (TOPK_V2 in TFLite, topk in CoreML) instead of sort/argsort; avoid "
     "sort-based index tricks (e.g. complement indices: use a one-hot matmul)"),
    (r"GuardOnDataDependent|data-dependent expression|control flow",
     "Python control flow on a tensor value (e.g. `if x.mean() > 0:`) cannot be exported: compute "
     "both branches and pick with torch.where, or decide from shapes/configuration"),
    (r"nonzero|masked_select|unique|index_put|data.dependent",
     "the output shape depends on tensor values: keep shapes static (fixed-size topk, masks "
     "multiplied in, torch.where) and move data-dependent post-processing into the app"),
    (r"roi_align|RoIAlign|nms",
     "keep RoIAlign/NMS out of the exported graph: export raw scores and boxes and "
     "post-process in the app"),
    (r"complex|view_as_real|view_as_complex",
     "complex tensors do not convert: keep real and imaginary parts as separate real tensors"),
    (r"softshrink|SIGN|SELECT_V2",
     "write softshrink as x - clamp(x, -lambd, lambd) (bit-identical, one XNNPACK partition)"),
)
_DEFAULT_FIX = ("replace the op with an equivalent the converter supports, or give the layer an "
                "export form (subclass vizoo.layers.export_mode.ExportAware and branch on "
                "self.exporting) whose ops both converters take")

#: runtime op names -> the aten op names they come from
_OP_ALIASES = {"STABLEHLO_SORT": ("sort", "argsort"), "_fft_r2c": ("fft_rfft2", "fft_rfft", "_fft_r2c"),
               "_fft_c2r": ("fft_irfft2", "fft_irfft", "_fft_c2r"), "_fft_c2c": ("fft_fft", "_fft_c2c")}

_OP_PATTERNS = (
    r"Unsupported fx node (\w+)",
    r"Didn't find op for builtin opcode '(\w+)'",
    r"Encountered unsupported op[^\w]*(\w+)",
    r"target=torch\.ops\.aten\.([\w.]+?)(?:\.default|\.\w+)?\]",
    r"(?:PyTorch convert function for op|Convert function for op) '?(\w+)'? not implemented",
    r"\b(aten::\w+)",
    r"'?(\w+)'? (?:op )?(?:is )?not (?:yet )?implemented",
)


def known_fix(op: str | None, message: str = "") -> str:
    for pattern, fix in KNOWN_FIXES:
        if (op and re.search(pattern, op)) or re.search(pattern, message):
            return fix
    return _DEFAULT_FIX


def op_from_message(message: str) -> str | None:
    for pattern in _OP_PATTERNS:
        m = re.search(pattern, message)
        if m:
            return m.group(1).replace("aten::", "")
    return None


def _short(message: str, limit: int = 300) -> str:
    first = " ".join(message.strip().split())
    return first if len(first) <= limit else first[:limit] + "…"


def diagnose(exc: BaseException, fmt: str, module: nn.Module, args: tuple[Any, ...],
             convert: Callable[[nn.Module, tuple[Any, ...]], Any] | None = None) -> ConversionError:
    """Explain a converter failure: the op, the module path that owns it, and the fix.

    ``convert(submodule, inputs)`` runs the failing converter on a submodule; when the message
    names no op that can be found in the graph, the deepest submodule that fails the same way
    is reported.
    """
    message = f"{type(exc).__name__}: {exc}"
    op = op_from_message(message)
    path = mtype = None
    if _is_export_failure(exc):
        path, mtype, sub_msg = locate_by_submodules(module, args)
        if sub_msg:
            message = sub_msg
        op = op or op_from_message(message)
        if re.search(r"GuardOnDataDependent|data-dependent expression", message):
            code = re.search(r"code: (.+)", f"{exc}\n{message}")
            op = "data-dependent control flow" + (f" (`{code.group(1).strip()}`)" if code else "")
    elif op:
        path, mtype, found = locate_op(module, args, op)
        if found and found.lstrip("_") != op.lstrip("_"):
            op = f"{found} (lowered to {op})"
    if path is None and convert is not None:
        path, mtype, _ = locate_by_submodules(module, args, convert, same_as=type(exc),
                                              root_failure=message)
    return ConversionError(fmt, op, path, mtype, known_fix(op, message), _short(message))


def _is_export_failure(exc: BaseException) -> bool:
    """True when torch.export (not the converter after it) raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    files = [f.filename for f in frames]
    in_export = any("torch/export" in f or "torch/_dynamo" in f or "torch/_export" in f for f in files)
    in_converter = any(("coremltools" in f or "litert" in f) and "export" not in f.split("/")[-1]
                       for f in files[-3:])
    return in_export and not in_converter


def _op_name(node: torch.fx.Node) -> str:
    target = str(node.target).split(".")
    return target[1] if len(target) > 1 and target[0] == "aten" else target[0]


def _node_matches(node: torch.fx.Node, names: tuple[str, ...]) -> bool:
    base = _op_name(node)
    return node.op == "call_function" and any(base == n or base.lstrip("_") == n.lstrip("_")
                                              for n in names)


def locate_op(module: nn.Module, args: tuple[Any, ...], op: str) -> tuple[str | None, str | None, str | None]:
    """Module path and type of the first node running ``op`` (or an op it is lowered from) in
    the torch.export graph, and that node's op name."""
    names = _OP_ALIASES.get(op, ()) + (op, op.lower())
    try:
        ep = torch.export.export(module, args)
    except Exception:  # noqa: BLE001 - no graph, no location
        return None, None, None
    graphs = [ep]
    try:
        graphs.append(ep.run_decompositions())
    except Exception:
        pass
    for g in graphs:
        for node in g.graph.nodes:
            if _node_matches(node, names):
                found = _op_name(node)
                stack = node.meta.get("nn_module_stack") or {}
                if stack:
                    path, mtype = list(stack.values())[-1]
                    mtype = mtype if isinstance(mtype, str) else getattr(mtype, "__name__", str(mtype))
                    return path or "<root>", mtype.rsplit(".", 1)[-1], found
                return "<root>", type(module).__name__, found
    return None, None, None


def _export_only(m: nn.Module, args: tuple[Any, ...]) -> Any:
    return torch.export.export(m, args)


def locate_by_submodules(module: nn.Module, args: tuple[Any, ...],
                         check: Callable[[nn.Module, tuple[Any, ...]], Any] = _export_only,
                         same_as: type | None = None, budget_s: float = 120.0,
                         root_failure: str = "") -> tuple[str | None, str | None, str]:
    """Deepest submodule that ``check`` (torch.export by default, or a converter) cannot take on
    its own, run on the inputs it received in one forward (recorded by hooks). With
    ``same_as``, only failures of that exception type count (a submodule can fail for reasons
    of its own, e.g. non-tensor inputs); ``root_failure`` skips re-checking the whole model."""
    recorded: dict[str, tuple[Any, ...]] = {}
    hooks = []
    for name, m in module.named_modules():
        hooks.append(m.register_forward_pre_hook(
            lambda mod, a, _n=name: recorded.setdefault(_n, a)))
    try:
        with torch.no_grad():
            module(*args)
    except Exception:  # noqa: BLE001 - whatever ran before the failure is recorded
        pass
    finally:
        for h in hooks:
            h.remove()
    deadline = time.monotonic() + budget_s

    def fails(path: str, m: nn.Module) -> str:
        if path and (time.monotonic() > deadline
                     or not all(isinstance(a, torch.Tensor) for a in recorded[path])):
            return ""
        try:
            check(m, tuple(recorded[path]))
            return ""
        except Exception as e:  # noqa: BLE001 - any failure is what we look for
            if same_as is not None and not isinstance(e, same_as):
                return ""
            return f"{type(e).__name__}: {e}"

    path, current = "", module
    msg = root_failure or (fails("", module) if "" in recorded else "")
    if not msg:
        return None, None, ""
    while True:
        for child_name, child in current.named_children():
            child_path = f"{path}.{child_name}" if path else child_name
            if child_path in recorded:
                child_msg = fails(child_path, child)
                if child_msg:
                    path, current, msg = child_path, child, child_msg
                    break
        else:
            return path or "<root>", type(current).__name__, msg

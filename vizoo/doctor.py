"""`vizoo doctor`: what a bug report needs, and whether this install can do vizoo's job.

Prints the versions of vizoo, Python and every package vizoo uses beside the version vizoo's
own metadata pins (read from the installed distribution, so it works from a wheel as from a
checkout), whether each imports, how CoreML files are verified on this machine, torch's
threads, and (unless ``--no-selfcheck``) exports a tiny model to CoreML and TFLite and verifies
both files. Exit code 0 when all is fine; 1 with one line per problem, each saying what to install.

    vizoo doctor                 # the table, then the self-check (~10-20 s)
    vizoo doctor --json          # the same, as one JSON object (paste it into a bug report)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

INSTALL_EXPORT = "pip install 'vizoo[export]'"
INSTALL_DEMO = "pip install 'vizoo[demo]'"


@dataclass(frozen=True)
class Package:
    """One package vizoo uses: its title, import name, distribution(s) and whether it is needed."""

    title: str
    module: str
    dists: tuple[str, ...]          # distributions that provide the module, the pinned one first
    required: bool                  # a broken import makes the doctor fail
    extra: str | None = None        # the vizoo extra that installs it


PACKAGES: tuple[Package, ...] = (
    Package("torch", "torch", ("torch",), True),
    Package("torchvision", "torchvision", ("torchvision",), True),
    Package("timm", "timm", ("timm",), True),
    Package("numpy", "numpy", ("numpy",), True),
    Package("coremltools", "coremltools", ("coremltools",), True, "export"),
    Package("litert-torch", "litert_torch", ("litert-torch",), True, "export"),
    Package("ai-edge-litert", "ai_edge_litert", ("ai-edge-litert",), True, "export"),
    Package("ai-edge-quantizer", "ai_edge_quantizer", ("ai-edge-quantizer",), True, "export"),
    # the demos' camera/video I/O only: reported, never a failure
    Package("OpenCV", "cv2", ("opencv-python", "opencv-python-headless", "opencv-contrib-python",
                              "opencv-contrib-python-headless"), False, "demo"),
)


@dataclass
class PackageStatus:
    name: str
    module: str
    installed: str | None
    expected: str | None            # e.g. "==9.0" (from vizoo's metadata), None when not pinned
    extra: str | None
    imports: bool
    error: str | None = None
    mismatch: bool = False
    required: bool = True


@dataclass
class Diagnosis:
    vizoo: str
    vizoo_metadata: str | None
    python: str
    platform: str
    packages: list[PackageStatus]
    coreml_verification: str
    torch_threads: dict[str, Any]
    selfcheck: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def pinned_requirements() -> dict[str, tuple[str, str | None]]:
    """``{distribution: (specifier, extra)}`` from the installed vizoo's metadata (empty when vizoo
    runs from a folder that was never installed)."""
    try:
        lines = importlib.metadata.requires("vizoo") or []
        extras = [e for e in importlib.metadata.metadata("vizoo").get_all("Provides-Extra") or [] if e != "all"]
    except importlib.metadata.PackageNotFoundError:
        return {}
    from packaging.requirements import Requirement

    out: dict[str, tuple[str, str | None]] = {}
    for line in lines:
        req = Requirement(line)
        extra = None
        if req.marker is not None:  # which extra asks for it ("all" repeats the others' pins)
            extra = next((e for e in extras if req.marker.evaluate({"extra": e})), None)
            if extra is None and not req.marker.evaluate({"extra": ""}):
                continue
        out.setdefault(_canonical(req.name), (str(req.specifier), extra))
    return out


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _installed_version(pkg: Package, module: Any) -> str | None:
    """From the distribution's metadata (also when the import fails); else ``__version__``."""
    for dist in pkg.dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    version = getattr(module, "__version__", None)
    return str(version) if version is not None else None


def _satisfies(version: str, spec: str) -> bool | None:
    """None when it cannot be decided (no spec, unparsable version)."""
    if not spec:
        return None
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) in SpecifierSet(spec)
    except (InvalidVersion, ValueError):
        return None


def check_package(pkg: Package, pins: dict[str, tuple[str, str | None]]) -> PackageStatus:
    """Import ``pkg`` (any exception is a failed import) and compare its version with the pin."""
    module, error = None, None
    try:
        with _native_banners_hidden():
            module = importlib.import_module(pkg.module)
    except Exception as e:  # noqa: BLE001 - a broken install raises anything, not only ImportError
        error = _one_line(e)
    version = _installed_version(pkg, module)
    spec, extra = next((pins[_canonical(d)] for d in pkg.dists if _canonical(d) in pins), ("", pkg.extra))
    fits = _satisfies(version, spec) if version else None
    return PackageStatus(name=pkg.title, module=pkg.module, installed=version, expected=spec or None,
                         extra=extra, imports=error is None, error=error, mismatch=fits is False,
                         required=pkg.required)


def _native_banners_hidden() -> Any:
    """The start-up banners some imports print from C++ (absl, oneDNN) hidden as in every vizoo
    command; any other line still reaches stderr."""
    try:
        from .quiet import native_stderr_filtered
    except ImportError:
        return contextlib.nullcontext()
    return native_stderr_filtered()


def _fix(status: PackageStatus, dist: str) -> str:
    if status.extra == "export":
        return INSTALL_EXPORT
    if status.extra == "demo":
        return INSTALL_DEMO
    return f"pip install '{dist}{status.expected or ''}'"


def coreml_verification(coremltools_imports: bool = True) -> str:
    """What runs a CoreML file here (the same rule as vizoo.export.coreml.open_runner)."""
    if not coremltools_imports:
        return "nothing: coremltools does not import (it reads the files on every OS)"
    if sys.platform == "darwin" and platform.mac_ver()[0]:
        return f"Core ML itself (MLModel.predict, macOS {platform.mac_ver()[0]})"
    try:
        importlib.import_module("vizoo.export.mil")
    except Exception as e:  # noqa: BLE001
        return f"nothing: vizoo's MIL executor (vizoo.export.mil) does not import ({_one_line(e)})"
    return ("vizoo's MIL executor (vizoo.export.mil, NumPy): Core ML itself predicts only on macOS")


def torch_threads() -> dict[str, Any]:
    import torch

    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.is_available()}


def self_check(formats: tuple[str, ...] = ("coreml", "tflite"), size: int = 32) -> dict[str, Any]:
    """Export a tiny classifier (conv, vizoo's EvoNorm-S0, linear) to ``formats`` in a temporary
    folder and verify each file against PyTorch. Small enough to take seconds, but the whole path
    a real export takes: conversion, the runtime loading the file, parity on real photographs."""
    import torch
    import torch.nn as nn

    import vizoo
    from vizoo.layers import EvoNorm2dS0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), EvoNorm2dS0(8, group_size=4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    t0 = time.perf_counter()
    out: dict[str, Any] = {"model": f"conv + EvoNorm2dS0 + linear, {size}x{size} px", "results": []}
    with tempfile.TemporaryDirectory(prefix="vizoo-doctor-") as folder:
        for fmt in formats:  # one export each: a format that crashes cannot hide the other's result
            try:
                report = vizoo.export(model, formats=fmt, input_size=(1, 3, size, size), out_dir=folder,
                                      name="doctor", verify_images=4, latency=False)
            except Exception as e:  # noqa: BLE001 - the self-check reports, never crashes the doctor
                out["results"].append({"format": fmt, "precision": "fp32", "status": "failed",
                                       "reason": _one_line(e), "max_abs_diff": None, "seconds": None})
                continue
            for r in report.results:
                diff = r.parity().get("max_abs_diff") if r.status == "ok" else None
                out["results"].append({"format": r.format, "precision": r.precision, "status": r.status,
                                       "reason": r.reason, "max_abs_diff": diff,
                                       "seconds": round(r.seconds, 1)})
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def diagnose(selfcheck: bool = True) -> Diagnosis:
    """Everything ``vizoo doctor`` prints; ``problems`` is empty when this install works."""
    from . import __version__

    pins = pinned_requirements()
    try:
        meta_version = importlib.metadata.version("vizoo")
    except importlib.metadata.PackageNotFoundError:
        meta_version = None
    statuses = [check_package(p, pins) for p in PACKAGES]
    diag = Diagnosis(
        vizoo=__version__, vizoo_metadata=meta_version,
        python=f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        platform=platform.platform(), packages=statuses,
        coreml_verification=coreml_verification(next(s.imports for s in statuses if s.module == "coremltools")),
        torch_threads=torch_threads() if statuses[0].imports else {})
    if not pins:
        diag.warnings.append("vizoo is not installed as a distribution (no metadata): expected versions "
                             "unknown; pip install -e . in the checkout")
    elif meta_version != __version__:
        diag.warnings.append(f"installed metadata says vizoo {meta_version} but the code is {__version__}: "
                             "reinstall (pip install -e . in the checkout)")
    for pkg, s in zip(PACKAGES, statuses):
        fix = _fix(s, pkg.dists[0])
        if not s.imports:
            line = f"{s.module} does not import ({s.error}): {fix}"
            (diag.problems if s.required else diag.warnings).append(line)
        elif s.mismatch:
            diag.warnings.append(f"{s.name} {s.installed} is not the version vizoo is tested with "
                                 f"({s.expected}): pip install '{pkg.dists[0]}{s.expected}'")
    if selfcheck:
        formats = tuple(f for f, mods in (("coreml", ("coremltools",)),
                                         ("tflite", ("litert_torch", "ai_edge_litert", "ai_edge_quantizer")))
                        if all(s.imports for s in statuses if s.module in mods))
        if formats and statuses[0].imports:
            diag.selfcheck = self_check(formats)
            for r in diag.selfcheck["results"]:
                if r["status"] != "ok":
                    diag.problems.append(f"self-check: the {r['format']} {r['precision']} export did not verify "
                                         f"({r['status']}: {r['reason'][:300]}); rerun with --verbose and "
                                         "attach the output to a bug report")
        else:
            diag.selfcheck = {"skipped": "no format's converters import"}
    return diag


def format_diagnosis(d: Diagnosis) -> str:
    """The human-readable report (the problems go to stderr, one line each)."""
    lines = ["vizoo doctor", f"  vizoo      {d.vizoo}", f"  Python     {d.python}", f"  platform   {d.platform}", ""]
    width = max(len(s.name) for s in d.packages)
    lines.append(f"  {'package':<{width}}  {'installed':<16} {'expected':<20} status")
    for s in d.packages:
        expected = (s.expected or "-") + (f" [{s.extra}]" if s.extra else "")
        if not s.imports:
            status = ("FAILED: " if s.required else "missing (optional): ") + (s.error or "")
        elif s.mismatch:
            status = "imports; VERSION MISMATCH"
        else:
            status = "ok"
        lines.append(f"  {s.name:<{width}}  {s.installed or '-':<16} {expected:<20} {status}")
    lines += ["", f"CoreML files are verified by: {d.coreml_verification}"]
    t = d.torch_threads
    if t:
        lines.append(f"torch threads: {t['intra_op']} intra-op, {t['inter_op']} inter-op "
                     f"(OMP_NUM_THREADS={t['OMP_NUM_THREADS'] or 'unset'}, {t['cpu_count']} CPUs); "
                     f"CUDA {'available' if t['cuda'] else 'not available'}")
    sc = d.selfcheck
    if sc is None:
        lines.append("self-check: skipped (--no-selfcheck)")
    elif "skipped" in sc:
        lines.append(f"self-check: skipped ({sc['skipped']})")
    else:
        lines.append(f"self-check: {sc['model']}, exported and verified ({sc['seconds']:.0f} s)")
        for r in sc["results"]:
            diff = f", max|d| {r['max_abs_diff']:.2g}" if r["max_abs_diff"] is not None else ""
            took = f" ({r['seconds']} s)" if r["seconds"] is not None else ""
            detail = "" if r["status"] == "ok" else f": {r['reason'][:200]}"
            lines.append(f"  {r['format']:<7} {r['precision']:<5} {r['status']}{diff}{took}{detail}")
    for w in d.warnings:
        lines.append(f"warning: {w}")
    lines.append("")
    lines.append("all good" if d.ok else f"{len(d.problems)} problem(s): see the lines below")
    return "\n".join(lines)


def _cmd_doctor(args: argparse.Namespace) -> int:
    d = diagnose(selfcheck=args.selfcheck)
    if args.json:
        print(json.dumps(d.to_dict(), indent=2, default=str))
    else:
        print(format_diagnosis(d), flush=True)
    for problem in d.problems:
        print(f"vizoo doctor: {problem}", file=sys.stderr)
    return 0 if d.ok else 1


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("doctor", help="versions, imports and a tiny export self-check, for bug reports",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-selfcheck", dest="selfcheck", action="store_false",
                   help="skip exporting and verifying a tiny model (a few seconds)")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object")
    p.set_defaults(func=_cmd_doctor)

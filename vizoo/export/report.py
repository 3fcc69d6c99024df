"""The export report: per format and precision the file, its size, parity, latency and status.

Written as ``report.json`` beside the files. Status is ``ok`` (verified within bounds),
``failed`` (conversion failed or parity out of bounds; ``reason`` says why) or ``unverified``
(the file could not be run here; ``reason`` says what stopped it). Never a silent pass.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("ok", "failed", "unverified")


@dataclass
class FormatResult:
    format: str
    precision: str
    status: str
    reason: str = ""
    file: str | None = None
    size_bytes: int | None = None
    verification: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def int8_mode(self) -> str | None:
        """The TFLite int8 mode of the file (chosen by auto or given), None for other files."""
        return self.details.get("int8_mode") or self.details.get("quantization", {}).get("int8_mode")

    def parity(self, function: str | None = None) -> dict[str, Any]:
        """Parity metrics of one function (the first one by default)."""
        fns = self.verification.get("functions", {})
        if not fns:
            return {}
        return fns[function or next(iter(fns))]["parity"]

    def summary(self) -> str:
        head = f"{self.format:<7} {self.precision:<5} {self.status:<10}"
        if self.status == "failed" or self.status == "unverified":
            return f"{head} {self.reason}"
        size = f"{self.size_bytes / 1e6:.2f} MB" if self.size_bytes else ""
        if size and self.details.get("size_vs_fp32"):
            ratio = self.details["size_vs_fp32"]
            size += f" ({ratio:.3g}x fp32 = 1/{1 / ratio:.1f})"
        parts = [size]
        for name, fn in self.verification.get("functions", {}).items():
            p = fn["parity"]
            top1 = f", top-1 {p['top1_agreement']:.0%}" if p.get("top1_agreement") is not None else ""
            if p.get("topk_detections_agreement") is not None:
                top1 += f", top-{p['topk']} detections {p['topk_detections_agreement']:.0%}"
            parts.append(f"{name}: max|d| {p['max_abs_diff']:.2g} ({p['rel_max_abs_diff']:.2g} of range), "
                         f"cos {p['cosine_min']:.6f}{top1}")
        if self.latency and "median_ms" in self.latency:
            parts.append(f"latency {self.latency['median_ms']:.2f} ms")
        if self.details.get("xnnpack"):  # why a file is slow on a phone: a graph split by XNNPACK
            from .tflite import describe_delegation

            parts.append(describe_delegation(self.details["xnnpack"]))
        low = self.details.get("lowbit")
        if low:  # what a low-bit file holds and that its weights are QuEST's
            text = {"native": "native", "fakequant": "fake-quant float graph"}[low["kind"]]
            lossless = low.get("weights_lossless")
            if lossless:
                text += (f", int weights {lossless['bit_identical']}/{lossless['layers']} layers bit-identical to "
                         "QuEST's")
            grids = low.get("activation_grids")
            if grids:
                text += f", {grids['carried']}/{grids['quantizers']} activation grids carried"
            sets = low["activation_set"]
            if sets["num_sets"] == 1:
                text += ", the model's single activation set"
            elif sets["index"] is None:
                text += f", all {sets['num_sets']} activation sets (chosen from the timestep)"
            else:
                text += f", activation set of timestep {sets['timestep']} (1 of {sets['num_sets']})"
            parts.append(text)
        for key in ("int8_mode", "fp16_mode"):  # which mode auto kept, and why the others were left
            if self.details.get(key):
                parts.append(f"{key.split('_')[0]} {self.details[key]}" + (f" ({self.reason})" if self.reason else ""))
        return f"{head} {self.file}  " + "; ".join(x for x in parts if x)


@dataclass
class ExportReport:
    model: str
    input: dict[str, Any]
    results: list[FormatResult]
    converters: dict[str, str]
    vizoo_version: str
    pytorch_latency: dict[str, Any] | None = None
    export_form_layers: list[str] = field(default_factory=list)
    path: str | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def result(self, format: str, precision: str = "fp32") -> FormatResult:
        for r in self.results:
            if r.format == format and r.precision == precision:
                return r
        raise KeyError(f"no {format} {precision} result in this report")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"{self.model}  input {self.input['shapes']}  (report: {self.path})"]
        lines += ["  " + r.summary() for r in self.results]
        if self.pytorch_latency:
            lines.append(f"  PyTorch eager latency {self.pytorch_latency['median_ms']:.2f} ms "
                         f"({self.pytorch_latency['threads']} threads, batch {self.pytorch_latency['batch']})")
        return "\n".join(lines)


def converter_versions() -> dict[str, str]:
    """Versions of torch, timm and every converter/runtime the formats table names."""
    from .formats import FORMATS

    out = {}
    dists = ["torch", "timm"] + [d for f in FORMATS.values() for d in f.versions_of] + ["tflite-runtime"]
    for dist in dists:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def path_size(path: str | Path) -> int:
    """Bytes of a file, or of every file under a directory (.mlpackage)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size

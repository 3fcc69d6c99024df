"""The export formats, as ONE table that the API, the CLI, the report and the benchmarks read.

Adding a format is one row here plus one module with ``convert(...)`` and ``open_runner(...)``
(Ultralytics' exporter is built the same way). Option values: the first one listed is the default.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

#: low-bit files of a QuEST-quantized UNet (``vizoo.quant.QuantUNet``, see :mod:`vizoo.export.lowbit`)
LOWBIT_PRECISIONS = ("w4a8", "w8a8", "w4a4")
PRECISIONS = ("fp32", "fp16", "int8") + LOWBIT_PRECISIONS


@dataclass(frozen=True)
class ExportFormat:
    name: str
    title: str
    suffix: str
    precisions: tuple[str, ...]
    #: option name -> allowed values (first = default), documented in ``option_help``
    options: dict[str, tuple[Any, ...]]
    option_help: dict[str, str]
    #: Python modules the converter needs (all come with ``pip install 'vizoo[export]'``)
    requires: tuple[str, ...]
    #: what runs the file to verify it
    runtime: str
    #: module implementing ``convert(spec, path, precision, options, calibration)`` and
    #: ``open_runner(path, ...)``
    module: str
    #: PyPI distributions whose versions the report records
    versions_of: tuple[str, ...] = field(default=())

    @property
    def cli_arg(self) -> str:
        return self.name

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in; unknown values raise with the allowed ones listed."""
        out = {}
        for key, allowed in self.options.items():
            value = given.get(key)
            if value is None:
                value = allowed[0]
            if value not in allowed:
                raise ValueError(f"{self.name} option {key}={value!r} is not one of {list(allowed)}")
            out[key] = value
        return out


FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat(
        name="coreml", title="CoreML", suffix=".mlpackage", precisions=PRECISIONS,  # w4a8/w8a8 native, w4a4 fake-quant
        options={
            "coreml_inputs": ("image", "both", "tensor"),
            "compress": ("none", "linear8", "linear4", "palettize4"),
            "fp16_mode": ("auto", "all", "mixed"),
            "package": ("compact", "full"),
        },
        option_help={
            "coreml_inputs": "image: one function 'main' taking a camera image (ct.ImageType, "
                             "mean/std folded in) with the class labels, at the lowest deployment "
                             "target its ops allow (iOS 15 for the zoo's models; iOS 16 with "
                             "compressed weights); both: also a function 'tensor' taking a "
                             "normalised tensor, one multifunction package (iOS 18+); tensor: "
                             "the tensor function only",
            "compress": "weight compression by coremltools.optimize: 8-bit linear (iOS 16+), 4-bit "
                        "linear (iOS 18+) or 4-bit k-means palettization (iOS 16+); int8 "
                        "precision means linear8",
            "fp16_mode": "files computed in fp16 (fp16, int8): all: every op in fp16; mixed: only "
                         "conv/linear/matmul in fp16, the other ops (norms, softmax, residual adds) "
                         "in fp32; auto: all, else mixed when all misses the bounds (without "
                         "verification auto keeps all)",
            "package": "compact: identical constants merged, float constants under 256 elements kept in "
                       "the program (not the weight file, where each costs a 64-byte header), internal values "
                       "renamed to short ids and coremltools' ExecuTorch debug map dropped (the same program, "
                       "op for op; what matters beside 4-bit weights); full: as coremltools writes it "
                       "(readable value names)",
        },
        requires=("coremltools",),
        runtime="vizoo.export.mil (NumPy MIL executor; MLModel.predict on macOS)",
        module="vizoo.export.coreml",
        versions_of=("coremltools",),
    ),
    ExportFormat(
        name="tflite", title="TFLite", suffix=".tflite",
        precisions=("fp32", "fp16", "int8", "w8a8", "w4a4"),  # w8a8 full integer, w4a4 fake-quant
        options={
            "layout": ("nhwc", "nchw"),
            "int8_mode": ("auto", "full", "mixed", "dynamic"),
        },
        option_help={
            "layout": "image input layout: NHWC is what Android camera pipelines hand over",
            "int8_mode": "auto: the most integer file that passes verification and is not "
                         "slower than the fp32 file (timed here), trying full, then mixed, then "
                         "dynamic; if every verified one is slower, the fastest, and the report says "
                         "which ops cost (full when verify=False); full: int8 weights and "
                         "activations in every op but RSQRT/SQRT/DIV/MAXIMUM/SOFTMAX (float: XNNPACK has no "
                         "int8 kernel for them), "
                         "calibrated on a representative dataset (int8 I/O); mixed: the weight layers in int8 "
                         "(calibrated), softmax/norms/other ops float (float I/O); dynamic: int8 "
                         "weights, activations quantized at run time (float I/O, no calibration)",
        },
        requires=("litert_torch", "ai_edge_litert", "ai_edge_quantizer"),
        runtime="ai-edge-litert Interpreter (tflite_runtime if that is what is installed)",
        module="vizoo.export.tflite",
        versions_of=("litert-torch", "ai-edge-litert", "ai-edge-quantizer"),
    ),
)}


def get_format(name: str) -> ExportFormat:
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown export format {name!r}; choose from {list(FORMATS)}") from None


def all_options() -> dict[str, tuple[ExportFormat, tuple[Any, ...], str]]:
    """Every format option by name (option names are unique across formats)."""
    return {k: (f, v, f.option_help[k]) for f in FORMATS.values() for k, v in f.options.items()}

"""TFLite: torch.export -> litert-torch -> .tflite, run by ai-edge-litert.

The image input is NHWC by default (what Android camera pipelines hand over; NCHW on request).
fp16 and int8 files are made from the fp32 flatbuffer by ai-edge-quantizer. Labels, the input's
normalisation and quantization parameters are embedded as flatbuffer metadata named ``vizoo``
and written beside the file as ``<file>.json`` for apps.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..layers.export_mode import export_mode
from ..quiet import native_stderr_filtered
from . import quantize
from .errors import ConversionError, MissingDependencyError, diagnose
from .formats import LOWBIT_PRECISIONS
from .spec import ModelSpec
from .verify import RunFunction

METADATA_NAME = "vizoo"
SIGNATURE = "serving_default"


def interpreter_class() -> tuple[type, str]:
    """ai-edge-litert's Interpreter, or tflite_runtime's for users who have only that."""
    try:
        with native_stderr_filtered():
            from ai_edge_litert.interpreter import Interpreter

        return _Quiet(Interpreter), "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]

        return _Quiet(Interpreter), "tflite_runtime"
    except ImportError:
        raise MissingDependencyError("running .tflite files needs ai-edge-litert: install "
                                     "vizoo[export] (pip install 'vizoo[export]')") from None


class _Quiet:
    """An Interpreter class whose instances are built, and their tensors allocated, with the
    runtime's "Created TensorFlow Lite XNNPACK delegate" banner hidden (see ``vizoo.quiet``)."""

    def __init__(self, cls: type):
        self.cls = cls

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with native_stderr_filtered():
            it = self.cls(*args, **kwargs)
            it.allocate_tensors()
        return it


def _to_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, *range(2, x.dim()), 1).contiguous()


def convert(spec: ModelSpec, path: Path, precision: str, options: dict[str, Any],
            calibration_data: Any = None) -> dict[str, Any]:
    """Write ``path`` (a .tflite); return what the report and the sidecar need."""
    with native_stderr_filtered():
        import litert_torch

    litert_torch.config.show_progress = False
    nhwc = options["layout"] == "nhwc" and spec.image_input
    module, args = spec.module, spec.example_inputs
    if nhwc:
        module = litert_torch.to_channel_last_io(module, args=[0])
        args = (_to_nhwc(args[0]), *args[1:])
    with export_mode(spec.model):
        key = ("tflite_fp32", nhwc)
        if key not in spec.cache:  # every precision starts from the same fp32 flatbuffer
            try:
                with native_stderr_filtered():
                    spec.cache[key] = (_convert_signatures(spec, nhwc, litert_torch) if spec.functions
                                       else bytes(litert_torch.convert(module.eval(), args).model_content()))
            except Exception as e:  # noqa: BLE001 - every converter failure gets explained
                raise diagnose(e, "tflite", spec.module, spec.example_inputs,
                               lambda m, a: litert_torch.convert(m.eval(), a)) from e
        data = spec.cache[key]
        quant: dict[str, Any] = {}
        if precision == "w4a4":
            quant = {"method": "fake-quant float graph: QuEST's dequantized 4-bit weights as float constants, "
                               "activations rounded on the model's grids by float ops (no 4-bit kernels exist)"}
        elif precision == "w8a8":
            data, quant = _full_integer_lowbit(spec, data, calibration_data, nhwc)
        elif precision == "fp16":
            data = quantize.tflite_fp16(data)
            quant = {"method": "ai-edge-quantizer FLOAT_CASTING: fp16 weights, fp32 compute"}
        elif precision == "int8" and options["int8_mode"] == "dynamic":
            data = quantize.tflite_int8_dynamic(data)
            quant = {"method": "ai-edge-quantizer dynamic_wi8_afp32: int8 weights, activations "
                               "quantized at run time", "int8_mode": "dynamic"}
        elif precision == "int8":
            mode = options["int8_mode"]
            if spec.functions:
                raise ValueError("full-integer int8 of a file with several signatures is not supported (each "
                                 "would need its own calibration); export fp32/fp16, or int8 with "
                                 "int8_mode='dynamic'")
            if mode not in quantize.STATIC_INT8_METHODS:
                raise ValueError(f"TFLite int8_mode {mode!r} is resolved by vizoo.export (auto) or is "
                                 f"one of full, mixed, dynamic")
            samples = quantize.calibration_samples(spec, calibration_data)
            calib = _calibration_feed(samples, data, nhwc)
            range_key = ("tflite_int8_ranges", nhwc, id(calibration_data))  # one calibration per export
            data, spec.cache[range_key] = quantize.tflite_int8_static(data, calib, mode,
                                                                      ranges=spec.cache.get(range_key))
            quant = {"method": quantize.STATIC_INT8_METHODS[mode], "int8_mode": mode,
                     "calibration_samples": len(samples),
                     "calibration_data": "bundled photographs" if calibration_data is None
                     else "user data"}
        _check_loads(data, spec)
    io = _io_details(data)
    meta = sidecar(spec, precision, io, nhwc, quant)
    data = embed_metadata(data, meta)
    path.write_bytes(data)
    out = {"input_layout": "NHWC" if nhwc else "NCHW", "io": io, "quantization": quant,
           "xnnpack": xnnpack_delegation(data), "sidecar": meta}
    if precision in LOWBIT_PRECISIONS:
        out["judged_as"] = spec.cache["lowbit"]["plan"].judged_as
    return out


#: Tensors of a diffusion UNet's timestep path that full-integer files keep float (litert-torch
#: names tensors by module path): the timestep input and its sinusoidal embedding. In int8 the
#: timestep (0..999) would be rounded to steps of about 4, which moves the embedding's high
#: frequencies entirely; the embedding is quantized where the model quantizes it, at the input
#: of ``time_embedding.linear_1``.
TIMESTEP_FLOAT_SCOPES = (r".*Timesteps_time_proj.*",)

#: A diffusion UNet's full-integer file takes and returns float32 (int8 inside, a QUANTIZE at the
#: start and a DEQUANTIZE at the end): ai-edge-quantizer quantizes all graph inputs or none, and
#: an int8 timestep would be rounded to steps of about 4 (see TIMESTEP_FLOAT_SCOPES); a sampler
#: works in float anyway.
#: Ops a diffusion UNet's full-integer file keeps float: the attention matmuls (XNNPACK runs no
#: int8 BATCH_MATMUL of two activations: each one ran outside the delegate and split the graph)
#: and the attention's GroupNorm over tokens (a 3-D GroupNorm whose int8 eps ADD and broadcast ADD
#: XNNPACK refuses). Measured on the QuEST UNet: see benchmarks/quest_export.py.
DIFFUSION_FLOAT_OPS = ("BATCH_MATMUL",)
DIFFUSION_FLOAT_SCOPES = (r".*attention_processor\.Attention\w*/vizoo\.layers\.export_swaps\.GroupNormExport.*",)


def _full_integer_lowbit(spec: ModelSpec, data: bytes, calibration_data: Any, nhwc: bool
                         ) -> tuple[bytes, dict[str, Any]]:
    """W8A8 full-integer file of a QuantUNet's float graph (QuEST's dequantized 8-bit weights).

    ai-edge-quantizer quantizes the weights again (symmetric per channel: TFLite's int8 kernels
    take no weight zero point, so QuEST's asymmetric grid cannot be carried exactly; on weights
    already on an 8-bit grid the change is below half a step) and calibrates every activation
    tensor on the calibration inputs (QuEST's calibration set when given): TFLite quantizes every
    tensor, not only layer inputs, so QuEST's input scales alone do not define the file.
    """
    samples = quantize.calibration_samples(spec, calibration_data)
    calib = _calibration_feed(samples, data, nhwc)
    diffusion = spec.task == "diffusion"
    scopes = TIMESTEP_FLOAT_SCOPES + DIFFUSION_FLOAT_SCOPES if diffusion else ()
    float_ops = DIFFUSION_FLOAT_OPS if diffusion else ()
    float_io = ("INPUT", "OUTPUT") if diffusion else ()
    data, _ = quantize.tflite_int8_static(data, calib, "full", float_scopes=scopes,
                                          float_ops=float_ops + float_io)
    source = ("the calibration set you gave" if hasattr(calibration_data, "t") else "your inputs"
              if calibration_data is not None
              else "drawn diffusion inputs (x_t ~ N(0, 1), timesteps over the schedule)")
    method = quantize.STATIC_INT8_METHODS["full"]
    if diffusion:
        method = (method.replace(", int8 I/O", "") + ", and the attention matmuls and the timestep embedding; "
                  "float32 I/O (int8 inside: the timestep must not be rounded to int8)")
    return data, {"method": method + "; weights: QuEST's dequantized 8-bit weights re-quantized symmetric per "
                            "channel; activations: calibrated here, not QuEST's scales",
                  "int8_mode": "full", "calibration_samples": len(samples), "calibration_data": source,
                  "float_scopes": list(scopes), "float_ops": list(float_ops)}


#: Ops that do arithmetic with weights (the work int8 speeds up); the others are "glue" for
#: :func:`xnnpack_delegation`'s op mix.
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL",
              "CONV_3D")


def xnnpack_delegation(model: bytes | str | os.PathLike, threads: int = 2) -> dict[str, Any]:
    """How the XNNPACK delegate runs a .tflite: partitions and the ops it left outside.

    Read from the interpreter after delegation (not guessed from the graph): ``allocate_tensors``
    applies the default XNNPACK delegate, which appends one ``DELEGATE`` node per partition after
    the graph's own nodes. An original node was taken by a partition when one of its outputs is a
    partition output, or when every consumer of its outputs was taken too (a tensor internal to a
    partition); every other node runs outside XNNPACK, in TFLite's own kernels, and each one splits
    the graph. Returns ``{"partitions", "ops", "ops_outside": {op: count}, "op_counts"}`` (main
    subgraph), or ``{"error": ...}`` when the runtime does not expose its nodes.
    """
    Interpreter, runtime = interpreter_class()
    try:
        if isinstance(model, (bytes, bytearray)):
            it = Interpreter(model_content=bytes(model), num_threads=threads)
        else:
            it = Interpreter(model_path=str(model), num_threads=threads)
        nodes = it._get_ops_details()  # private in ai-edge-litert 2.3 / tflite_runtime; no public twin
        graph_outputs = {int(t) for t in it._interpreter.OutputIndices()}
    except Exception as e:  # noqa: BLE001 - an informational field must not fail the export
        return {"error": f"{runtime} does not expose its delegated nodes: {type(e).__name__}: {e}"}
    return _partitions_from_nodes(nodes, graph_outputs)


def _partitions_from_nodes(nodes: list[dict[str, Any]], graph_outputs: set[int]) -> dict[str, Any]:
    """The partition count and the nodes outside any partition, from the delegated node list."""
    delegates = [n for n in nodes if n["op_name"] == "DELEGATE"]
    ops = [n for n in nodes if n["op_name"] != "DELEGATE"]
    made_by_delegate = {int(t) for n in delegates for t in n["outputs"]}
    read_by_delegate = {int(t) for n in delegates for t in n["inputs"]}
    consumers: dict[int, list[int]] = {}
    for n in ops:
        for t in n["inputs"]:
            if t >= 0:
                consumers.setdefault(int(t), []).append(int(n["index"]))
    taken: dict[int, bool] = {}
    for n in reversed(ops):  # nodes are in execution order: consumers are decided first
        outs = [int(t) for t in n["outputs"] if t >= 0]
        taken[int(n["index"])] = any(t in made_by_delegate for t in outs) or (
            bool(outs) and bool(delegates) and all(
                t not in graph_outputs and t not in read_by_delegate and consumers.get(t)
                and all(taken.get(c, False) for c in consumers[t]) for t in outs))
    outside: dict[str, int] = {}
    counts: dict[str, int] = {}
    for n in ops:
        counts[n["op_name"]] = counts.get(n["op_name"], 0) + 1
        if not taken[int(n["index"])]:
            outside[n["op_name"]] = outside.get(n["op_name"], 0) + 1
    by_count = lambda d: dict(sorted(d.items(), key=lambda kv: (-kv[1], kv[0])))  # noqa: E731
    return {"partitions": len(delegates), "ops": len(ops), "ops_outside": by_count(outside),
            "op_counts": by_count(counts)}


def describe_delegation(info: dict[str, Any] | None) -> str:
    """One phrase for summaries: "1 XNNPACK partition" or "38 XNNPACK partitions (outside: RSQRT×35)"."""
    if not info:
        return ""
    if "error" in info:
        return "XNNPACK partitions unknown"
    n = info["partitions"]
    text = f"{n} XNNPACK partition{'s' if n != 1 else ''}"
    if info["ops_outside"]:
        text += " (outside: " + ", ".join(f"{op}×{k}" for op, k in info["ops_outside"].items()) + ")"
    return text


def _check_loads(data: bytes, spec: ModelSpec) -> None:
    """A file the runtime cannot load is a failed conversion (e.g. STABLEHLO_SORT)."""
    Interpreter, _ = interpreter_class()
    try:
        it = Interpreter(model_content=data)
        it.allocate_tensors()
    except Exception as e:  # noqa: BLE001
        err = diagnose(e, "tflite", spec.module, spec.example_inputs)
        raise ConversionError("tflite", err.op, err.module_path, err.module_type, err.fix,
                              "the file converts but the TFLite runtime cannot load it: "
                              + err.detail) from e


def _signature_inputs(data: bytes) -> dict[str, np.dtype]:
    """The file's signature inputs in order, with the dtype each takes."""
    Interpreter, _ = interpreter_class()
    it = Interpreter(model_content=data)
    details = it.get_signature_runner(SIGNATURE).get_input_details()
    return {name: np.dtype(details[name]["dtype"]) for name in it.get_signature_list()[SIGNATURE]["inputs"]}


def _calibration_feed(samples: list[tuple[torch.Tensor, ...]], data: bytes, nhwc: bool) -> list[dict[str, np.ndarray]]:
    """Calibration samples keyed by the file's input names, the image NHWC when the file is, each
    in the dtype its input takes (an int64 class label becomes the file's int32)."""
    inputs = _signature_inputs(data)
    dtypes = list(inputs.values())
    return quantize.as_signature_inputs(
        samples, list(inputs), lambda i, x: (_to_nhwc(x) if nhwc and i == 0 else x).numpy().astype(dtypes[i]))


def _convert_signatures(spec: ModelSpec, nhwc: bool, litert_torch: Any) -> bytes:
    """One flatbuffer, one signature per function of ``spec`` (e.g. per task of a continual
    model); litert-torch stores tensors with identical values once, so shared weights cost once."""
    converter: Any = litert_torch
    for name, sub in spec.functions.items():
        module, args = sub.module.eval(), sub.example_inputs
        if nhwc:
            module = litert_torch.to_channel_last_io(module, args=[0])
            args = (_to_nhwc(args[0]), *args[1:])
        converter = converter.signature(name, module.eval(), args)
    return bytes(converter.convert().model_content())


def signatures(data: bytes | str | os.PathLike) -> list[str]:
    """The signature names of a .tflite (file or bytes), in file order."""
    Interpreter, _ = interpreter_class()
    it = (Interpreter(model_content=bytes(data)) if isinstance(data, (bytes, bytearray))
          else Interpreter(model_path=str(data)))
    return list(it.get_signature_list())


def _io_details(data: bytes, signature: str | None = None) -> dict[str, list[dict[str, Any]]]:
    Interpreter, _ = interpreter_class()
    runner = Interpreter(model_content=data).get_signature_runner(signature or signatures(data)[0])

    def describe(details: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for name, d in details.items():
            scale, zero = d["quantization"]
            out.append({"name": name, "shape": [int(v) for v in d["shape"]],
                        "dtype": np.dtype(d["dtype"]).name,
                        **({"scale": float(scale), "zero_point": int(zero)} if scale else {})})
        return out

    return {"inputs": describe(runner.get_input_details()),
            "outputs": describe(runner.get_output_details())}


def sidecar(spec: ModelSpec, precision: str, io: dict[str, Any], nhwc: bool,
            quant: dict[str, Any]) -> dict[str, Any]:
    """What an app needs to feed the file and read its answer."""
    from .. import __version__

    meta: dict[str, Any] = {
        "format": "vizoo-tflite-1", "model": spec.name, "vizoo_version": __version__,
        "license": spec.license, "precision": precision,
        "input_layout": "NHWC" if nhwc else "NCHW", "inputs": io["inputs"], "outputs": io["outputs"],
        "output_names": spec.output_names,
    }
    if spec.image_input:
        meta["preprocessing"] = {
            "pixels": "RGB" if spec.input_size[0] == 3 else f"{spec.input_size[0]} channel(s)",
            "formula": "x = (pixel / 255 - mean) / std, per channel"
                       + ("; then q = round(x / scale) + zero_point for int8 inputs"
                          if any("scale" in d for d in io["inputs"]) else ""),
            "mean": list(spec.mean), "std": list(spec.std),
            "resize": {"interpolation": spec.cfg.get("interpolation", "bilinear"),
                       "crop_pct": spec.cfg.get("crop_pct", 1.0)},
        }
    if spec.classifier:
        meta["labels"] = spec.class_labels()
        meta["postprocessing"] = "logits: softmax for probabilities, argmax for the class"
    if spec.functions:  # several signatures: each one's own classes (the top-level labels are the first's)
        meta["signatures"] = {name: {"labels": sub.class_labels() if sub.classifier else None,
                                     "num_classes": sub.num_classes, "model": sub.name}
                              for name, sub in spec.functions.items()}
    if quant:
        meta["quantization"] = quant
    return meta


def embed_metadata(data: bytes, meta: dict[str, Any]) -> bytes:
    """Store ``meta`` as JSON in the flatbuffer's metadata table (name ``vizoo``)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    buf = schema.BufferT()
    buf.data = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    model.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if _name(m) != METADATA_NAME] + [entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``vizoo`` metadata of a .tflite (empty dict if it has none)."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(Path(path).read_bytes()))
    for m in model.metadata or []:
        if _name(m) == METADATA_NAME:
            return json.loads(bytes(model.buffers[m.buffer].data).decode())
    return {}


def _name(entry: Any) -> str:
    return entry.name.decode() if isinstance(entry.name, bytes) else str(entry.name)


class TFLiteRunner:
    """Runs a .tflite like an app would: NCHW float inputs in, float outputs back.

    Takes care of the NHWC layout and of int8 inputs/outputs (scale and zero point).
    """

    def __init__(self, path: str | os.PathLike, threads: int = 2, layout: str | None = None,
                 signature: str | None = None):
        Interpreter, self.runtime = interpreter_class()
        self.path = Path(path)
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        names = list(self.interpreter.get_signature_list())
        if signature is not None and signature not in names:
            raise ValueError(f"{self.path.name} has no signature {signature!r}; it has: {', '.join(names)}")
        self.signature_name = signature or (SIGNATURE if SIGNATURE in names or not names else names[0])
        self.signature = self.interpreter.get_signature_runner(self.signature_name)
        self.inputs = self.signature.get_input_details()
        self.outputs = self.signature.get_output_details()
        if layout is None:
            meta = _read_sidecar_or_metadata(self.path)
            layout = meta.get("input_layout", "NCHW")
        self.nhwc = layout.upper() == "NHWC"

    def __call__(self, *inputs: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        feed = {}
        for i, (name, d) in enumerate(self.inputs.items()):
            x = np.asarray(inputs[i], dtype=np.float32)
            if self.nhwc and i == 0 and x.ndim >= 3:
                x = np.moveaxis(x, 1, -1)
            scale, zero = d["quantization"]
            if scale:
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / scale) + zero, info.min, info.max)
            feed[name] = np.ascontiguousarray(x.astype(d["dtype"]))
        out = self.signature(**feed)
        results = []
        for name in sorted(out, key=_output_order):
            y = out[name]
            scale, zero = self.outputs[name]["quantization"]
            results.append((y.astype(np.float32) - zero) * scale if scale else y.astype(np.float32))
        return results

    def function(self) -> RunFunction:
        return RunFunction(self.signature_name, "tensor", lambda sample: self(*sample))



def timed_invoke(path: str | os.PathLike | bytes, threads: int = 2) -> tuple[Callable[[], None], int]:
    """A zero-argument call that only runs the graph (inputs set once), and the file's batch.

    ``path``: a .tflite file, or its bytes. Its own interpreter: a signature runner holds
    references that forbid raw ``invoke``.
    """
    Interpreter, _ = interpreter_class()
    if isinstance(path, (bytes, bytearray)):
        it = Interpreter(model_content=bytes(path), num_threads=threads)
    else:
        it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    details = it.get_input_details()
    rng = np.random.default_rng(0)
    for d in details:
        x = rng.standard_normal(d["shape"])
        if np.issubdtype(d["dtype"], np.integer):
            # quantize a varied input: a constant one (zeros) makes per-group variances 0, and an
            # int8 DIV by its zero point aborts the interpreter (EvoNorm-S0, full-integer files)
            scale, zero_point = d.get("quantization", (0.0, 0))
            info = np.iinfo(d["dtype"])
            # an unquantized integer input is an index (class label, timestep): 0 is always valid,
            # while a random integer made EMBEDDING_LOOKUP fail (ddpm_digits16_cond)
            q = np.round(x / scale) + zero_point if scale else np.zeros(d["shape"])
            x = np.clip(q, info.min, info.max)
        it.set_tensor(d["index"], x.astype(d["dtype"]))
    return it.invoke, int(details[0]["shape"][0])


def _output_order(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name.rsplit("_", 1)[-1] if ch.isdigit())
    return (int(digits) if digits else 0, name)


def _read_sidecar_or_metadata(path: Path) -> dict[str, Any]:
    side = path.with_name(path.name + ".json")
    if side.is_file():
        try:
            return json.loads(side.read_text())
        except json.JSONDecodeError:
            pass
    try:
        return read_metadata(path)
    except Exception:  # noqa: BLE001 - a file without readable metadata: assume NCHW
        return {}


def open_runner(path: str | os.PathLike, spec: ModelSpec | None = None, threads: int = 2) -> list[RunFunction]:
    """One RunFunction per signature of the file."""
    return [TFLiteRunner(path, threads=threads, signature=name).function() for name in signatures(path)]


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")

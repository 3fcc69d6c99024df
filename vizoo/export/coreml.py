"""CoreML: torch.export -> coremltools ML Program (.mlpackage), checked by the MIL executor.

By default the package holds one function, ``main``, which takes a camera image
(``ct.ImageType``; the model's mean/std applied in the graph, since ImageType has one scale) and
carries the class labels (``ClassifierConfig``), at the lowest deployment target its ops allow:
what an app needs, loadable on as many devices as possible. ``coreml_inputs="both"`` adds a
``tensor`` function (normalised NCHW in, raw outputs) sharing the weights, in one multifunction
package (iOS 18). Conversion goes through ``torch.export(...).run_decompositions({})``: the
``jit.trace`` path breaks under NumPy 2 for topk/gather and grouped variance.
"""
from __future__ import annotations

import contextlib
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..layers.export_mode import export_mode
from ..quiet import third_party_bars_hidden
from .coreml_compact import compact_package
from .errors import diagnose
from .formats import LOWBIT_PRECISIONS
from .spec import ImageInput, ModelSpec
from .verify import RunFunction, Unverifiable

IMAGE_FUNCTION, TENSOR_FUNCTION = "main", "tensor"

#: coremltools graph passes that break on some valid graphs, keyed by the error they raise; a
#: conversion that fails so is retried without that pass (the MIL executor still verifies it).
#: reduce_transposes: AFFNet at 32 px (1x1 maps) -> "Invalid target shape in `reshape`" (9.0).
PASS_WORKAROUNDS = {"Invalid target shape in `reshape`": "common::reduce_transposes"}


def _exported(spec: ModelSpec, image: bool) -> Any:
    """The torch.export program (cached on the spec: every precision converts the same one)."""
    key = ("coreml_ep", image)
    if key not in spec.cache:
        module = ImageInput(spec.module, spec.mean, spec.std).eval() if image else spec.module
        args = (torch.rand(spec.example_inputs[0].shape),) if image else spec.example_inputs
        with export_mode(spec.model), _coreml_group_norm(spec.model):
            try:
                spec.cache[key] = torch.export.export(module, args).run_decompositions({})
            except Exception as e:  # noqa: BLE001
                raise diagnose(e, "coreml", spec.module, spec.example_inputs) from e
    return spec.cache[key]


class GroupNormAsLayerNorm(torch.nn.Module):
    """``nn.GroupNorm`` as one MIL ``layer_norm`` over each group (reshape, layer_norm, per-channel
    scale and shift, reshape): the same statistics (biased variance, eps) in 5 ops where
    coremltools' own GroupNorm lowering takes 14 and the exporter's XNNPACK form (grouped 1x1
    convs, for TFLite) more, with constant conv weights. Why it matters: beside 4-bit weights
    the program description is a large part of a package (the QuEST UNet: 30 GroupNorms)."""

    def __init__(self, norm: torch.nn.GroupNorm):
        super().__init__()
        # the norm's own parameters, not the norm as a child (export_mode would swap it again)
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, g = x.shape[0], x.shape[1], self.num_groups
        y = torch.nn.functional.layer_norm(x.reshape(b, g, c // g, -1), (c // g, x[0, 0].numel()), eps=self.eps)
        if self.weight is not None:  # per channel on (B, G, C/G, HW): a (1, C, 1, 1) mul + add would be
            # turned into a batch_norm by coremltools, storing zero means and unit variances beside it
            y = y * self.weight.view(g, c // g, 1) + self.bias.view(g, c // g, 1)
        return y.reshape(x.shape)


@contextlib.contextmanager
def _coreml_group_norm(model: torch.nn.Module) -> Iterator[None]:
    """Every GroupNorm (or its XNNPACK export form) of ``model`` as :class:`GroupNormAsLayerNorm`
    while the program is captured; the originals are put back after."""
    from ..layers.export_swaps import GroupNormExport

    done = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            norm = child.norm if isinstance(child, GroupNormExport) else child
            if type(norm) is torch.nn.GroupNorm:
                setattr(parent, name, GroupNormAsLayerNorm(norm))
                done.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in reversed(done):
            setattr(parent, name, child)


def reference_forms(spec: ModelSpec) -> Any:
    """The float ops a quantized file's reference computes as this format's file does (GroupNorm
    as one layer_norm per group): the fake-quant model then differs from the file only where float32
    rounding differs, not by a GroupNorm formula, so fewer activations land on the other side of a
    rounding boundary. Same quantization, same numbers up to float32 rounding."""
    return _coreml_group_norm(spec.model)


#: coremltools graph passes left out of low-bit conversions because they change float arithmetic
#: that decides rounding: ``divide_to_multiply`` turns x / Δ into x · (1/Δ), which differs in the last
#: bit for some x, and an activation on a grid boundary then rounds to the other neighbour.
QUANT_EXACT_PASSES = ("common::divide_to_multiply",)


#: Deployment targets, oldest first. An ML Program needs iOS 15 / macOS 12; weight compression
#: (constexpr ops) needs iOS 16; 4-bit linear weights and multifunction packages need iOS 18.
TARGET_LADDER = ("iOS15", "iOS16", "iOS17")
MACOS_OF_IOS = {"iOS15": "macOS12", "iOS16": "macOS13", "iOS17": "macOS14", "iOS18": "macOS15"}


def deployment_targets(mode: str, compress: str) -> tuple[str, ...]:
    """The targets to try, oldest first: the file gets the lowest one whose ops convert the model,
    so it loads on as many of the devices an app supports as its ops allow."""
    if mode == "both" or compress == "linear4":
        return ("iOS18",)
    floor = "iOS16" if compress in ("linear8", "palettize4") else "iOS15"
    return TARGET_LADDER[TARGET_LADDER.index(floor):]


def _convert_module(module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
    """Plain fp32 conversion of any (sub)module: what diagnosis bisects with."""
    import coremltools as ct

    ep = torch.export.export(module, args).run_decompositions({})
    return ct.convert(ep, minimum_deployment_target=ct.target.iOS17, convert_to="mlprogram",
                      compute_precision=ct.precision.FLOAT32)


#: fp16_mode="mixed": the ops computed in fp16 (the weight layers, nearly all the MACs); every
#: other op (layer norm, softmax, GELU, residual adds, reductions) stays fp32. fp16 arithmetic
#: through a ViT's elementwise ops is what puts a small ViT past the fp16 bound (README).
FP16_MIXED_OPS = frozenset({"conv", "conv_transpose", "linear", "matmul"})


def _compute_precision(precision: str, fp16_mode: str) -> Any:
    import coremltools as ct

    if precision == "fp32":
        return ct.precision.FLOAT32
    if fp16_mode == "mixed":
        return ct.transform.FP16ComputePrecision(op_selector=lambda op: op.op_type in FP16_MIXED_OPS)
    if fp16_mode != "all":
        raise ValueError(f"CoreML fp16_mode {fp16_mode!r} is resolved by vizoo.export (auto) or is all/mixed")
    return ct.precision.FLOAT16


def _convert_one(spec: ModelSpec, image: bool, precision: str, target: Any, fp16_mode: str = "all",
                 explain_failure: bool = True) -> Any:
    """One function of the package. ``explain_failure=False``: raise the converter's own error
    at once (a lower deployment target being tried), without the op-by-op diagnosis."""
    import coremltools as ct

    ep = _exported(spec, image)
    compute = _compute_precision(precision, fp16_mode)
    kwargs: dict[str, Any] = {}
    if image:
        c = spec.input_size[0]
        inputs = [ct.ImageType(name="image", shape=tuple(spec.example_inputs[0].shape), scale=1 / 255.0,
                               bias=[0.0] * c, color_layout=ct.colorlayout.RGB if c == 3
                               else ct.colorlayout.GRAYSCALE)]
        if spec.classifier and spec.batch_size == 1:
            kwargs["classifier_config"] = ct.ClassifierConfig(spec.class_labels())
        else:
            kwargs["outputs"] = [ct.TensorType(name=n, dtype=np.float32) for n in spec.output_names]
    else:
        inputs = [ct.TensorType(name=n, shape=tuple(x.shape),
                                dtype=np.float32 if x.is_floating_point() else np.int32)
                  for n, x in zip(spec.input_names, spec.example_inputs)]
        kwargs["outputs"] = [ct.TensorType(name=n, dtype=np.float32) for n in spec.output_names]
    kwargs.update(inputs=inputs, minimum_deployment_target=target, compute_precision=compute,
                  convert_to="mlprogram")
    exact = spec.cache.get("coreml_exact_passes_off", [])
    if exact:  # a quantized graph: keep its arithmetic as the model does it (QUANT_EXACT_PASSES)
        pipeline = ct.PassPipeline.DEFAULT
        pipeline.remove_passes(exact)
        kwargs["pass_pipeline"] = pipeline
    try:
        with third_party_bars_hidden(), _small_floats_inline(spec.cache.get("coreml_package") == "compact"):
            return ct.convert(ep, **kwargs)
    except Exception as e:  # noqa: BLE001
        skip = _known_pass_failure(e)
        if skip:
            pipeline = ct.PassPipeline.DEFAULT
            pipeline.remove_passes([skip, *exact])
            kwargs.pop("pass_pipeline", None)
            try:
                with third_party_bars_hidden(), _small_floats_inline(spec.cache.get("coreml_package") == "compact"):
                    mlmodel = ct.convert(ep, pass_pipeline=pipeline, **kwargs)
            except Exception:  # noqa: BLE001 - report the original error below
                pass
            else:
                spec.cache["coreml_skipped_passes"] = [skip]
                return mlmodel
        if not explain_failure:
            raise
        with export_mode(spec.model):
            raise diagnose(e, "coreml", spec.module, spec.example_inputs, _convert_module) from e


#: compact packages keep float constants below this many elements (1 KB) in the program description
#: instead of the weight file: each weight-file entry costs a 64-byte header plus alignment padding,
#: as much as a bias or a per-channel scale itself (the QuEST UNet: about 200 such tensors)
INLINE_FLOAT_ELEMENTS = 256


@contextlib.contextmanager
def _small_floats_inline(enabled: bool) -> Iterator[None]:
    """While coremltools serializes, float constants under :data:`INLINE_FLOAT_ELEMENTS` are written
    as immediate values (coremltools puts every constant of 10 or more elements in the weight file)."""
    if not enabled:
        yield
        return
    from coremltools.converters.mil.backend.mil import load as mil_load

    original = mil_load.should_use_weight_file

    def use_file(val: Any, *args: Any, **kwargs: Any) -> bool:
        small_float = (isinstance(val, (np.ndarray, np.generic)) and val.dtype in (np.float32, np.float16)
                       and val.size < INLINE_FLOAT_ELEMENTS)
        return False if small_float else original(val, *args, **kwargs)

    mil_load.should_use_weight_file = use_file
    try:
        yield
    finally:
        mil_load.should_use_weight_file = original


def _known_pass_failure(error: Exception) -> str | None:
    return next((name for msg, name in PASS_WORKAROUNDS.items() if msg in str(error)), None)


@contextlib.contextmanager
def _passes_skipped(names: list[str]) -> Iterator[None]:
    """coremltools.optimize re-runs the default pipeline with no way to pass a pipeline, so a
    graph pass the conversion had to skip is swapped for a no-op in the registry meanwhile."""
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    class _Skipped(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            pass

    saved = {n: PASS_REGISTRY.passes[n] for n in names if n in PASS_REGISTRY.passes}
    try:
        for n in saved:
            PASS_REGISTRY.passes[n] = _Skipped
        yield
    finally:
        PASS_REGISTRY.passes.update(saved)


def _compress(mlmodel: Any, method: str, spec: ModelSpec) -> Any:
    """Weight compression; retried without a graph pass that fails on this graph (see above)."""
    try:
        return _compress_weights(mlmodel, method)
    except Exception as e:  # noqa: BLE001 - only known pass failures are retried
        skip = _known_pass_failure(e)
        if not skip:
            raise
        with _passes_skipped([skip]):
            compressed = _compress_weights(mlmodel, method)
        spec.cache["coreml_skipped_passes"] = sorted({*spec.cache.get("coreml_skipped_passes", []), skip})
        return compressed


def _compress_weights(mlmodel: Any, method: str) -> Any:
    """coremltools.optimize weight compression (tensors under 2048 elements stay float)."""
    if method == "none":
        return mlmodel
    import coremltools.optimize.coreml as cto

    if method == "palettize4":
        cfg = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=4))
        return cto.palettize_weights(mlmodel, cfg)
    dtype = {"linear8": "int8", "linear4": "int4"}[method]
    cfg = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype=dtype, granularity="per_channel"))
    return cto.linear_quantize_weights(mlmodel, cfg)


def convert(spec: ModelSpec, path: Path, precision: str, options: dict[str, Any],
            calibration_data: Any = None) -> dict[str, Any]:
    """Write ``path`` (a .mlpackage directory); return what the report needs."""
    import coremltools as ct

    mode = options["coreml_inputs"] if spec.camera_input else "tensor"
    compress = options["compress"]
    if precision == "int8" and compress == "none":
        compress = "linear8"
    spec.cache["coreml_package"] = options.get("package", "compact")
    plan = spec.cache["lowbit"]["plan"] if precision in LOWBIT_PRECISIONS else None
    if plan is not None:  # the graph carries its own integer weights and activation grids
        compress = "none"
        spec.cache["coreml_exact_passes_off"] = list(QUANT_EXACT_PASSES)
    fp16_mode = "fp32" if precision == "fp32" or plan is not None else options.get("fp16_mode", "all")
    compute = "fp32" if plan is not None else precision
    names = {"both": (IMAGE_FUNCTION, TENSOR_FUNCTION), "image": ("main",), "tensor": ("main",)}[mode]
    kinds = {"both": (True, False), "image": (True,), "tensor": (False,)}[mode]
    specs = [spec] * len(names)
    if spec.functions:  # one function per entry (a continual model's tasks), all of one input kind
        if mode == "both":
            raise ValueError("coreml_inputs='both' cannot be combined with several functions (tasks); "
                             "choose 'image' or 'tensor'")
        names, specs = tuple(spec.functions), list(spec.functions.values())
        kinds = (mode == "image",) * len(names)
    ladder = ("iOS18",) if len(names) > 1 or (plan and plan.kind == "native") else deployment_targets(mode, compress)
    tried: list[str] = []
    for i, target_name in enumerate(ladder):
        target = getattr(ct.target, target_name)
        last = i == len(ladder) - 1
        try:
            functions = {n: _convert_one(fspec, image, compute, target, fp16_mode, explain_failure=last)
                         for n, image, fspec in zip(names, kinds, specs)}
            break
        except Exception as e:  # noqa: BLE001 - a lower target lacks an op: try the next one
            if last:
                raise
            tried.append(f"{target_name}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    compact = options.get("package", "compact") == "compact"
    with third_party_bars_hidden(), _small_floats_inline(compact):  # compression and merging re-serialize
        functions = {k: _compress(m, compress, spec) for k, m in functions.items()}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".coreml-") as scratch, _small_floats_inline(compact):
        if len(functions) == 1:
            mlmodel = next(iter(functions.values()))
        else:
            desc = ct.utils.MultiFunctionDescriptor()
            for fname, m in functions.items():
                src = Path(scratch) / f"{fname}.mlpackage"
                m.save(str(src))
                desc.add_function(str(src), src_function_name="main", target_function_name=fname)
            desc.default_function_name = names[0]
            merged = Path(scratch) / "merged.mlpackage"
            ct.utils.save_multifunction(desc, str(merged))
            mlmodel = ct.models.MLModel(str(merged), skip_model_load=True)
        _set_metadata(mlmodel, spec, precision, mode, compress, fp16_mode)
        out = Path(scratch) / "final.mlpackage"
        mlmodel.save(str(out))
        package = compact_package(out) if compact else {}
        out.rename(path)
    image_fns = {IMAGE_FUNCTION} if mode == "both" else set(names) if mode == "image" else set()
    return {"functions": {name: "image" if name in image_fns else "tensor" for name in functions},
            "compute_precision": {"fp32": "fp32", "all": "fp16",
                                  "mixed": "fp16 in " + "/".join(sorted(FP16_MIXED_OPS)) + ", fp32 elsewhere"}[fp16_mode],
            "weight_compression": compress, "minimum_deployment_target": target_name,
            "minimum_macos": MACOS_OF_IOS[target_name],
            "lower_targets_refused": tried,
            "skipped_graph_passes": spec.cache.get("coreml_skipped_passes", []),
            "package": {"form": options.get("package", "compact"), **package},
            # compressed weights are judged with the int8 bounds, whatever the compute precision
            "judged_as": plan.judged_as if plan else "int8" if compress != "none" else precision,
            **({"weight_storage": weight_storage(path)} if plan and plan.weights == "codes" else {}),
            "input_layout": "NCHW (tensor function); image (ImageType) for the image function"}


def weight_storage(path: str | Path) -> dict[str, Any]:
    """How a package stores its weights: the constexpr ops by data type, and the bytes of weights
    held as integer codes vs float constants (what a low-bit file's size comes from)."""
    from coremltools.converters.mil.mil import types

    from . import mil

    counts: dict[str, int] = {}
    code_bytes = float_bytes = 0.0
    for op in mil.load_program(path).function.operations:
        if op.op_type == "constexpr_blockwise_shift_scale":
            data = op.inputs["data"]
            kind = types.builtin_to_string(data.dtype)
            counts[kind] = counts.get(kind, 0) + 1
            bits = int("".join(ch for ch in kind if ch.isdigit()) or 8)
            code_bytes += np.prod(data.shape) * bits / 8
        elif op.op_type == "const":
            val = op.outputs[0].val
            if isinstance(val, np.ndarray) and val.dtype.kind == "f" and val.size >= 16:
                float_bytes += val.nbytes
    return {"constexpr_blockwise_shift_scale": counts, "code_bytes": int(code_bytes),
            "float_const_bytes": int(float_bytes)}


def _set_metadata(mlmodel: Any, spec: ModelSpec, precision: str, mode: str, compress: str,
                  fp16_mode: str) -> None:
    from .. import __version__

    mlmodel.author = "vizoo"
    mlmodel.license = spec.license
    mlmodel.version = __version__
    paper = spec.cfg.get("paper") or ""
    mlmodel.short_description = f"{spec.name}" + (f" ({paper})" if paper else "") + \
        f"; input {'x'.join(map(str, spec.input_size))}; {precision}"
    meta = mlmodel.user_defined_metadata
    meta["vizoo.model"] = spec.name
    meta["vizoo.version"] = __version__
    meta["vizoo.input_size"] = json.dumps(list(spec.input_size))
    meta["vizoo.input_shapes"] = json.dumps([list(s) for s in spec.input_shapes])
    meta["vizoo.precision"] = precision
    meta["vizoo.weight_compression"] = compress
    meta["vizoo.fp16_mode"] = fp16_mode
    meta["vizoo.functions"] = mode
    meta["vizoo.output_names"] = json.dumps(spec.output_names)
    if spec.image_input:
        meta["vizoo.preprocessing"] = json.dumps({
            "image_function": "RGB pixels 0-255; scale 1/255, then (x - mean) / std inside the model",
            "tensor_function": "x = (pixel / 255 - mean) / std per channel, NCHW float32",
            "mean": list(spec.mean), "std": list(spec.std),
            "interpolation": spec.cfg.get("interpolation", "bilinear"),
            "crop_pct": spec.cfg.get("crop_pct", 1.0)})
    if spec.classifier:
        meta["vizoo.labels"] = json.dumps(spec.class_labels())
    if spec.functions:
        meta["vizoo.function_labels"] = json.dumps({k: f.class_labels() if f.classifier else None
                                                    for k, f in spec.functions.items()})


# --- running the file ---------------------------------------------------------------------------
def _function_descriptions(path: Path) -> list[tuple[str, Any]]:
    import coremltools as ct

    desc = ct.models.MLModel(str(path), skip_model_load=True).get_spec().description
    if len(desc.functions):
        return [(f.name, f) for f in desc.functions]
    return [("main", desc)]


def _feature_inputs(desc: Any, sample: tuple[torch.Tensor, ...]) -> tuple[dict[str, Any], str]:
    from PIL import Image

    feeds: dict[str, Any] = {}
    kind = "tensor"
    for feature, x in zip(desc.input, sample):
        if feature.type.WhichOneof("Type") == "imageType":
            kind = "image"
            pixels = (x[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            feeds[feature.name] = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels,
                                                  mode="L" if pixels.shape[-1] == 1 else "RGB")
        else:  # integer inputs (a timestep, class labels) stay integers: Core ML's int32
            feeds[feature.name] = x.numpy().astype(np.float32 if x.is_floating_point() else np.int32)
    return feeds, kind


def _outputs(desc: Any, result: dict[str, Any], labels: list[Any]) -> list[np.ndarray]:
    probs = desc.predictedProbabilitiesName
    if probs:
        value = result[probs]
        if isinstance(value, dict):
            keys = list(value)
            lookup = {str(k): v for k, v in value.items()}
            value = [lookup[str(label)] for label in (labels or keys)]
        return [np.asarray(value, dtype=np.float32).reshape(1, -1)]
    return [np.asarray(result[o.name], dtype=np.float32) for o in desc.output]


def open_runner(path: str | Path, spec: ModelSpec | None = None) -> list[RunFunction]:
    """One RunFunction per function of the package: Core ML on macOS, else vizoo.export.mil."""
    path = Path(path)
    described = _function_descriptions(path)
    labels = spec.class_labels() if spec is not None and spec.classifier else []
    labels_of = {name: (f.class_labels() if f.classifier else []) for name, f in spec.functions.items()} \
        if spec is not None else {}
    multi = len(described) > 1
    on_mac = sys.platform == "darwin" and platform.mac_ver()[0] != ""
    if on_mac:
        import coremltools as ct

        models = {name: ct.models.MLModel(str(path), function_name=name if multi else None)
                  for name, _ in described}

        def call(name: str, feeds: dict[str, Any]) -> dict[str, Any]:
            return models[name].predict(feeds)
    else:
        try:
            from . import mil
        except ImportError as e:
            raise Unverifiable("no CoreML runtime here: Core ML runs only on macOS and the MIL "
                               f"reference executor (vizoo.export.mil) is not available ({e})") from e
        programs = {name: mil.load_program(path, name if multi else None) for name, _ in described}
        missing = set().union(*(mil.unsupported_ops(p) for p in programs.values()))
        if missing:
            raise Unverifiable(f"op {', '.join(sorted(missing))} has no NumPy reference in "
                               "vizoo.export.mil (verify on macOS, or implement the op)")
        run_program = getattr(mil, "run_program", None)

        def call(name: str, feeds: dict[str, Any]) -> dict[str, Any]:
            try:
                if run_program is not None:
                    return run_program(programs[name], feeds)
                return mil.run_mlpackage(path, feeds, function_name=name if multi else None)
            except mil.UnsupportedOpError as e:
                raise Unverifiable(str(e).removeprefix("unverified: ")) from e

    functions = []
    for name, desc in described:
        kind = "image" if desc.input[0].type.WhichOneof("Type") == "imageType" else "tensor"

        def run(sample: tuple[torch.Tensor, ...], _name: str = name, _desc: Any = desc) -> list[np.ndarray]:
            feeds, _ = _feature_inputs(_desc, sample)
            own = labels_of.get(_name) or (next(iter(labels_of.values())) if len(labels_of) == 1 else labels)
            return _outputs(_desc, call(_name, feeds), own)

        functions.append(RunFunction(name, kind, run))
    return functions

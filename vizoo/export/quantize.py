"""Reduced precision: representative (calibration) data and TFLite quantization recipes.

Calibration images come from the user (a folder of images or a tensor of [0, 1] images) or
from the bundled photographs; they are crops drawn with another seed than the parity images, so
a file is never judged on the images it was calibrated on. TFLite fp16 and int8 files are made
from the fp32 file by ai-edge-quantizer (one conversion serves every precision).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.bundled import PHOTO_NAMES, normalize, photo_images
from .inputs import draw_inputs
from .spec import ModelSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CALIBRATION_SEED = 1


def load_image_folder(folder: str | os.PathLike, size: tuple[int, int], chans: int,
                      limit: int = 256, crop_pct: float = 0.875) -> torch.Tensor:
    """Images under ``folder`` (recursively) as (N, C, H, W) in [0, 1], resized and centre
    cropped the way timm evaluates (shorter side to size/crop_pct, then the centre)."""
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    h, w = size
    out = []
    for f in files:
        img = Image.open(f).convert("L" if chans == 1 else "RGB")
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
        scale = max(h, w) / crop_pct / min(t.shape[1:])
        t = F.interpolate(t[None], scale_factor=scale, mode="bilinear", antialias=True,
                          align_corners=False)[0]
        top, left = (t.shape[1] - h) // 2, (t.shape[2] - w) // 2
        out.append(t[:, top:top + h, left:left + w].clamp(0, 1))
    x = torch.stack(out)
    if x.shape[1] != chans:
        x = x.mean(1, keepdim=True).expand(-1, chans, -1, -1).contiguous()
    return x


def check_calibration_data(spec: ModelSpec, calibration_data: Any) -> None:
    """Raise ValueError (one line: what to pass) when ``calibration_data`` cannot calibrate ``spec``.

    Why before any conversion: inside an export a calibration failure is one failed attempt, and
    ``int8_mode="auto"`` would go on to a dynamic-range file that needs no calibration, so a typo
    in a folder name silently gave a different kind of file. Cheap: a folder is only listed.
    """
    if calibration_data is None:
        return
    what = ("pass a folder of images (" + ", ".join(IMAGE_SUFFIXES) + ") or a tensor (N, "
            + ", ".join(map(str, spec.input_size)) + ") of images in [0, 1], or nothing to calibrate "
            "on the bundled photographs")
    if isinstance(calibration_data, (str, os.PathLike)):
        folder = Path(calibration_data)
        if not spec.image_input:
            raise ValueError("a folder of images cannot calibrate this model (its inputs are not one "
                             "image): pass calibration_data as a list of input tuples")
        if not folder.exists():
            raise ValueError(f"calibration folder {folder} does not exist: {what}")
        if not folder.is_dir():
            raise ValueError(f"calibration data {folder} is not a folder: {what}")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file()):
            raise ValueError(f"calibration folder {folder} has no images: {what}")
        return
    if isinstance(calibration_data, (torch.Tensor, np.ndarray)):
        if not spec.image_input:
            raise ValueError("a tensor of images cannot calibrate this model (its inputs are not one "
                             "image): pass calibration_data as a list of input tuples")
        shape = tuple(calibration_data.shape)
        if len(shape) != 4 or shape[1:] != tuple(spec.input_size):
            raise ValueError(f"calibration_data has shape {shape} but this export's input is "
                             f"{tuple(spec.input_size)}: {what}")
        if shape[0] < spec.batch_size:
            raise ValueError(f"calibration_data has {shape[0]} images, fewer than the batch size "
                             f"{spec.batch_size}: {what}")
        calibration_samples(spec, calibration_data)  # the value range
        return
    if hasattr(calibration_data, "__len__") and len(calibration_data) == 0:
        raise ValueError("calibration_data is empty: " + (what if spec.image_input else
                                                          "pass a list of input tuples"))


def calibration_samples(spec: ModelSpec, calibration_data: Any = None,
                        n: int = 64) -> list[tuple[torch.Tensor, ...]]:
    """Representative inputs in the model's own input space (normalised, NCHW, batch as exported).

    ``calibration_data``: None (bundled photographs), a folder of images, a tensor/array of
    images in [0, 1] shaped (N, C, H, W), or an iterable of ready input tuples (models with
    their own ``example_inputs``).
    """
    b = spec.batch_size
    if spec.image_input and (calibration_data is None or isinstance(calibration_data, (str, os.PathLike))
                             or isinstance(calibration_data, (torch.Tensor, np.ndarray))):
        c, h, w = spec.input_size
        if calibration_data is None:
            skip = len(PHOTO_NAMES)  # only seeded crops: the parity set starts with whole photos
            x01 = photo_images(n * b + skip, (h, w), c, seed=CALIBRATION_SEED)[skip:]
        elif isinstance(calibration_data, (str, os.PathLike)):
            x01 = load_image_folder(calibration_data, (h, w), c,
                                    crop_pct=float(spec.cfg.get("crop_pct", 0.875)))
        else:
            x01 = torch.as_tensor(np.asarray(calibration_data), dtype=torch.float32)
            if x01.dim() != 4 or tuple(x01.shape[1:]) != (c, h, w):
                raise ValueError(f"calibration_data must be images shaped (N, {c}, {h}, {w}) in "
                                 f"[0, 1]; got {tuple(x01.shape)}")
            if x01.min() < -1e-3 or x01.max() > 1 + 1e-3:
                raise ValueError("calibration_data must be images in [0, 1] (the exporter applies "
                                 "the model's mean/std itself)")
        x = normalize(x01, spec.mean, spec.std)
        groups = [x[i:i + b] for i in range(0, len(x) - b + 1, b)]
        extra = spec.example_inputs[1:]
        return [(g.contiguous(), *extra) for g in groups]
    if calibration_data is None:  # seeds apart from the parity draws: never judged on its calibration
        return draw_inputs(spec.model, spec.example_inputs, min(n, 32), 10_000, b, spec.input_size,
                           hook=not spec.explicit_inputs)[0]
    if hasattr(calibration_data, "x") and hasattr(calibration_data, "t"):
        return calibration_set_samples(calibration_data, b, n, like=spec.example_inputs)
    samples = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in calibration_data]
    if not samples:
        raise ValueError("calibration_data is empty")
    return samples


def calibration_set_samples(calib: Any, batch_size: int = 1, n: int = 64,
                            like: Sequence[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, ...]]:
    """A diffusion calibration set (``x: [S, N, ...]`` inputs recorded along the FP sampler's
    trajectory at timesteps ``t: [S]``, optional ``class_labels: [S, N]``) as ``n`` input tuples,
    taken evenly over its steps and samples: what the quantized model was calibrated on. ``like``:
    the exported example inputs, whose dtypes the tuples take."""
    x, t = torch.as_tensor(calib.x), torch.as_tensor(calib.t)
    labels = getattr(calib, "class_labels", None)
    steps, per = x.shape[0], x.shape[1] // batch_size
    if steps == 0 or per == 0:
        raise ValueError(f"the calibration set holds {tuple(x.shape[:2])} (steps, samples): fewer samples "
                         f"than the batch size {batch_size}")
    out = []
    for i in range(min(n, steps * per)):
        s, j = i % steps, (i // steps) % per
        rows = slice(j * batch_size, (j + 1) * batch_size)
        sample: tuple[torch.Tensor, ...] = (x[s, rows].float().contiguous(),
                                            torch.full((batch_size,), int(t[s]), dtype=torch.long))
        if labels is not None:
            sample += (torch.as_tensor(labels)[s, rows].long().contiguous(),)
        if like is not None:
            sample = tuple(v.to(e.dtype) for v, e in zip(sample, like))
        out.append(sample)
    return out


# --- TFLite: fp16 / int8 from the fp32 flatbuffer (ai-edge-quantizer) -------------------------
def tflite_fp16(fp32: bytes) -> bytes:
    """fp16 weights (dequantized to fp32 at load; float I/O)."""
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    q = quantizer.Quantizer(bytearray(fp32))
    q.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                             num_bits=16, algorithm_key=AlgorithmName.FLOAT_CASTING)
    return bytes(q.quantize(enable_progress_report=False).quantized_model)


#: Ops whose constant weights dynamic-range int8 quantizes. Not BATCH_MATMUL: a constant on its
#: left (AFFNet's DFT matrices) becomes an int8 LHS, which the TFLite kernel refuses at load time.
#: Not DEPTHWISE_CONV_2D (nor CONV_2D_TRANSPOSE): XNNPACK has no dynamic-range kernel for it, so
#: each one ran in TFLite's hybrid kernel outside the delegate, splitting the graph (MobileNetV2-S0
#: at 32 px: 19 partitions, and with 2 threads the hybrid kernels' own thread pool fought
#: XNNPACK's: a 10 µs model took 1.8 ms). Depthwise weights are a small share of the file.
DYNAMIC_INT8_OPS = ("FULLY_CONNECTED", "CONV_2D", "EMBEDDING_LOOKUP")


def tflite_int8_dynamic(fp32: bytes) -> bytes:
    """int8 weights (per channel) of the weight layers, activations quantized at run time (float I/O)."""
    from ai_edge_quantizer import qtyping, quantizer, recipe_manager

    manager = recipe_manager.RecipeManager()
    for op in DYNAMIC_INT8_OPS:
        manager.add_dynamic_config(regex=".*", operation_name=qtyping.TFLOperationName[op], num_bits=8)
    q = quantizer.Quantizer(bytearray(fp32), manager.get_quantization_recipe())
    return bytes(q.quantize(enable_progress_report=False).quantized_model)


#: Ops the "mixed" int8 mode computes in int8 (weights per channel, activations calibrated): the
#: weight layers, where nearly all the work is. Everything else (softmax, layer norm, attention and
#: DFT matmuls, elementwise) stays float between quantize/dequantize ops: per-tensor int8 ranges
#: of those are what makes full-integer ViTs and AFFNet miss the int8 bound (README).
MIXED_INT8_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE")

#: Ops the "full" int8 mode leaves in float (DEQUANTIZE -> op -> QUANTIZE around each): XNNPACK has
#: no int8 kernel for them, so in int8 each one ran outside the delegate and split the graph
#: (EvoNorm-S0 MobileNetV2: 35 int8 RSQRTs, 38 partitions, slower than fp32; EvoNorm-B0/B1: SQRT,
#: DIV, MAXIMUM; ULSAM's spatial attention: SOFTMAX). A float op between QUANTIZE/DEQUANTIZE stays
#: inside the one XNNPACK partition, an rsqrt of a variance keeps its precision (an int8 rsqrt of
#: a per-tensor-quantized variance loses most of it), and a float DIV cannot abort on a divisor
#: that rounds to its zero point.
FULL_INT8_FLOAT_OPS = ("RSQRT", "SQRT", "DIV", "MAXIMUM", "SOFTMAX")

#: Ops whose output tensor is named after a normalisation layer of vizoo (litert-torch names tensors
#: by module path): the 1×1 convs of the export forms' group statistics (tiny (B, 1, 1, C) tensors).
#: "mixed" keeps them float: as int8 convs each needed a QUANTIZE/DEQUANTIZE pair around it, three
#: times as many ops as the statistic itself (MobileNetV2-S0 at 32 px: 225 QUANTIZE/DEQUANTIZE ops).
NORM_STATISTICS_SCOPE = r"vizoo\.layers\.(evonorm\.EvoNorm2d|export_swaps\.GroupNormExport)\w*_[^/]*$"

#: What each static int8 mode quantizes, for the report.
STATIC_INT8_METHODS = {
    "full": "ai-edge-quantizer static_wi8_ai8: int8 weights and activations in every supported op "
            "except " + ", ".join(FULL_INT8_FLOAT_OPS) + " (float: XNNPACK has no int8 kernel for "
            "it), int8 I/O",
    "mixed": "ai-edge-quantizer static int8 (weights per channel, calibrated activations) in the "
             "weight layers (" + ", ".join(MIXED_INT8_OPS) + ", but not the normalisation layers' "
             "statistics); other ops float, float I/O",
}


def _static_int8_recipe(mode: str, float_scopes: Sequence[str] = (), float_ops: Sequence[str] = ()) -> Any:
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    if mode not in ("full", "mixed"):
        raise ValueError(f"static int8 mode must be 'full' or 'mixed', not {mode!r}")
    manager = recipe_manager.RecipeManager()
    if mode == "full":  # = recipe.static_wi8_ai8(), with FULL_INT8_FLOAT_OPS left in float
        manager.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                  activation_num_bits=8, weight_num_bits=8)
        for op in (*FULL_INT8_FLOAT_OPS, *float_ops):
            manager.add_quantization_config(regex=".*", operation_name=qtyping.TFLOperationName[op],
                                            algorithm_key=AlgorithmName.NO_QUANTIZE)
        for scope in float_scopes:  # later rules win: these ops stay float
            manager.add_quantization_config(regex=scope, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                            algorithm_key=AlgorithmName.NO_QUANTIZE)
        return manager.get_quantization_recipe()
    for op in MIXED_INT8_OPS:
        manager.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName[op],
                                  activation_num_bits=8, weight_num_bits=8)
    for op in ("CONV_2D", "DEPTHWISE_CONV_2D"):  # later rules win: the norms' statistics stay float
        manager.add_quantization_config(regex=NORM_STATISTICS_SCOPE, operation_name=qtyping.TFLOperationName[op],
                                        algorithm_key=AlgorithmName.NO_QUANTIZE)
    return manager.get_quantization_recipe()


def tflite_int8_static(fp32: bytes, calibration: Sequence[dict[str, np.ndarray]], mode: str = "full",
                       signature: str = "serving_default", threads: int = 2,
                       ranges: dict[str, Any] | None = None, float_scopes: Sequence[str] = (),
                       float_ops: Sequence[str] = ()) -> tuple[bytes, dict[str, Any]]:
    """int8 file of ``mode`` ("full" or "mixed") and the activation ranges it was made from.

    ``ranges``: the result of an earlier calibration of the same fp32 file (every tensor's range
    is kept, so one calibration serves both modes); calibrated here when None. ``float_scopes``:
    regexes of tensor names whose ops stay float in "full" (a diffusion UNet's timestep path);
    ``float_ops``: op types that stay float in "full" besides :data:`FULL_INT8_FLOAT_OPS`.
    """
    from ai_edge_quantizer import quantizer

    if ranges is None:  # calibrated under the full recipe: ranges for every tensor either mode needs
        full = quantizer.Quantizer(bytearray(fp32), _static_int8_recipe("full"))
        ranges = full.calibrate({signature: list(calibration)}, num_threads=threads)
    q = quantizer.Quantizer(bytearray(fp32), _static_int8_recipe(mode, float_scopes, float_ops))
    return bytes(q.quantize(ranges, enable_progress_report=False).quantized_model), ranges


def as_signature_inputs(samples: Iterable[tuple[torch.Tensor, ...]], names: Sequence[str],
                        prepare: Any) -> list[dict[str, np.ndarray]]:
    """Calibration samples as the quantizer wants them: ``{input name: array}`` per sample."""
    return [{n: prepare(i, x) for i, (n, x) in enumerate(zip(names, s))} for s in samples]

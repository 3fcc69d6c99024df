"""`export_model`: convert, verify and time a model for each format and precision asked for.

Every check a user could fail (format, precision, options, installed converters, input size,
calibration data) runs before the first conversion. A conversion failure is written to the
report (op, module path, fix) and the other formats still export; files land only when complete.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..io import atomic_path, write_json_atomic
from ..quiet import third_party_bars_hidden
from .errors import ConversionError, require
from . import lowbit
from .formats import FORMATS, LOWBIT_PRECISIONS, PRECISIONS, ExportFormat, all_options, get_format
from .inputs import model_attr
from .quantize import check_calibration_data
from .report import ExportReport, FormatResult, converter_versions, path_size
from .spec import ModelSpec, resolve_spec
from .verify import (ParityInputs, Unverifiable, labelled_inputs, parity_inputs, tuple_inputs,
                     verify_functions)


def build_model(name: str, checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """A vizoo model by name (optionally from a checkpoint), or ``timm:NAME`` for a timm model."""
    if name.startswith("timm:"):
        import timm

        model = timm.create_model(name[len("timm:"):], pretrained=False, **kwargs)
        if checkpoint:
            from ..hub import load_checkpoint

            load_checkpoint(model, checkpoint)
        return model
    if checkpoint:
        from ..hub import load_model

        return load_model(checkpoint, name=name, **kwargs)
    from ..factory import create_model

    return create_model(name, **kwargs)


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _check_request(formats: list[ExportFormat], precisions: list[str], options: dict[str, Any]) -> None:
    known = all_options()
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ValueError(f"unknown export option(s) {unknown}; known: {sorted(known)}")
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"unknown precision {p!r}; choose from {list(PRECISIONS)}")
    for f in formats:
        bad = [p for p in precisions if p not in f.precisions]
        if bad:
            raise ValueError(f"{f.title} does not support precision(s) {bad}")
        f.resolve_options({k: v for k, v in options.items() if k in f.options})


def export_model(model: nn.Module | str, formats: str | Sequence[str] = ("coreml", "tflite"),
                 input_size: Any = None, precision: str | Sequence[str] = "fp32",
                 out_dir: str | os.PathLike | None = None, verify: bool = True,
                 calibration_data: Any = None, *, name: str | None = None, batch_size: int = 1,
                 verify_images: int = 64, verify_data: Any = None, latency: bool = True,
                 threads: int = 2, example_inputs: Sequence[torch.Tensor] | None = None,
                 act_set: int | None = None, **options: Any) -> ExportReport:
    """Export ``model`` to each format at each precision, verify each file, write report.json.

    ``model``: an nn.Module (vizoo, timm or your own; plain modules need ``input_size``) or a
    registered vizoo name (``timm:NAME`` for timm). ``input_size``: int, (H, W), (C, H, W) or
    (B, C, H, W) (B is then the batch size); default the model's ``pretrained_cfg['input_size']``.
    Shapes are static (batch ``batch_size``). ``precision``: "fp32", "fp16", "int8" or a list of them.
    ``calibration_data``: images for int8 (folder, or (N, C, H, W) in [0, 1]), checked before
    any conversion; default the bundled photographs. ``verify_data``: your own images
    (N, C, H, W) in [0, 1], or ``(images, labels)`` to also report each file's accuracy and its
    delta to PyTorch; default ``verify_images`` bundled photographs (models without one image
    input: inputs drawn from what they mean, e.g. noisy samples and timesteps over the schedule for
    a diffusion UNet; or a list of input tuples). ``example_inputs``: the tensors of one forward
    call for models with several inputs, e.g. ``(sample[1, 1, 16, 16], timestep[1])``; they fix the
    static shapes and the batch. ``options``: format options from :data:`vizoo.export.formats.FORMATS`
    (``layout``, ``int8_mode``, ``coreml_inputs``, ``compress``, ``fp16_mode``).

    A QuEST-quantized UNet (``vizoo.quant.QuantUNet``) also exports at ``"w4a8"`` (CoreML: 4-bit
    weight codes as Core ML int4 weights, activation scales as quantize/dequantize ops),
    ``"w8a8"`` (TFLite full integer; CoreML like w4a8) and ``"w4a4"`` (fake-quant float graph),
    each verified against the fake-quant model (:mod:`vizoo.export.lowbit`); its fp32/fp16/int8
    files are made from its float model. ``act_set``: which calibrated activation set a native
    file carries (index into ``calib_timesteps``; default the only set, else the middle one).
    Returns the report (also written to ``out_dir/report.json``).
    """
    fmts = [get_format(f) for f in _as_list(formats)]
    precisions = _as_list(precision)
    _check_request(fmts, precisions, options)
    for f in fmts:
        require(f.requires, f"{f.title} export")
    if isinstance(model, str):
        name = name or model
        model = build_model(model)
    lowbit.check_request(model, precisions, [f.name for f in fmts], act_set)
    quant = model if lowbit.is_quant_unet(model) else None
    if quant is not None:  # fp32/fp16/int8 files (and the spec's shapes) come from its float model
        name = name or model_attr(quant, "vizoo_name") or f"{type(quant.model).__name__}_{quant.cfg.tag}"
        model = lowbit.float_model(quant)
    spec = resolve_spec(model, input_size, name=name, batch_size=batch_size, example_inputs=example_inputs)
    check_calibration_data(spec, calibration_data)
    out = Path(out_dir) if out_dir is not None else Path("exports") / spec.stem
    out.mkdir(parents=True, exist_ok=True)

    pin = ref = ref_eager = None
    if verify:
        if verify_data is None:
            pin = parity_inputs(spec, verify_images)
        elif not spec.image_input:
            pin = tuple_inputs(spec, verify_data, verify_images)
        elif isinstance(verify_data, (tuple, list)):
            pin = labelled_inputs(spec, *verify_data)
        else:
            pin = labelled_inputs(spec, verify_data)
        ref, ref_eager = spec.references(pin.samples)

    results = []
    jobs = [(f, p) for f in fmts for p in precisions]
    for fmt, prec in tqdm(jobs, desc=f"export {spec.name}", disable=len(jobs) < 2):
        opts = fmt.resolve_options({k: v for k, v in options.items() if k in fmt.options})
        auto = _auto_option(prec, opts)
        if prec in LOWBIT_PRECISIONS:  # its own graph, judged against the fake-quant model
            lspec = lowbit.precision_spec(spec, quant, prec, fmt.name, act_set)
            lref = lspec.cache.get(("references", fmt.name))
            if pin is not None and lref is None:  # computed as the file computes its float ops (see coreml)
                forms = getattr(fmt.implementation(), "reference_forms", None)
                with forms(lspec) if forms else contextlib.nullcontext():
                    lref = lspec.cache[("references", fmt.name)] = lspec.references(pin.samples)
            results.append(_export_one(lspec, fmt, prec, opts, out, calibration_data, pin,
                                       *(lref or (None, None))))
        elif auto:
            results.append(_export_auto(spec, fmt, prec, auto, opts, out, calibration_data, pin, ref, ref_eager,
                                        threads))
        else:
            results.append(_export_one(spec, fmt, prec, opts, out, calibration_data, pin, ref, ref_eager))
    _size_ratios(results)

    torch_lat = _measure_latency(spec, results, threads) if latency else None
    from .. import __version__

    report = ExportReport(
        model=spec.name,
        input={"shapes": [list(s) for s in spec.input_shapes], "names": spec.input_names,
               "static": True, "layout_pytorch": "NCHW", "image_input": spec.image_input,
               "mean": list(spec.mean), "std": list(spec.std),
               "outputs": dict(zip(spec.output_names, [list(s) for s in spec.output_shapes])),
               "classifier": spec.classifier, "num_classes": spec.num_classes,
               "labels": "model labels" if spec.labels else ("class indices" if spec.classifier else None)},
        results=results, converters=converter_versions(), vizoo_version=__version__,
        pytorch_latency=torch_lat, export_form_layers=spec.export_aware,
        path=str(out / "report.json"))
    write_json_atomic(out / "report.json", report.to_dict())
    return report


def _export_one(spec: ModelSpec, fmt: ExportFormat, precision: str, options: dict[str, Any], out: Path,
                calibration_data: Any, pin: ParityInputs | None, ref: Any, ref_eager: Any) -> FormatResult:
    impl = fmt.implementation()
    path = out / f"{spec.stem}_{precision}{fmt.suffix}"
    t0 = time.perf_counter()
    try:
        with atomic_path(path) as tmp, third_party_bars_hidden():
            details = impl.convert(spec, tmp, precision, options, calibration_data)
    except ConversionError as e:
        return FormatResult(fmt.name, precision, "failed", str(e), error=e.to_dict(),
                            seconds=time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a crash in a converter/quantizer is a failed export
        return FormatResult(fmt.name, precision, "failed",
                            f"{fmt.title} {precision} export failed: {type(e).__name__}: {str(e)[:500]}",
                            seconds=time.perf_counter() - t0)
    if precision in LOWBIT_PRECISIONS:
        details["lowbit"] = lowbit.lowbit_details(spec, fmt.name, path)
    side = details.pop("sidecar", None)
    if side is not None:
        write_json_atomic(path.with_name(path.name + ".json"), side)
        details["sidecar_file"] = str(path.with_name(path.name + ".json"))
    result = FormatResult(fmt.name, precision, "unverified", "verification skipped (verify=False)",
                          file=str(path), size_bytes=path_size(path), details=details)
    if pin is not None:
        result.status, result.reason, result.verification = verify_file(
            fmt, path, spec, details.get("judged_as", precision), pin, ref, ref_eager)
    result.seconds = time.perf_counter() - t0
    return result


#: ``<option>="auto"`` tries these modes in order and keeps the first file that passes its bounds:
#: TFLite int8 from the most integer file down (and only one not slower than the fp32 file, see
#: :data:`INT8_MAX_LATENCY_RATIO`); CoreML fp16 from all-fp16 arithmetic down to fp16 only in the
#: weight layers.
AUTO_ORDERS = {"int8_mode": ("full", "mixed", "dynamic"), "fp16_mode": ("all", "mixed")}

#: TFLite ``int8_mode="auto"`` keeps a verified int8 file only if its latency is at most this
#: multiple of the fp32 file's (both timed in paired rounds, here, at the export's threads): an int8
#: file slower than fp32 has no reason to exist. When no verified mode qualifies, the fastest
#: verified one is kept and the report says so and names the ops that cost.
INT8_MAX_LATENCY_RATIO = 1.0


def _auto_option(precision: str, options: dict[str, Any]) -> str | None:
    """The option export resolves by trying its modes, if any: int8_mode for TFLite int8,
    fp16_mode for CoreML files computed in fp16 (fp16 and int8 weights)."""
    if precision == "int8" and options.get("int8_mode") == "auto":
        return "int8_mode"
    if precision in ("fp16", "int8") and options.get("fp16_mode") == "auto":
        return "fp16_mode"
    return None


def _export_auto(spec: ModelSpec, fmt: ExportFormat, precision: str, key: str, options: dict[str, Any],
                 out: Path, calibration_data: Any, pin: ParityInputs | None, ref: Any,
                 ref_eager: Any, threads: int = 2) -> FormatResult:
    """The first mode of ``AUTO_ORDERS[key]`` whose file verifies (the first one without
    verification); for TFLite int8 also not slower than the fp32 file. Every attempt, why it was
    left and (int8) the latencies that decided are in ``details['<int8|fp16>_attempts']``."""
    attempts: list[dict[str, Any]] = []
    seconds = 0.0
    timed = key == "int8_mode" and fmt.name == "tflite" and pin is not None
    slower: dict[str, tuple[FormatResult, dict[str, Any], list[tuple[Path, Path]]]] = {}
    chosen, chosen_mode = None, None
    for mode in AUTO_ORDERS[key]:
        result = _export_one(spec, fmt, precision, {**options, key: mode}, out, calibration_data,
                             pin, ref, ref_eager)
        seconds += result.seconds
        attempt = {key: mode, "status": result.status, "reason": result.reason[:300]}
        attempts.append(attempt)
        if result.status == "failed" and pin is not None:
            continue
        if timed and result.status == "ok":
            attempt.update(_int8_against_fp32(spec, result, options, threads))
        ratio = attempt.get("latency_ratio")
        if ratio is None or ratio <= INT8_MAX_LATENCY_RATIO:
            chosen, chosen_mode = result, mode
            break
        attempt["reason"] = (f"verified, but {ratio:.2f}x the fp32 file's latency "
                             f"({attempt['latency_ms']:.3g} vs {attempt['fp32_latency_ms']:.3g} ms)")
        slower[mode] = (result, attempt, _set_aside(result, mode))  # the next mode overwrites the file
    why_slow = ""
    if chosen is None and slower:  # every verified mode is slower than fp32: keep the fastest, say why
        chosen_mode = min(slower, key=lambda m: slower[m][1]["latency_ratio"])
        chosen, attempt, moved = slower.pop(chosen_mode)
        for final, aside in moved:
            os.replace(aside, final)
        why_slow = (f"no verified int8 mode is faster than the fp32 file here; kept {chosen_mode}, the "
                    f"fastest ({attempt['latency_ratio']:.2f}x fp32). Cause: "
                    + slow_int8_cause(chosen.details.get("xnnpack"), chosen_mode))
    for _, _, moved in slower.values():
        for _, aside in moved:
            aside.unlink(missing_ok=True)
    if chosen is None:  # nothing verified: the last attempt, failed
        chosen, chosen_mode = result, attempts[-1][key]
    chosen.seconds = seconds
    chosen.details[key] = chosen_mode
    chosen.details[key.replace("_mode", "_attempts")] = attempts
    if timed:
        timed_ok = [a for a in attempts if a.get("latency_ratio") is not None]
        chosen.details["int8_decision"] = {
            "rule": f"the first verified mode of {list(AUTO_ORDERS[key])} whose latency is at most "
                    f"{INT8_MAX_LATENCY_RATIO:g}x the fp32 file's (median ratio of paired timing "
                    f"rounds, {threads} threads, on the exporting machine); else the fastest verified one",
            "faster_than_fp32": bool(timed_ok) and not why_slow,
            **({"cause": why_slow} if why_slow else {})}
    left = [a for a in attempts if a[key] != chosen_mode]
    if left or why_slow:
        text = "; ".join(f"{a[key]}: {a['reason'][:120]}" for a in left)
        chosen.reason = (f"{key} auto chose {chosen_mode}" + (f" ({text})" if text else "")
                         + (f". {why_slow}" if why_slow else "")
                         + (f". {chosen.reason}" if chosen.reason else ""))
    return chosen


def _set_aside(result: FormatResult, mode: str) -> list[tuple[Path, Path]]:
    """Move a file (and its sidecar) out of the next attempt's way: ``[(path, hidden copy)]``."""
    moved = []
    for name in (result.file, result.details.get("sidecar_file")):
        if name and Path(name).exists():
            aside = Path(name).with_name(f".{Path(name).name}.{mode}")
            os.replace(name, aside)
            moved.append((Path(name), aside))
    return moved


def _int8_against_fp32(spec: ModelSpec, result: FormatResult, options: dict[str, Any],
                       threads: int) -> dict[str, Any]:
    """Latency of a TFLite int8 file relative to the fp32 file it was made from, timed in paired
    rounds (about two seconds, :func:`vizoo.export.bench.paired_ratio`): what ``int8_mode="auto"``
    decides on."""
    from .bench import paired_ratio
    from .tflite import timed_invoke

    nhwc = options.get("layout") == "nhwc" and spec.image_input
    fp32 = spec.cache.get(("tflite_fp32", nhwc))
    if fp32 is None or not result.file:
        return {}
    try:
        r = paired_ratio(timed_invoke(result.file, threads)[0], timed_invoke(fp32, threads)[0])
    except Exception as e:  # noqa: BLE001 - a file that cannot be timed is judged on parity alone
        return {"latency_error": f"{type(e).__name__}: {e}"}
    return {"latency_ms": round(r["ms"], 4), "fp32_latency_ms": round(r["base_ms"], 4),
            "latency_ratio": round(r["ratio"], 3), "latency_round_ratios": r["round_ratios"],
            "latency_threads": threads}


def slow_int8_cause(info: dict[str, Any] | None, mode: str | None = None) -> str:
    """Which ops keep an int8 file (of int8 ``mode``) from beating fp32, from its delegation
    (``details['xnnpack']``)."""
    from .tflite import WEIGHT_OPS

    if not info or "error" in info:
        return "its XNNPACK delegation could not be read"
    if info["ops_outside"]:
        return ("ops outside XNNPACK: " + ", ".join(f"{op}×{k}" for op, k in info["ops_outside"].items())
                + f" ({info['partitions']} partitions: TFLite's own int8 kernels and a hand-over at "
                  "every split)")
    if mode == "dynamic":
        n = sum(info["op_counts"].get(op, 0) for op in ("CONV_2D", "FULLY_CONNECTED"))
        return (f"one XNNPACK partition; dynamic range quantizes the activations at run time before each "
                f"of its {n} CONV_2D/FULLY_CONNECTED ops (an extra pass per layer), which costs more than "
                "the int8 arithmetic saves at this size")
    glue = {op: k for op, k in info["op_counts"].items() if op not in WEIGHT_OPS}
    qdq = glue.get("QUANTIZE", 0) + glue.get("DEQUANTIZE", 0)
    top = ", ".join(f"{op}×{k}" for op, k in glue.items() if op not in ("QUANTIZE", "DEQUANTIZE"))
    return (f"one XNNPACK partition, but {sum(glue.values())} of its {info['ops']} ops are not weight "
            f"layers ({top}" + (f"; QUANTIZE/DEQUANTIZE×{qdq} around the ops kept in float" if qdq else "")
            + "): int8 speeds up convolutions and matmuls, while XNNPACK's int8 elementwise kernels "
              "(broadcast MUL/ADD/SUB, MEAN) are no faster than fp32 ones, and slower on small tensors")


def _size_ratios(results: list[FormatResult]) -> None:
    """Each file's size relative to the fp32 file of its format in the same export
    (``details['size_vs_fp32']``): what a low-bit or compressed file saves."""
    fp32 = {r.format: r.size_bytes for r in results if r.precision == "fp32" and r.size_bytes}
    for r in results:
        if r.precision != "fp32" and r.size_bytes and fp32.get(r.format):
            r.details["size_vs_fp32"] = round(r.size_bytes / fp32[r.format], 4)


def _measure_latency(spec: ModelSpec, results: list[FormatResult], threads: int) -> dict[str, Any]:
    """PyTorch eager and every TFLite file, timed interleaved in one run (batch as exported).

    Returns the PyTorch figure; each TFLite result gets its own. (Core ML runs only on Apple
    devices: no CoreML latency here.)
    """
    from .bench import interleaved, torch_threads
    from .tflite import timed_invoke

    files = [r for r in results if r.format == "tflite" and r.file and r.status != "failed"]
    with torch.no_grad(), torch_threads(threads):
        fns = {"torch": lambda: spec.module(*spec.example_inputs)}
        for r in files:
            try:  # a file its runtime cannot invoke gets no latency, the others still do
                fn = timed_invoke(r.file, threads)[0]
                fn()
                fns[r.precision] = fn
            except Exception as e:  # noqa: BLE001
                r.latency = {"error": f"{type(e).__name__}: {e}"}
        lat = interleaved(fns, rounds=5, runs=7, warmup=3, threads=threads, batch=spec.batch_size,
                          budget_s=60)
    for r in files:
        if r.precision in lat:
            r.latency = lat[r.precision].to_dict()
    return lat["torch"].to_dict()


def verify_file(fmt: ExportFormat | str, path: str | os.PathLike, spec: ModelSpec, precision: str,
                pin: ParityInputs | None = None, ref: Any = None,
                ref_eager: Any = None) -> tuple[str, str, dict[str, Any]]:
    """Run an exported file on real images against the PyTorch model: (status, reason, details).

    Usable on any file on disk (e.g. one an app shipped), not only right after an export.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if pin is None:
        pin = parity_inputs(spec)
    if ref is None:
        ref, ref_eager = spec.references(pin.samples)
    try:
        functions = fmt.implementation().open_runner(path, spec)
        v = verify_functions(functions, spec, precision, pin, ref, ref_eager)
    except Unverifiable as e:
        return "unverified", f"unverified: {e}", {}
    except Exception as e:  # noqa: BLE001 - a file its runtime cannot run is a failure
        return "failed", f"the {fmt.title} runtime could not run the file: {type(e).__name__}: {e}", {}
    return v.pop("status"), v.pop("reason"), v


__all__ = ["export_model", "verify_file", "build_model", "FORMATS"]

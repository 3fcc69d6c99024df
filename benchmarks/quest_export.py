"""QuEST's low-bit phone files of the benchmark UNet (``ddpm_digits16``, 1.16 M parameters).

Quantizes the FP model with the QuEST toolkit (MSE-searched per-channel weight grids, round to
nearest; min-max activations calibrated on a data-free DDIM calibration set; one activation set,
``per_step=False``, at W4A8 and W8A8, since a native file holds one; one per step at W4A4), exports:

- W4A8 -> CoreML (iOS 18): the 4-bit codes as int4 weights, activation grids as quantize/dequantize;
  its size against the fp32 package of the same model (bound: <= 1/6), the package as written
  (compact) and as coremltools writes it (full), the lossless weight check;
- W8A8 -> TFLite full integer: parity and latency beside the fp32 file (one run, 2 threads,
  interleaved, the exporter's own timing);
- W4A4 -> fake-quant float graphs (CoreML and TFLite) carrying all 10 activation sets, the set
  chosen in the graph from the timestep;

each verified by the exporter against the fake-quant model, and reports how far each fake-quant
model is from the FP model (what quantization costs, for context). Writes
``benchmarks/results/quest_export.{md,json}``.

    python benchmarks/quest_export.py                      # the FP checkpoint of `vizoo quantize`, if any
    python benchmarks/quest_export.py --checkpoint runs/quest_fp/last_ema.safetensors
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vizoo import quiet  # noqa: E402

quiet.install()
from vizoo.export import export_model  # noqa: E402
from vizoo.export.inputs import draw_inputs  # noqa: E402
from vizoo.export.report import path_size  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CHECKPOINT = Path("runs/quest_fp/last_ema.safetensors")


def fp_model(checkpoint: Path | None, seed: int) -> tuple[torch.nn.Module, str]:
    """The trained FP UNet when a checkpoint is there, else seeded random weights."""
    from vizoo.factory import create_model
    from vizoo.hub import load_model

    if checkpoint is not None and checkpoint.is_file():
        return load_model(checkpoint, name="ddpm_digits16").eval(), f"trained weights ({checkpoint})"
    torch.manual_seed(seed)
    return create_model("ddpm_digits16").eval(), f"random weights (seed {seed}; no checkpoint at {checkpoint})"


def quantize(fp: torch.nn.Module, calib: Any, w_bits: int, a_bits: int, per_step: bool = False) -> Any:
    """QuEST toolkit, fast path: MSE weight grids + round to nearest, min-max activations."""
    from vizoo.quant import QuantConfig, QuantUNet, init_act_quantizers, init_weight_quantizers

    q = QuantUNet(fp, QuantConfig(w_bits=w_bits, a_bits=a_bits, per_step=per_step, weight_init="mse"),
                  calib.t.tolist())
    init_weight_quantizers(q)
    init_act_quantizers(q, calib)
    return q


@torch.no_grad()
def error_vs_fp(fp: torch.nn.Module, q: Any, n: int = 16) -> dict[str, float]:
    """The fake-quant model against the FP model on the exporter's parity inputs (context)."""
    samples, _ = draw_inputs(fp, fp.example_inputs(), n, 0)
    mse, cos = [], []
    for s in samples:
        a, b = fp(*s), q(*s)
        mse.append(float(((a - b) ** 2).mean()))
        cos.append(float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)))
    return {"eps_mse_vs_fp": sum(mse) / n, "eps_cosine_vs_fp_min": min(cos)}


def package_parts(path: str) -> dict[str, int]:
    """Bytes of a .mlpackage: the weights file and the program description."""
    p = Path(path)
    weights = sum(f.stat().st_size for f in p.glob("Data/*/weights/*"))
    description = sum(f.stat().st_size for f in p.glob("Data/*/model.mlmodel"))
    return {"total": path_size(p), "weights": weights, "description": description,
            "other": path_size(p) - weights - description}


def result_row(r: Any) -> dict[str, Any]:
    p = r.parity() if r.verification else {}
    return {"format": r.format, "precision": r.precision, "status": r.status, "reason": r.reason[:300],
            "file": r.file, "size_bytes": r.size_bytes, "size_vs_fp32": r.details.get("size_vs_fp32"),
            "parity": {k: p.get(k) for k in ("rel_max_abs_diff", "rel_max_abs_median", "cosine_min", "cosine_mean")},
            "bounds": r.verification.get("bounds"), "float32_noise_floor": r.verification.get("float32_noise_floor"),
            "latency_ms": (r.latency or {}).get("median_ms"), "lowbit": r.details.get("lowbit"),
            "weight_storage": r.details.get("weight_storage"), "package": r.details.get("package"),
            "xnnpack": r.details.get("xnnpack"), "quantization": r.details.get("quantization"),
            "seconds": round(r.seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--out", type=Path, default=Path("runs/quest_export"))
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--images", type=int, default=16, help="parity samples per file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json in --results")
    args = ap.parse_args()
    if args.render:
        out = json.loads((args.results / "quest_export.json").read_text())
        (args.results / "quest_export.md").write_text(markdown(out))
        return
    torch.set_num_threads(args.threads)
    t0 = time.time()
    from vizoo.quant import collect_calibration

    fp, source = fp_model(args.checkpoint, args.seed)
    calib = collect_calibration(fp, n_samples=args.calib_samples, num_steps=20, keep_every=2, seed=args.seed,
                                with_eps=False)
    # native files hold one activation set; the W4A4 fake-quant graph carries all 10 (per step)
    models = {tag: quantize(fp, calib, w, a, per_step) for tag, (w, a, per_step) in
              {"w4a8": (4, 8, False), "w8a8": (8, 8, False), "w4a4": (4, 4, True)}.items()}
    out: dict[str, Any] = {"model": "ddpm_digits16", "weights": source,
                           "params": sum(p.numel() for p in fp.parameters()),
                           "quantization": "QuEST toolkit: MSE per-channel weight grids, round to nearest; min-max "
                                           f"activations on a DDIM calibration set ({args.calib_samples} trajectories "
                                           "x 10 kept steps of 20); W4A8/W8A8: one activation set (per_step=False, "
                                           "what a native file holds), W4A4: one set per calibrated step, all "
                                           "carried by its fake-quant graph",
                           "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                           "error_vs_fp": {k: error_vs_fp(fp, q) for k, q in models.items()}, "exports": {}}
    common = {"verify_images": args.images, "threads": args.threads, "name": "ddpm_digits16"}
    plan = {"w4a8": dict(formats="coreml", precision=["fp32", "w4a8"], latency=False),
            "w8a8": dict(formats="tflite", precision=["fp32", "w8a8"], latency=True, calibration_data=calib),
            "w4a4": dict(formats=["coreml", "tflite"], precision="w4a4", latency=False)}
    for tag, kwargs in plan.items():
        report = export_model(models[tag], out_dir=args.out / tag, **common, **kwargs)
        print(report.summary(), flush=True)
        out["exports"][tag] = {"results": [result_row(r) for r in report.results],
                               "pytorch_latency_ms": (report.pytorch_latency or {}).get("median_ms")}
    # the same two packages as coremltools writes them (no compaction), unverified: for the record
    full = export_model(models["w4a8"], formats="coreml", precision=["fp32", "w4a8"], out_dir=args.out / "w4a8_full",
                        verify=False, latency=False, package="full", name="ddpm_digits16")
    rows = {r.precision: r for r in full.results}
    w4 = {r["precision"]: r for r in out["exports"]["w4a8"]["results"]}
    out["coreml_sizes"] = {
        "compact": {p: package_parts(w4[p]["file"]) for p in ("fp32", "w4a8")},
        "full": {p: package_parts(rows[p].file) for p in ("fp32", "w4a8")}}
    for form in ("compact", "full"):
        sizes = out["coreml_sizes"][form]
        sizes["ratio_w4a8_vs_fp32"] = sizes["w4a8"]["total"] / sizes["fp32"]["total"]
    w8 = {r["precision"]: r for r in out["exports"]["w8a8"]["results"]}
    out["tflite_latency"] = {"fp32_ms": w8["fp32"]["latency_ms"], "w8a8_ms": w8["w8a8"]["latency_ms"],
                             "pytorch_ms": out["exports"]["w8a8"]["pytorch_latency_ms"], "threads": args.threads}
    out["seconds"] = round(time.time() - t0, 1)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "quest_export.json").write_text(json.dumps(out, indent=2, default=str))
    (args.results / "quest_export.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict[str, Any]) -> str:
    sz = out["coreml_sizes"]
    lines = [f"# QuEST low-bit files: {out['model']} ({out['params'] / 1e6:.2f} M parameters, {out['weights']})", "",
             out["quantization"] + ".", "",
             "## CoreML W4A8 package vs fp32 (bound: <= 1/6)", "",
             "| package | fp32 bytes | w4a8 bytes | ratio | w4a8 weights / description |", "|---|---|---|---|---|"]
    for form in ("compact", "full"):
        s = sz[form]
        ratio = s["ratio_w4a8_vs_fp32"]
        lines.append(f"| {form} | {s['fp32']['total']:,} | {s['w4a8']['total']:,} | {ratio:.4f} (1/{1 / ratio:.2f}) "
                     f"| {s['w4a8']['weights']:,} / {s['w4a8']['description']:,} |")
    lines += ["", "compact (the exporter's default, `package=\"compact\"`): identical constants merged, float "
                  "constants under 256 elements kept in the description instead of the weight file, short value "
                  "names, no ExecuTorch debug map; full: as coremltools writes it. Same program either way.", "",
              "## Every file, verified against the fake-quant model", "",
              "| file | status | size | x fp32 | rel. max diff (median sample) | worst cosine | bound (rel / cos) "
              "| fp32 noise floor of the model (rel / cos) | latency |", "|---|---|---|---|---|---|---|---|---|"]
    for tag, exp in out["exports"].items():
        for r in exp["results"]:
            p, b, f = r["parity"], r["bounds"] or {}, r["float32_noise_floor"]
            fl = f"{f['rel_max_abs_diff']:.2g} / {f['cosine_min']:.5f}" if f else "-"
            lat = f"{r['latency_ms']:.2f} ms" if r["latency_ms"] else "-"
            ratio = f"{r['size_vs_fp32']:.3f}" if r["size_vs_fp32"] else "-"
            bound = (f"{b['rel_max_abs']:.3g}" if b.get("rel_max_abs") else "-") + (
                f" / {b['cosine_min']:.6g}" if b else "")
            rel = (f"{p['rel_max_abs_diff']:.2g} ({p['rel_max_abs_median']:.2g})"
                   if p.get("rel_max_abs_diff") is not None else "-")
            cos = f"{p['cosine_min']:.6f}" if p.get("cosine_min") is not None else "-"
            lines.append(f"| {tag}: {r['format']} {r['precision']} | {r['status']} | {r['size_bytes']:,} | {ratio} | "
                         f"{rel} | {cos} | {bound} | {fl} | {lat} |")
    low = next(r["lowbit"] for r in out["exports"]["w4a8"]["results"] if r["precision"] == "w4a8")
    ll, grids = low["weights_lossless"], low["activation_grids"]
    lat = out["tflite_latency"]
    lines += ["", f"W4A8 weights: {ll['bit_identical']}/{ll['layers']} layers bit-identical to QuEST's dequantized "
                  f"weights (codes, Δ, Z and Core ML's expansion; max |diff| {ll['max_abs_diff']:g}); activation "
                  f"grids carried: {grids['carried']}/{grids['quantizers']} ({grids['quantize_ops']} distinct "
                  "quantize ops).",
              "", f"TFLite latency (one run, {lat['threads']} threads, interleaved): fp32 {lat['fp32_ms']:.3f} ms, "
                  f"W8A8 {lat['w8a8_ms']:.3f} ms ({lat['w8a8_ms'] / lat['fp32_ms']:.2f}x), PyTorch eager "
                  f"{lat['pytorch_ms']:.2f} ms.", "",
              "## The fake-quant models vs the FP model (what quantization costs; context)", "",
              "| model | eps MSE vs FP | worst eps cosine vs FP |", "|---|---|---|"]
    for tag, e in out["error_vs_fp"].items():
        lines.append(f"| {tag} | {e['eps_mse_vs_fp']:.3g} | {e['eps_cosine_vs_fp_min']:.4f} |")
    lines += ["", f"Machine: {out['machine']}; {out['seconds']:.0f} s in all. `python benchmarks/quest_export.py`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

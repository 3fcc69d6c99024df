"""XNNPACK's fast path, measured in ONE run: EvoNorm-S0 against B0 and the BN twin, and int8 vs fp32.

    python benchmarks/fast_path.py [--rounds 15] [--quickstart runs/quickstart/train/best.safetensors]

1. fp32, 224 px: timm mobilenetv2_100 (BN folded), mobilenetv2_100_evob0, mobilenetv2_100_evos0
   (vizoo's export form: group statistics as grouped 1x1 convs) and mobilenetv2_100_evos0 converted
   in its eager form (what the exporter wrote before: reshape/expand group averages). Each vizoo
   file is verified on 64 bundled photographs (parity against PyTorch).
2. int8 vs fp32 at each model's size: full-integer files of the same models (and the eager-form S0
   quantized with the plain static_wi8_ai8 recipe, as before), and the quickstart model at 32 px
   (the trained checkpoint if given/present, exported as the quickstart does with int8_mode auto;
   else an untrained one).
3. Single ops at a MobileNetV2-sized tensor (1x56x56x144), fp32 vs int8: which ops int8 makes cheaper.

For every file: XNNPACK partitions and the ops left outside, read from the interpreter after
delegation. All TFLite files are timed in interleaved rounds (every file once per round, 2 threads,
batch 1), so load from other processes hits them alike; per-round ratios give the spread. Writes
benchmarks/results/fast_path_bench.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed_rounds(fns: dict[str, Callable[[], Any]], rounds: int, seconds_per_call: float = 0.25,
                 warmup: int = 5) -> dict[str, list[float]]:
    """Per-round median latency (ms) of every function, rounds interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    runs = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        runs[k] = max(3, min(60, int(seconds_per_call / max(time.perf_counter() - t0, 1e-6))))
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            ts = []
            for _ in range(runs[k]):
                t0 = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t0) * 1e3)
            out[k].append(statistics.median(ts))
    return out


def ratio(rounds: dict[str, list[float]], a: str, b: str) -> dict[str, float]:
    """a / b: the median of the per-round ratios (a load spike hits both files of a round), and
    their spread (min, max)."""
    per = [x / y for x, y in zip(rounds[a], rounds[b])]
    return {"ratio": statistics.median(per), "round_min": min(per), "round_max": max(per)}


def eager_form_tflite(model: torch.nn.Module, size: int, path: Path) -> bytes:
    """The model converted WITHOUT export mode (EvoNorm's eager group average), NHWC input."""
    import litert_torch

    litert_torch.config.show_progress = False
    x = torch.rand(1, size, size, 3)
    data = bytes(litert_torch.convert(litert_torch.to_channel_last_io(model.eval(), args=[0]).eval(),
                                      (x,)).model_content())
    path.write_bytes(data)
    return data


def plain_full_int8(fp32: bytes, size: int, path: Path) -> bytes:
    """ai-edge-quantizer's plain static_wi8_ai8 (every op int8, RSQRT too), calibrated on photographs."""
    from ai_edge_quantizer import quantizer, recipe

    from vizoo.data.bundled import normalize, photo_images
    from vizoo.export.tflite import _signature_inputs

    x = normalize(photo_images(64, size, 3, seed=1), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    name = _signature_inputs(fp32)[0]
    q = quantizer.Quantizer(bytearray(fp32), recipe.static_wi8_ai8())
    ranges = q.calibrate({"serving_default": [{name: xi[None].permute(0, 2, 3, 1).numpy()} for xi in x]})
    data = bytes(q.quantize(ranges, enable_progress_report=False).quantized_model)
    path.write_bytes(data)
    return data


def op_costs(out: Path, rounds: int) -> list[dict[str, Any]]:
    """fp32 vs int8 time of single ops after a 1x1 conv, at 1x56x56x144 (NHWC)."""
    import litert_torch
    import torch.nn as nn

    from vizoo.export import quantize
    from vizoo.export.tflite import _signature_inputs, timed_invoke

    litert_torch.config.show_progress = False
    c, s = 144, 56

    class Op(nn.Module):
        def __init__(self, kind: str):
            super().__init__()
            self.kind, self.conv = kind, nn.Conv2d(c, c, 1)
            self.v = nn.Parameter(torch.rand(c) + 0.5)

        def forward(self, x):
            x = self.conv(x)
            k = self.kind
            if k == "MEAN over H, W":
                return x.mean((2, 3), keepdim=True)
            if k == "LOGISTIC":
                return torch.sigmoid(x)
            if k == "SUB (x - per-channel mean)":
                return x - x.mean((2, 3), keepdim=True)
            if k == "MUL (x * x)":
                return x * x
            if k == "x * sigmoid(v x) (2 MUL, LOGISTIC)":
                return x * torch.sigmoid(x * self.v.view(1, -1, 1, 1))
            return x

    kinds = ["conv 1x1 alone", "MEAN over H, W", "LOGISTIC", "SUB (x - per-channel mean)", "MUL (x * x)",
             "x * sigmoid(v x) (2 MUL, LOGISTIC)"]
    fns = {}
    rng = np.random.default_rng(0)
    for k in kinds:
        torch.manual_seed(0)
        m = Op(k).eval()
        fp32 = bytes(litert_torch.convert(litert_torch.to_channel_last_io(m, args=[0]).eval(),
                                          (torch.randn(1, s, s, c),)).model_content())
        name = _signature_inputs(fp32)[0]
        calib = [{name: rng.standard_normal((1, s, s, c)).astype(np.float32)} for _ in range(8)]
        int8, _ = quantize.tflite_int8_static(fp32, calib, "full")
        fns[(k, "fp32")] = timed_invoke(fp32, 2)[0]
        fns[(k, "int8")] = timed_invoke(int8, 2)[0]
    r = timed_rounds({f"{k}|{p}": f for (k, p), f in fns.items()}, rounds)
    med = {k: statistics.median(v) for k, v in r.items()}
    base32, base8 = med["conv 1x1 alone|fp32"], med["conv 1x1 alone|int8"]
    rows = []
    for k in kinds:
        a, b = med[f"{k}|fp32"], med[f"{k}|int8"]
        row = {"op": k, "fp32_ms": a, "int8_ms": b}
        if k != "conv 1x1 alone":
            row.update(op_fp32_ms=a - base32, op_int8_ms=b - base8,
                       op_int8_over_fp32=(b - base8) / (a - base32) if a - base32 > 1e-4 else None)
        else:
            row.update(op_int8_over_fp32=b / a)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out-dir", default="exports/fast_path")
    ap.add_argument("--quickstart", default="runs/quickstart/train/best.safetensors",
                    help="the quickstart's trained checkpoint (untrained model when absent)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--skip-ops", action="store_true", help="skip the single-op table")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the 224 px files of an earlier run in --out-dir (re-time them; the "
                         "quickstart files are always re-exported)")
    ap.add_argument("--results", default=str(RESULTS / "fast_path_bench"))
    args = ap.parse_args(argv)

    import vizoo
    from export_matrix import estimate_running_stats
    from vizoo.export.api import build_model
    from vizoo.export.tflite import describe_delegation, timed_invoke, xnnpack_delegation
    from vizoo.io import write_text_atomic

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    files: dict[str, Path] = {}
    parity: dict[str, dict[str, Any]] = {}
    decisions: dict[str, Any] = {}

    # --- exports: vizoo's files (verified), the eager-form S0, plain full int8 of it -------------
    for name in ("timm:mobilenetv2_100", "mobilenetv2_100_evob0", "mobilenetv2_100_evos0"):
        folder = out / name.replace(":", "_")
        if args.reuse and (folder / "report.json").is_file() and (name != "mobilenetv2_100_evos0" or (
                folder / "eager_form_int8_plain.tflite").is_file()):
            for r in json.loads((folder / "report.json").read_text())["results"]:
                files[f"{name} {r['precision']}"] = Path(r["file"])
                fn = next(iter(r["verification"]["functions"].values()))["parity"]
                parity[f"{name} {r['precision']}"] = {"status": r["status"], **{k: fn.get(k) for k in (
                    "rel_max_abs_diff", "top1_agreement", "cosine_min")}}
            if name == "mobilenetv2_100_evos0":
                files[f"{name} fp32 eager form (before)"] = folder / "eager_form_fp32.tflite"
                files[f"{name} int8 eager form + plain recipe (before)"] = folder / "eager_form_int8_plain.tflite"
            continue
        torch.manual_seed(0)
        model = build_model(name)
        if name.endswith("evob0"):
            model = estimate_running_stats(model)
        rep = vizoo.export(model, formats="tflite", precision=["fp32", "int8"], name=name, out_dir=folder,
                           verify_images=args.images, latency=False, int8_mode="full")
        for r in rep.results:
            files[f"{name} {r.precision}"] = Path(r.file)
            parity[f"{name} {r.precision}"] = {"status": r.status, **{k: r.parity().get(k) for k in (
                "rel_max_abs_diff", "top1_agreement", "cosine_min")}}
        if name == "mobilenetv2_100_evos0":
            fp32_eager = eager_form_tflite(model, 224, folder / "eager_form_fp32.tflite")
            files[f"{name} fp32 eager form (before)"] = folder / "eager_form_fp32.tflite"
            plain_full_int8(fp32_eager, 224, folder / "eager_form_int8_plain.tflite")
            files[f"{name} int8 eager form + plain recipe (before)"] = folder / "eager_form_int8_plain.tflite"
        print(f"exported {name} ({time.time() - t_start:.0f} s)", flush=True)

    qs = Path(args.quickstart)
    trained = qs.is_file()
    if trained:
        from vizoo.data.digits import digits_split_tensors
        from vizoo.hub import load_model

        model = load_model(qs).eval()
        chans = int(model.pretrained_cfg["input_size"][0])
        held_out, calib = digits_split_tensors("val", 32, chans), digits_split_tensors("train", 32, chans)[0][:256]
        rep = vizoo.export(model, formats="tflite", precision=["fp32", "int8"], name="mobilenetv2_100_evos0",
                           out_dir=out / "quickstart", verify_data=held_out, calibration_data=calib, latency=False)
        for mode in ("full", "mixed", "dynamic"):  # every mode, to time each against fp32 in this run
            one = vizoo.export(model, formats="tflite", precision="int8", name="mobilenetv2_100_evos0",
                               out_dir=out / f"quickstart_{mode}", verify_data=held_out, calibration_data=calib,
                               latency=False, int8_mode=mode).results[0]
            files[f"quickstart int8 {mode}"] = Path(one.file)
            parity[f"quickstart int8 {mode}"] = {"status": one.status, "accuracy": one.parity().get("accuracy"),
                                                 "cosine_min": one.parity().get("cosine_min")}
    else:
        torch.manual_seed(0)
        model = build_model("mobilenetv2_100_evos0", num_classes=10)
        rep = vizoo.export(model, formats="tflite", precision=["fp32", "int8"], input_size=32,
                           name="mobilenetv2_100_evos0", out_dir=out / "quickstart", verify_images=16,
                           latency=False, int8_mode="full")
    for r in rep.results:
        key = f"quickstart {r.precision}"
        files[key] = Path(r.file)
        parity[key] = {"status": r.status, "accuracy": r.parity().get("accuracy"),
                       "reference_accuracy": r.parity().get("reference_accuracy"),
                       "cosine_min": r.parity().get("cosine_min"), "top1_agreement": r.parity().get("top1_agreement")}
        if r.precision == "int8":
            decisions["quickstart int8"] = {"int8_mode": r.int8_mode, "attempts": r.details.get("int8_attempts"),
                                            "decision": r.details.get("int8_decision"), "reason": r.reason}
    print(f"exported quickstart ({'trained' if trained else 'untrained'}) ({time.time() - t_start:.0f} s)", flush=True)

    # --- delegation and timing, one run -----------------------------------------------------------
    deleg = {k: xnnpack_delegation(p) for k, p in files.items()}
    fns = {k: timed_invoke(p, 2)[0] for k, p in files.items()}
    load_before = os.getloadavg()[0]
    rounds = timed_rounds(fns, args.rounds)
    load_after = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in rounds.items()}

    s0, b0 = "mobilenetv2_100_evos0 fp32", "mobilenetv2_100_evob0 fp32"
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_avg_1min": [round(load_before, 2), round(load_after, 2)], "rounds": args.rounds,
        "threads": 2, "batch": 1, "quickstart_trained": trained, "quickstart_checkpoint": str(qs) if trained else None,
        "files": {k: {"median_ms": round(med[k], 4), "per_round_ms": [round(v, 4) for v in rounds[k]],
                      "xnnpack": deleg[k], "parity": parity.get(k), "size_mb": round(files[k].stat().st_size / 1e6, 2)}
                  for k in files},
        "s0_over_b0": ratio(rounds, s0, b0),
        "s0_eager_over_b0": ratio(rounds, "mobilenetv2_100_evos0 fp32 eager form (before)", b0),
        "int8_over_fp32": {m: ratio(rounds, m, m.split(" int8")[0] + " fp32") for m in (
            "timm:mobilenetv2_100 int8", "mobilenetv2_100_evob0 int8", "mobilenetv2_100_evos0 int8",
            "quickstart int8", *[k for k in files if k.startswith("quickstart int8 ")])},
        "s0_before_int8_over_fp32": ratio(rounds, "mobilenetv2_100_evos0 int8 eager form + plain recipe (before)",
                                          "mobilenetv2_100_evos0 fp32 eager form (before)"),
        "decisions": decisions,
    }
    if not args.skip_ops:
        result["op_costs"] = op_costs(out, max(5, args.rounds // 2))

    # --- write ------------------------------------------------------------------------------------
    def f3(v: Any) -> str:
        return "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = [f"# XNNPACK fast path ({result['date']}, {result['machine']}, load {load_before:.1f}→{load_after:.1f})",
             "", f"`python benchmarks/fast_path.py --rounds {args.rounds}`. TFLite (ai-edge-litert, XNNPACK), "
             "batch 1, 2 threads; every file timed in the same interleaved rounds; ms = median of per-round "
             "medians; ratios = median of the per-round ratios. Shared 2-core machine: compare ratios, not milliseconds.", "",
             "| file | ms | XNNPACK partitions (ops outside) | parity | size MB |", "|---|---|---|---|---|"]
    for k in files:
        p = parity.get(k) or {}
        ptxt = ", ".join(f"{n} {f3(v)}" for n, v in p.items() if v is not None)
        lines.append(f"| {k} | {med[k]:.2f} | {describe_delegation(deleg[k]).replace(' XNNPACK partitions', '').replace(' XNNPACK partition', '')} "
                     f"| {ptxt} | {files[k].stat().st_size / 1e6:.2f} |")
    r = result["s0_over_b0"]
    lines += ["", f"EvoNorm-S0 / EvoNorm-B0 (fp32, 224 px): **{r['ratio']:.2f}x** (per-round {r['round_min']:.2f}–"
              f"{r['round_max']:.2f}); eager form before: {result['s0_eager_over_b0']['ratio']:.2f}x.", "",
              "| int8 / fp32 (same run) | ratio | per-round range |", "|---|---|---|"]
    for m, r in result["int8_over_fp32"].items():
        lines.append(f"| {m} | {r['ratio']:.2f} | {r['round_min']:.2f}–{r['round_max']:.2f} |")
    r = result["s0_before_int8_over_fp32"]
    lines.append(f"| mobilenetv2_100_evos0 before (eager form, plain recipe) | {r['ratio']:.2f} | "
                 f"{r['round_min']:.2f}–{r['round_max']:.2f} |")
    if decisions:
        d = decisions["quickstart int8"]
        lines += ["", f"Quickstart int8 ({'trained checkpoint ' + str(qs) if trained else 'untrained'}): auto kept "
                      f"**{d['int8_mode']}**; attempts: " + "; ".join(
                          f"{a['int8_mode']} {a['status']}" + (f" {a['latency_ratio']:.2f}x fp32" if a.get('latency_ratio') else "")
                          for a in d["attempts"] or [])]
    if "op_costs" in result:
        lines += ["", "Single ops after a 1x1 conv at 1x56x56x144 (NHWC), op time = file minus the conv-only file:", "",
                  "| op | fp32 ms | int8 ms | op int8 / op fp32 |", "|---|---|---|---|"]
        for row in result["op_costs"]:
            a = row.get("op_fp32_ms", row["fp32_ms"])
            b = row.get("op_int8_ms", row["int8_ms"])
            lines.append(f"| {row['op']} | {a:.3f} | {b:.3f} | {f3(row.get('op_int8_over_fp32'))} |")
    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(Path(args.results + ".md"), "\n".join(lines) + "\n")
    write_text_atomic(Path(args.results + ".json"), json.dumps(result, indent=1, default=str))
    print("\n".join(lines))
    print(f"\nwrote {args.results}.md/.json ({time.time() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency of the compact-CNN methods against their baselines, in ONE run (batch 1, 2 threads).

Pairs (each at its default input size):
    mobilenetv2_100_ulsam_a  vs  timm mobilenetv2_100     (ULSAM, 224 px)
    affnet_t                 vs  timm mobilevit_xs        (AFFNet-T, 256 px)
    affnet                   vs  timm mobilevit_s         (AFFNet, 256 px)
plus affnet_et alone. Every model is exported to TFLite (fp32, NHWC input) through vizoo's
exporter, which also verifies the file against PyTorch on real images; AFFNet's files hold the
FFT-free DFT form. TFLite (ai-edge-litert, XNNPACK) and PyTorch eager are then timed in
interleaved rounds (every model once per round), so load from other processes on a shared machine
hits all models alike; the ratios are the figures that hold.

With ``--profile`` the AFF models are also timed with parts removed (token mixers -> identity;
mask MLP skipped) to show where the time of the frequency mixer goes.

Writes benchmarks/results/latency_compact.md and .csv.
Run: python benchmarks/latency_compact.py [--rounds 8] [--profile]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from vizoo.counting import count_macs, count_params
from vizoo.export.api import build_model, export_model
from vizoo.export.bench import format_table, torch_threads, write_csv
from vizoo.export.tflite import timed_invoke
from vizoo.io import write_text_atomic
from vizoo.layers.aff import AdaptiveFrequencyFilter
from vizoo.layers.dft import irfft2_ortho_nhwc, rfft2_ortho_nhwc

PAIRS = (("mobilenetv2_100_ulsam_a", "timm:mobilenetv2_100"),
         ("affnet_t", "timm:mobilevit_xs"),
         ("affnet", "timm:mobilevit_s"))
EXTRA = ("affnet_et",)
PROFILED = ("affnet",)
RESULTS = Path(__file__).parent / "results"


# --- ablations for the profile --------------------------------------------------------------------

class _NoMaskAFF(nn.Module):
    """DFT -> inverse DFT + input, no mask MLP: the cost of the transforms alone."""

    def __init__(self, aff: AdaptiveFrequencyFilter):
        super().__init__()
        self.aff = aff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = rfft2_ortho_nhwc(x.permute(0, 2, 3, 1))
        return irfft2_ortho_nhwc(spec, x.shape[-1]).permute(0, 3, 1, 2) + x


def _replace_mixers(model: nn.Module, make: Callable[[AdaptiveFrequencyFilter], nn.Module]) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, AdaptiveFrequencyFilter):
                setattr(module, child_name, make(child))
    return model


ABLATIONS = {
    "no token mixer (identity)": lambda aff: nn.Identity(),
    "DFT + inverse only (no mask MLP)": _NoMaskAFF,
}


# --- measurement ----------------------------------------------------------------------------------

def _export(name: str, model: nn.Module, workdir: Path, verify_images: int, reuse: bool) -> dict[str, Any]:
    saved = workdir / _slug(name) / "report.json"
    if reuse and saved.is_file():  # a file exported (and verified) by an earlier run of this script
        res = next(r for r in json.loads(saved.read_text())["results"] if r["format"] == "tflite")
        fns = res.get("verification", {}).get("functions", {})
        parity = next(iter(fns.values()))["parity"] if fns else {}
        return {"file": res["file"], "size_mb": round((res["size_bytes"] or 0) / 1e6, 2),
                "status": res["status"], "max_abs_diff": parity.get("max_abs_diff"),
                "top1_agreement": parity.get("top1_agreement")}
    report = export_model(model, formats="tflite", precision="fp32", out_dir=workdir / _slug(name),
                          name=_slug(name), verify=verify_images > 0, verify_images=max(verify_images, 1),
                          latency=False, layout="nhwc")
    res = report.result("tflite", "fp32")
    if res.status == "failed":
        raise RuntimeError(f"{name}: TFLite export failed: {res.reason}")
    parity = res.parity() if res.verification else {}
    return {"file": res.file, "size_mb": round((res.size_bytes or 0) / 1e6, 2), "status": res.status,
            "max_abs_diff": parity.get("max_abs_diff"), "top1_agreement": parity.get("top1_agreement")}


def _slug(name: str) -> str:
    return name.replace("timm:", "timm_").replace(" ", "_").replace("(", "").replace(")", "").replace("+", "")


def _time_rounds(entries: list[dict[str, Any]], rounds: int, tflite_runs: int, torch_runs: int,
                 threads: int) -> None:
    """Interleaved timing: each round runs every model's TFLite file, then its PyTorch eager model."""
    for e in entries:
        invoke, _ = timed_invoke(e["file"], threads)
        e["_invoke"], e["_tfl"], e["_pt"] = invoke, [], []
        for _ in range(3):
            invoke()
    with torch_threads(threads), torch.no_grad():
        for e in entries:
            if e["_model"] is not None:
                for _ in range(2):
                    e["_model"](e["_x"])
        for _ in tqdm(range(rounds), desc="timing rounds"):
            for e in entries:
                for _ in range(tflite_runs):
                    t0 = time.perf_counter()
                    e["_invoke"]()
                    e["_tfl"].append((time.perf_counter() - t0) * 1e3)
                if e["_model"] is None:
                    continue
                for _ in range(torch_runs):
                    t0 = time.perf_counter()
                    e["_model"](e["_x"])
                    e["_pt"].append((time.perf_counter() - t0) * 1e3)
    for e in entries:
        e["tflite_ms"] = round(statistics.median(e["_tfl"]), 3)
        e["tflite_p10_ms"] = round(statistics.quantiles(e["_tfl"], n=10)[0], 3)
        e["tflite_min_ms"] = round(min(e["_tfl"]), 3)
        e["torch_ms"] = round(statistics.median(e["_pt"]), 3) if e["_pt"] else None
        e["tflite_vs_torch"] = round(e["torch_ms"] / e["tflite_ms"], 2) if e["torch_ms"] else None


def _entry(name: str, model: nn.Module, workdir: Path, verify_images: int, reuse: bool,
           eager: bool = True) -> dict[str, Any]:
    model.eval()
    size = tuple(model.pretrained_cfg["input_size"])
    with torch.no_grad():
        macs = count_macs(model, size)
    e = {"model": name, "input": "x".join(map(str, size)), "params_m": round(count_params(model) / 1e6, 3),
         "macs_g": round(macs / 1e9, 3)}
    e.update(_export(name, model, workdir, verify_images, reuse))
    e["_model"] = model if eager else None
    e["_x"] = torch.rand(1, *size)
    return e


def _profile_lines(by_name: dict[str, dict[str, Any]]) -> list[str]:
    """Where AFFNet's TFLite time goes, from the ablated files timed in the same rounds."""
    lines = ["## Where the time goes (TFLite, ablated AFFNet files timed in the same rounds)", ""]
    for base in PROFILED:
        full = by_name[base]["tflite_ms"]
        none = by_name[f"{base} (no token mixer (identity))"]["tflite_ms"]
        dft = by_name[f"{base} (DFT + inverse only (no mask MLP))"]["tflite_ms"]
        lines.append(f"- {base}: {full:.2f} ms in all; the token mixers take {full - none:.2f} ms "
                     f"({(full - none) / full:.0%}): DFT + inverse DFT {dft - none:.2f} ms "
                     f"({(dft - none) / full:.0%}), mask MLP + soft-shrink + complex product "
                     f"{full - dft:.2f} ms ({(full - dft) / full:.0%}); everything else (convs, norms, "
                     f"head) {none:.2f} ms.")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    ap.add_argument("--tflite-runs", type=int, default=5, help="TFLite invokes per model per round")
    ap.add_argument("--torch-runs", type=int, default=3, help="PyTorch forwards per model per round")
    ap.add_argument("--verify-images", type=int, default=16, help="real images for parity (0: skip)")
    ap.add_argument("--profile", action="store_true", help="also time AFFNet with parts removed")
    ap.add_argument("--workdir", default=None, help="where the TFLite files go (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true",
                    help="time files a previous run left in --workdir instead of re-exporting them")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="vizoo_latency_compact_"))

    names = [n for pair in PAIRS for n in pair] + list(EXTRA)
    entries = []
    for name in tqdm(names, desc="export + verify"):
        entries.append(_entry(name, build_model(name), workdir, args.verify_images, args.reuse))
    if args.profile:
        for base in PROFILED:
            for label, make in ABLATIONS.items():
                model = _replace_mixers(build_model(base), make)
                entries.append(_entry(f"{base} ({label})", model, workdir, 0, args.reuse, eager=False))
    _time_rounds(entries, args.rounds, args.tflite_runs, args.torch_runs, args.threads)

    by_name = {e["model"]: e for e in entries}
    pairs = []
    for method, base in PAIRS:
        m, b = by_name[method], by_name[base]
        pairs.append({"method": method, "baseline": base, "macs_ratio": round(m["macs_g"] / b["macs_g"], 3),
                      "params_ratio": round(m["params_m"] / b["params_m"], 3),
                      "tflite_speedup": round(b["tflite_ms"] / m["tflite_ms"], 3),
                      "tflite_speedup_p10": round(b["tflite_p10_ms"] / m["tflite_p10_ms"], 3),
                      "torch_speedup": round(b["torch_ms"] / m["torch_ms"], 3)})
    rows = [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]
    profile = _profile_lines(by_name) if args.profile else []
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_csv(rows, RESULTS / "latency_compact.csv")
    cols = ["model", "input", "params_m", "macs_g", "tflite_ms", "tflite_p10_ms", "torch_ms",
            "tflite_vs_torch", "size_mb", "status", "max_abs_diff", "top1_agreement"]
    md = [f"# Compact models: TFLite vs PyTorch latency ({args.threads} threads, batch 1)", "",
          f"Machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}; "
          f"{args.rounds} interleaved rounds x {args.tflite_runs} TFLite invokes and {args.torch_runs} "
          "PyTorch forwards per model; medians (and TFLite 10th percentiles, less sensitive to other "
          "processes on a shared machine) over all runs. MACs by torch.utils.flop_counter "
          "(AFFNet's FFTs are not counted). TFLite files are fp32, NHWC input, exported and verified by "
          "`vizoo.export` (status/max_abs_diff/top1_agreement: the file vs PyTorch on real images).", "",
          format_table(rows, cols), "", "## Method vs baseline (speedup > 1: the method is faster)", "",
          format_table(pairs, ["method", "baseline", "macs_ratio", "params_ratio", "tflite_speedup",
                               "tflite_speedup_p10", "torch_speedup"]), "", *profile]
    write_text_atomic(RESULTS / "latency_compact.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Multi-task phone files of the continual benchmark: size and per-task latency vs one task's file.

Takes the tasks that `vizoo continual` trained (``--runs``, seed 0) for CLR (a per-task channel
affine after each unwrapped 1x1 conv) and CLR-Full (every conv reprogrammed, every BN folded into
its task's kernel), and for each:

- exports ONE TFLite file with a signature per task and ONE CoreML package with a function per
  task, each verified by the exporter against PyTorch with that task set;
- exports each task alone (one-task files, TFLite) and the first task alone (CoreML);
- reports size(N tasks) / size(one task) against the bound 1 + 0.05 N, and each task's latency
  in the multi-task file vs its one-task file, timed interleaved in one run (TFLite, batch 1,
  2 threads, each timing 50 calls; the anchor without reprogramming beside them for context).
  Exports already in ``--out`` (their report.json) are reused.

    python benchmarks/clr_export.py --runs runs/continual --out benchmarks/results/clr_export
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vizoo import quiet  # noqa: E402

quiet.install()
from vizoo.continual.benchmark import backbone_cfg  # noqa: E402
from vizoo.export import export_model  # noqa: E402
from vizoo.export.bench import interleaved  # noqa: E402
from vizoo.export.tflite import interpreter_class  # noqa: E402
from vizoo.models.clr import build_continual, resnet18_025  # noqa: E402


def load_bank(runs: Path, method: str, seed: int, img_size: int):
    model = build_continual(resnet18_025(), 0, method=method, backbone_checkpoint=runs / "backbone" / "best.safetensors")
    model.pretrained_cfg = {**backbone_cfg(img_size), "architecture": "clr_resnet18_025"}
    folders = sorted((runs / method / f"seed{seed}").glob("[0-9][0-9]_*"))
    if not folders:
        raise SystemExit(f"no trained tasks in {runs / method / f'seed{seed}'}: run `vizoo continual --out {runs}` first")
    for folder in folders:
        model.load_task(folder / "task_state.safetensors")
    return model.eval()


def exported(out: Path, model, formats, **kwargs) -> dict:
    """Export (or, with a report already in ``out``, reuse) and return {format: result dict}."""
    report = out / "report.json"
    if not report.is_file():
        export_model(model, formats, out_dir=out, latency=False, **kwargs)
    return {r["format"]: r for r in json.loads(report.read_text())["results"]}


def signature_call(path: str, signature: str, x: np.ndarray, threads: int, repeat: int):
    """``repeat`` calls of one signature (a file this small runs in ~0.1 ms: one timing spans
    several calls so the clock's resolution and Python's overhead do not dominate)."""
    Interpreter, _ = interpreter_class()
    it = Interpreter(model_path=path, num_threads=threads)
    runner = it.get_signature_runner(signature)
    name = next(iter(runner.get_input_details()))
    feed = {name: np.ascontiguousarray(np.moveaxis(x, 1, -1))}  # the files take NHWC

    def call() -> None:
        for _ in range(repeat):
            runner(**feed)
    return call


def _per_call(lat, repeat: int):
    """A Latency of ``repeat`` calls, expressed per call."""
    import dataclasses

    return dataclasses.replace(lat, median_ms=lat.median_ms / repeat, p25_ms=lat.p25_ms / repeat,
                               p75_ms=lat.p75_ms / repeat, min_ms=lat.min_ms / repeat)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="runs/continual")
    ap.add_argument("--out", default="benchmarks/results/clr_export")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["clr", "clr_full"])
    ap.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds")
    ap.add_argument("--repeat", type=int, default=50, help="calls per timing sample")
    args = ap.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    x = np.random.default_rng(0).standard_normal((1, 3, args.img_size, args.img_size)).astype(np.float32)
    record = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "img_size": args.img_size, "methods": {}}
    fns, lines = {}, []
    anchor = resnet18_025()
    anchor.reset_classifier(0)
    anchor.pretrained_cfg = backbone_cfg(args.img_size)
    anchor_file = exported(out / "anchor", anchor, "tflite", name="resnet18_025_anchor", verify_images=8)["tflite"]
    fns["anchor (no reprogramming, BN folded)"] = signature_call(anchor_file["file"], "serving_default", x,
                                                                 args.threads, args.repeat)
    for method in args.methods:
        model = load_bank(runs, method, args.seed, args.img_size)
        tasks = model.tasks
        multi = exported(out / method / "all_tasks", model, ["tflite", "coreml"], verify_images=32)
        modules = model.export_functions()
        singles = {}
        for task in tasks:
            r = exported(out / method / f"one_{task}", modules[task], ["tflite", "coreml"] if task == tasks[0]
                         else "tflite", name=f"{method}_{task}", verify_images=8)
            singles[task] = r
        tfl, cml = multi["tflite"], multi["coreml"]
        one = singles[tasks[0]]
        bound = 1 + 0.05 * len(tasks)
        entry = {
            "tasks": tasks, "verified": {"tflite": tfl["status"], "coreml": cml["status"],
                                         "functions": sorted(tfl["verification"]["functions"])},
            "tflite_bytes": {"all_tasks": tfl["size_bytes"], "one_task": one["tflite"]["size_bytes"]},
            "coreml_bytes": {"all_tasks": cml["size_bytes"], "one_task": one["coreml"]["size_bytes"]},
            "size_bound": bound,
        }
        entry["tflite_ratio"] = entry["tflite_bytes"]["all_tasks"] / entry["tflite_bytes"]["one_task"]
        entry["coreml_ratio"] = entry["coreml_bytes"]["all_tasks"] / entry["coreml_bytes"]["one_task"]
        record["methods"][method] = entry
        for task in tasks:
            fns[f"{method} {task}: all-tasks file"] = signature_call(tfl["file"], task, x, args.threads, args.repeat)
            fns[f"{method} {task}: one-task file"] = signature_call(singles[task]["tflite"]["file"], "serving_default",
                                                                    x, args.threads, args.repeat)
    lat = interleaved(fns, rounds=args.rounds, runs=10, warmup=3, threads=args.threads, batch=1, budget_s=600)
    lat = {k: _per_call(v, args.repeat) for k, v in lat.items()}
    record["latency_ms"] = {k: v.to_dict() for k, v in lat.items()}
    lines.append(f"# Multi-task CLR files ({record['date']}, TFLite {args.threads} threads, batch 1, "
                 f"{args.img_size} px, one interleaved run)\n")
    lines.append("| method | tasks | TFLite all / one task | CoreML all / one task | bound 1 + 0.05 N |")
    lines.append("|---|---|---|---|---|")
    for method, e in record["methods"].items():
        lines.append(f"| {method} | {len(e['tasks'])} | {e['tflite_bytes']['all_tasks'] / 1e6:.3f} / "
                     f"{e['tflite_bytes']['one_task'] / 1e6:.3f} MB = {e['tflite_ratio']:.3f} | "
                     f"{e['coreml_bytes']['all_tasks'] / 1e6:.3f} / {e['coreml_bytes']['one_task'] / 1e6:.3f} MB = "
                     f"{e['coreml_ratio']:.3f} | {e['size_bound']:.2f} |")
    lines.append("\n| TFLite latency | median ms | all-tasks / one-task |")
    lines.append("|---|---|---|")
    for key, v in lat.items():
        ratio = ""
        if key.endswith("all-tasks file"):
            one = lat[key.replace("all-tasks file", "one-task file")]
            ratio = f"{v.median_ms / one.median_ms:.3f}"
            record.setdefault("latency_ratio", {})[key.split(":")[0]] = round(v.median_ms / one.median_ms, 4)
        lines.append(f"| {key} | {v.median_ms:.3f} | {ratio} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(2)
    sys.exit(main())

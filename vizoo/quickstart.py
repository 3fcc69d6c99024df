"""`vizoo quickstart`: the main job end to end on bundled data, in one command.

train (engine) -> evaluate (held-out digits) -> export (CoreML + TFLite) -> verify (parity of
each file against the PyTorch model) -> benchmark (batch-1 CPU latency), then one summary table.
Everything lands in ``--out``; a rerun with ``--resume`` continues an interrupted training run.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "mobilenetv2_100_evos0"
CALIBRATION_DIGITS = 256  # training digits the int8 file is calibrated on (never the held-out ones)


def run_quickstart(model: str = DEFAULT_MODEL, out: str | Path = "runs/quickstart", epochs: int = 10,
                   img_size: int = 32, batch_size: int | None = None, formats: tuple[str, ...] = ("coreml", "tflite"),
                   precisions: tuple[str, ...] = ("fp32", "int8"), threads: int = 2,
                   resume: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the main job and return (and write ``summary.json``) the figures of every stage."""
    from .data.digits import digits_split_tensors
    from .engine import evaluate, train
    from .export import export_model
    from .hub import load_model
    from .io import write_json_atomic

    out = Path(out)
    t0 = time.perf_counter()
    recipe = {"batch_size": batch_size} if batch_size else {}  # else the digits recipe's
    result = train(model=model, data="digits", img_size=img_size, epochs=epochs, out=str(out / "train"),
                   resume="auto" if resume else None, seed=seed, **recipe)
    train_s = time.perf_counter() - t0
    ckpt = result.best_path or result.last_path

    ev = evaluate(ckpt, data="digits", img_size=img_size, out_dir=out / "eval")

    trained = load_model(ckpt)
    chans = int(trained.pretrained_cfg.get("input_size", (3,))[0])
    held_out = digits_split_tensors("val", img_size, chans)
    # every file is verified on the held-out digits with their labels, so the report gives each
    # file's accuracy beside PyTorch's. TFLite int8 is calibrated on training digits and int8_mode
    # "auto" keeps the most integer file that passes (full, else mixed, else dynamic range)
    calibration = digits_split_tensors("train", img_size, chans)[0][:CALIBRATION_DIGITS]
    report = export_model(trained, formats=formats, precision=list(precisions), out_dir=out / "export",
                          name=model, verify=True, verify_data=held_out, calibration_data=calibration,
                          latency=True, threads=threads)
    summary = {
        "model": model,
        "train": {"epochs": epochs, "img_size": img_size, "seconds": round(train_s, 1),
                  "val_top1": result.metrics.get("val_top1"), "best_val_top1": result.best_metric,
                  "run_dir": str(result.run_dir),
                  "checkpoint": str(ckpt)},
        "eval": {"top1": ev.get("top1"), "top5": ev.get("top5"), "n": ev.get("num_samples")},
        "export": [_result_row(r) for r in report.results],
        "pytorch_latency_ms": (report.pytorch_latency or {}).get("median_ms"),
        "report": report.path,
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def _result_row(r: Any) -> dict[str, Any]:
    functions = (r.verification or {}).get("functions") or {}
    # the function verified on the most images (CoreML's tensor function: all held-out digits)
    parity = max((f["parity"] for f in functions.values()), key=lambda p: p.get("n_samples", 0), default={})
    return {"format": r.format, "precision": r.precision, "status": r.status, "reason": r.reason,
            "file": r.file, "size_mb": round(r.size_bytes / 1e6, 3) if r.size_bytes else None,
            "max_abs_diff": parity.get("max_abs_diff"), "cosine_min": parity.get("cosine_min"),
            "top1_agreement": parity.get("top1_agreement"),
            "accuracy": parity.get("accuracy"), "pytorch_accuracy": parity.get("reference_accuracy"),
            "latency_ms": (r.latency or {}).get("median_ms"),
            "int8_mode": r.int8_mode}


def format_summary(s: dict[str, Any]) -> str:
    """The one table the main job prints."""
    lines = [f"vizoo quickstart: {s['model']} on bundled digits ({s['train']['img_size']} px)", ""]
    lines.append(f"{'stage':<30} result")
    lines.append(f"{'train':<30} {s['train']['epochs']} epochs in {s['train']['seconds']:.0f} s, "
                 f"val top-1 {_pct(s['train']['val_top1'])} (best {_pct(s['train'].get('best_val_top1'))}, "
                 "the checkpoint exported below)")
    lines.append(f"{'evaluate':<30} top-1 {_pct(s['eval']['top1'])}, top-5 {_pct(s['eval']['top5'])} "
                 f"on {s['eval']['n']} held-out digits")
    if s.get("pytorch_latency_ms") is not None:
        lines.append(f"{'pytorch latency':<30} {s['pytorch_latency_ms']:.2f} ms (batch 1, CPU)")
    for r in s["export"]:
        stage = f"export {r['format']} {r['precision']}"
        if r.get("int8_mode"):  # which int8 auto kept (full integer, mixed or dynamic range)
            stage += f" ({r['int8_mode']})"
        if r["status"] != "ok":
            lines.append(f"{stage:<30} {r['status'].upper()}: {r['reason']}")
            continue
        parts = [f"{r['size_mb']:.2f} MB" if r["size_mb"] else "",
                 f"max|d| {r['max_abs_diff']:.2g}" if r["max_abs_diff"] is not None else "",
                 f"cos {r['cosine_min']:.5f}" if r["cosine_min"] is not None else "",
                 f"top-1 agree {_pct(r['top1_agreement'])}" if r["top1_agreement"] is not None else "",
                 (f"accuracy {_pct(r['accuracy'])} (PyTorch {_pct(r['pytorch_accuracy'])})"
                  if r.get("accuracy") is not None else ""),
                 f"latency {r['latency_ms']:.2f} ms" if r["latency_ms"] else ""]
        lines.append(f"{stage:<30} verified: " + ", ".join(p for p in parts if p))
    lines += ["", f"report: {s['report']}"]
    return "\n".join(lines)


def _pct(x: Any) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    return f"{x:.2f}%" if x > 1 else f"{100 * x:.2f}%"


def _cmd_quickstart(args: argparse.Namespace) -> int:
    summary = run_quickstart(model=args.model, out=args.out, epochs=args.epochs, img_size=args.img_size,
                             batch_size=args.batch_size, formats=tuple(args.format),
                             precisions=tuple(args.precision), threads=args.threads, resume=args.resume)
    print(format_summary(summary))
    bad = [r for r in summary["export"] if r["status"] != "ok"]
    if args.json:
        print(json.dumps(summary, indent=2))
    return 1 if bad else 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from .engine.config import RECIPES

    p = subparsers.add_parser("quickstart", help="main job: train -> evaluate -> export -> verify -> "
                              "benchmark on the bundled digits")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default: the digits recipe's ({RECIPES['digits']['batch_size']})")
    p.add_argument("--format", nargs="+", default=["coreml", "tflite"])
    p.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue an interrupted training run")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    p.set_defaults(func=_cmd_quickstart)

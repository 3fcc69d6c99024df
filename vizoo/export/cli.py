"""`vizoo export` and `vizoo bench`; the format options come from the formats table."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .formats import FORMATS, PRECISIONS, all_options


def parse_img_size(text: str) -> int | tuple[int, int]:
    """``224`` or ``256x192`` (H x W)."""
    try:
        parts = [int(v) for v in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--img-size {text!r}: give N or HxW, e.g. 224 or 256x192") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"--img-size {text!r}: give N or HxW")


def _cmd_export(args: argparse.Namespace) -> int:
    from .api import build_model, export_model

    if args.tasks:  # a continual model: the anchor's weights + one signature / function per task
        from ..models.clr import bank_from_files

        model = bank_from_files(args.name, args.tasks, args.checkpoint)
    else:
        model = build_model(args.name, checkpoint=args.checkpoint)
    if args.quant_state:  # a QuEST-quantized UNet: the FP model above + its quantized state
        from ..quant import QuantUNet

        model = QuantUNet.from_file(model, args.quant_state)
    options = {k: getattr(args, k) for k in all_options() if getattr(args, k) is not None}
    report = export_model(model, formats=args.format, input_size=args.img_size,
                          precision=args.precision, out_dir=args.out, verify=args.verify,
                          calibration_data=args.calibration, name=args.name, batch_size=args.batch,
                          verify_images=args.images, latency=args.latency, threads=args.threads,
                          act_set=args.act_set, **options)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.summary())
    failed = [r for r in report.results if r.status == "failed"]
    return 1 if failed else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import bench_models, format_table, write_csv

    rows = bench_models(args.names, backends=args.backend, threads=args.threads, batch=args.batch,
                        img_size=args.img_size, warmup=args.warmup, runs=args.runs,
                        workdir=args.workdir)
    print(format_table(rows, ["model", "backend", "input", "threads", "batch", "median_ms", "p25_ms",
                              "p75_ms", "runs", "speedup_vs_torch"]))
    path = write_csv(rows, args.csv)
    print(f"\nwrote {path}")
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export", help="export a model to CoreML / TFLite and verify each file against PyTorch",
        description="Export NAME (a registered vizoo model, or timm:NAME) to each format and "
                    "precision, verify every file on bundled real images, write report.json.")
    p.add_argument("name", help="registered model name (see `vizoo list`), or timm:NAME")
    p.add_argument("--checkpoint", help="weights to export (.safetensors with its .json sidecar, or .pth); "
                                        "with --tasks, the frozen backbone's weights")
    p.add_argument("--tasks", nargs="+", metavar="FILE",
                   help="continual models (clr_*): task states (save_task / `vizoo continual`) to put in one "
                        "file, a TFLite signature / CoreML function per task")
    p.add_argument("--quant-state", metavar="FILE",
                   help="a QuEST-quantized UNet's state (QuantUNet.save_quant_state) on top of NAME/--checkpoint: "
                        "enables --precision w4a8 (CoreML int4 weights + int8 activation grids), w8a8 "
                        "(TFLite full integer) and w4a4 (fake-quant float graph)")
    p.add_argument("--act-set", type=int, default=None,
                   help="with --quant-state: which calibrated activation set a native low-bit file carries "
                        "(index into the calibrated timesteps; default the only one, else the middle one)")
    p.add_argument("--format", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=list(PRECISIONS))
    p.add_argument("--img-size", type=parse_img_size, help="N or HxW (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="static batch size of the files")
    p.add_argument("--out", help="output folder (default exports/NAME)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="run every file on real images and compare with PyTorch (default on)")
    p.add_argument("--images", type=int, default=64, help="parity images (default 64)")
    p.add_argument("--calibration", help="folder of images for int8 calibration "
                                         "(default: bundled photographs)")
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="time the TFLite file and PyTorch eager")
    p.add_argument("--threads", type=int, default=2, help="threads for latency (default 2)")
    for key, (fmt, allowed, text) in all_options().items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, choices=list(allowed), default=None,
                       help=f"[{fmt.name}] {text} (default {allowed[0]})")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser(
        "bench", help="latency table: PyTorch eager vs TFLite (median and spread, after warm-up)")
    p.add_argument("names", nargs="+", help="registered model names, or timm:NAME")
    p.add_argument("--backend", nargs="+", default=["torch", "tflite"], choices=["torch", "tflite"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--img-size", type=parse_img_size)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--csv", default="vizoo-bench.csv", help="CSV file to write (default vizoo-bench.csv)")
    p.add_argument("--workdir", default="exports/bench", help="where converted TFLite files are kept")
    p.set_defaults(func=_cmd_bench)


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="vizoo")
    register_cli(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))

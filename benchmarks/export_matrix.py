"""Export matrix: every registered model (at its default size) to CoreML and TFLite, verified.

    python benchmarks/export_matrix.py [--models 'evit*' ...] [--precision fp32 fp16 int8]
                                       [--timm mobilenetv2_100] [--redo]

Each model goes through `vizoo.export` (the same call users make): conversion, parity on 64
bundled photographs (TFLite by ai-edge-litert; CoreML by the MIL executor), TFLite latency
(ai-edge-litert, 2 threads, batch 1) and PyTorch eager latency (2 threads, batch 1) measured in
the same run. Writes benchmarks/results/export_matrix.{csv,md}; the README shows the table.

Resumable: rows already in the CSV are skipped (``--redo`` re-exports them); the CSV and the
Markdown are rewritten after every model. Weights are random (no download here): parity and
latency do not depend on training, but int8 parity on random weights is a harsher test than on
trained ones.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["model", "format", "precision", "status", "size_mb", "rel_max_abs_diff", "cosine_min",
           "top1_agreement", "eager_rel_max_abs_diff", "tflite_ms", "torch_ms", "tflite_speedup",
           "xnnpack_partitions", "ops_outside_xnnpack", "int8_vs_fp32", "input", "target", "seconds",
           "latency_threads", "load_avg", "reason"]


def outside_ops(info: dict[str, Any] | None) -> str:
    """``details['xnnpack']['ops_outside']`` as one cell: ``RSQRT×35 ADD×2`` (empty: none)."""
    if not info or "error" in info:
        return ""
    return " ".join(f"{op}×{k}" for op, k in info.get("ops_outside", {}).items())


def rows_from_report(report: Any) -> list[dict[str, Any]]:
    torch_ms = report.pytorch_latency["median_ms"] if report.pytorch_latency else None
    rows = []
    for r in report.results:
        fns = list(r.verification.get("functions", {}).values())
        worst = lambda key, f=max: f(fn["parity"][key] for fn in fns) if fns else None  # noqa: E731
        eager = [fn["parity_eager"]["rel_max_abs_diff"] for fn in fns if "parity_eager" in fn]
        top1 = [fn["parity"]["top1_agreement"] for fn in fns if fn["parity"].get("top1_agreement") is not None]
        tfl = r.latency["median_ms"] if r.latency else None
        mode = r.int8_mode
        precision = f"int8-{mode}" if r.format == "tflite" and r.precision == "int8" and mode else r.precision
        rows.append({
            "model": report.model, "format": r.format, "precision": precision, "status": r.status,
            "size_mb": round(r.size_bytes / 1e6, 2) if r.size_bytes else None,
            "rel_max_abs_diff": worst("rel_max_abs_diff"), "cosine_min": worst("cosine_min", min),
            "top1_agreement": min(top1) if top1 else None,
            "eager_rel_max_abs_diff": max(eager) if eager else None,
            "tflite_ms": round(tfl, 2) if tfl else None,
            "torch_ms": round(torch_ms, 2) if torch_ms else None,
            "tflite_speedup": round(torch_ms / tfl, 2) if tfl and torch_ms else None,
            "input": "x".join(map(str, report.input["shapes"][0])),
            # CoreML: the lowest deployment target the file's ops allow (iOS 15 ... 18)
            "target": r.details.get("minimum_deployment_target", ""), "seconds": round(r.seconds, 1),
            # TFLite: how XNNPACK runs the file, read from the interpreter after delegation
            "xnnpack_partitions": (r.details.get("xnnpack") or {}).get("partitions"),
            "ops_outside_xnnpack": outside_ops(r.details.get("xnnpack")),
            # int8: auto's own paired timing of the kept file against the fp32 file, when it has one
            "int8_vs_fp32": next((a["latency_ratio"] for a in r.details.get("int8_attempts", [])
                                  if a.get("int8_mode") == mode and a.get("latency_ratio") is not None), None),
            "reason": r.reason[:300],
        })
    _int8_vs_fp32(rows)
    return rows


def _int8_vs_fp32(rows: list[dict[str, Any]], retimed: bool = False) -> None:
    """TFLite int8 latency / fp32 latency of the same model, both timed in the same run: auto's paired
    timing when the row has it (``retimed``: the interleaved latency columns just measured)."""
    fp32 = {r["model"]: r.get("tflite_ms") for r in rows if r["format"] == "tflite" and r["precision"] == "fp32"}
    for r in rows:
        base = fp32.get(r["model"])
        if (r["format"] == "tflite" and str(r["precision"]).startswith("int8") and r.get("tflite_ms") and base
                and (retimed or r.get("int8_vs_fp32") in (None, ""))):
            r["int8_vs_fp32"] = round(float(r["tflite_ms"]) / float(base), 2)


def _kind(fmt: str, precision: str) -> str:
    """One row per model, format and precision: a TFLite int8 row is labelled with its int8 mode
    (int8-full, int8-mixed, int8-dynamic) and replaces the model's earlier int8 row."""
    return "int8" if fmt == "tflite" and precision.startswith("int8") else precision


def failed_rows(name: str, formats: list[str], precisions: list[str], err: Exception) -> list[dict[str, Any]]:
    return [{"model": name, "format": f, "precision": p, "status": "failed",
             "reason": f"{type(err).__name__}: {str(err)[:280]}"} for f in formats for p in precisions]


def estimate_running_stats(model: Any, passes: int = 30, images: int = 16) -> Any:
    """Set a random-weight model's running statistics (BatchNorm, EvoNorm-B0) from real photographs,
    as training would. EvoNorm-B0 nets at initialisation (running variance 1) are so
    ill-conditioned that PyTorch's own float32 output is 1.7e-2 of the output range away from
    float64 (mobilenetv2_100_evob0); with estimated statistics 6e-7, so parity measures the file."""
    import torch

    from vizoo.data.bundled import normalize, photo_images

    cfg = model.pretrained_cfg
    x = normalize(photo_images(images, cfg["input_size"][-1]), cfg["mean"], cfg["std"])
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    return model.eval()


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def write_rows(rows: list[dict[str, Any]], csv_path: Path, md_path: Path) -> None:
    from vizoo.io import write_text_atomic

    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(csv_path, buf.getvalue())
    write_text_atomic(md_path, markdown(rows))


def _num(v: Any, fmt: str) -> str:
    if v in (None, ""):
        return ""
    try:
        return format(float(v), fmt)
    except ValueError:
        return str(v)


def markdown(rows: list[dict[str, Any]]) -> str:
    from vizoo.export.verify import BOUNDS

    lines = [
        "| model | format | precision | status | size (MB) | parity: max abs diff / output range | "
        "worst cosine | top-1 agreement | CoreML target | TFLite ms | PyTorch ms | TFLite speed-up | "
        "XNNPACK partitions (ops outside) | int8 / fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:120]}"
        lines.append(" | ".join([
            f"| {r['model']}", r["format"], r["precision"], status, _num(r.get("size_mb"), ".2f"),
            _num(r.get("rel_max_abs_diff"), ".1e"), _num(r.get("cosine_min"), ".6f"),
            _num(r.get("top1_agreement"), ".0%"), r.get("target") or "", _num(r.get("tflite_ms"), ".2f"),
            _num(r.get("torch_ms"), ".2f"),
            (_num(r.get("tflite_speedup"), ".2f") + "x") if r.get("tflite_speedup") else "",
            (str(r.get("xnnpack_partitions") or "") + (f" ({r['ops_outside_xnnpack']})"
                                                      if r.get("ops_outside_xnnpack") else "")),
            _num(r.get("int8_vs_fp32"), ".2f"),
        ]) + " |")
    bounds = "; ".join(f"{p}: " + ", ".join(
        x for x in [f"max abs diff <= {b.rel_max_abs:g} of the output range" if b.rel_max_abs else "",
                    f"worst cosine >= {b.cosine_min:g}",
                    f"top-1 agreement >= {b.top1_min:.0%}" if b.top1_min is not None else ""] if x)
        for p, b in BOUNDS.items())
    return ("\n".join(lines) + "\n\nParity on 64 bundled photographs (CoreML multifunction "
            "packages: tensor function on 64, camera-image function on 16; a lone image function on "
            "64; the worst function is shown). Bounds: " + bounds +
            ". XNNPACK partitions: DELEGATE nodes in the ai-edge-litert interpreter after delegation "
            "(1 = the whole graph runs in XNNPACK), with the ops left outside it and their count. "
            "int8 / fp32: the TFLite int8 file's latency over the fp32 file's, timed in the same run "
            "(int8_mode auto's paired rounds: the median of per-round ratios; rows re-timed with "
            "--relatency: the interleaved medians). "
            "Latency: median of interleaved rounds (PyTorch eager and TFLite timed in the same "
            "run, after warm-up), batch 1, 2 threads unless the CSV's latency_threads says "
            "otherwise; load_avg in the CSV is the machine's 1-minute load then. Random weights; the "
            "running statistics of EvoNorm-B0 nets are estimated on 16 photographs first, as training "
            "would set them (at initialisation these nets are ill-conditioned: PyTorch's own float32 "
            "output is 1.7e-2 of the range away from float64).\n")


def retime(rows: list[dict[str, Any]], names: list[str], out_dir: Path, threads: int) -> None:
    """PyTorch eager vs every exported TFLite file of each model, interleaved in one run."""
    from vizoo.export.api import build_model
    from vizoo.export.bench import interleaved, torch_threads
    from vizoo.export.spec import resolve_spec
    from vizoo.export.tflite import timed_invoke

    import torch

    for name in tqdm(names, desc="latency"):
        mine = [r for r in rows if r["model"] == name]
        if not mine:
            continue
        spec = resolve_spec(build_model(name), name=name)
        folder = out_dir / name.replace(":", "_")
        files = {r["precision"]: folder / f"{spec.stem}_{_kind(r['format'], r['precision'])}.tflite" for r in mine
                 if r["format"] == "tflite" and r["status"] != "failed"}
        files = {p: f for p, f in files.items() if f.is_file()}
        with torch.no_grad(), torch_threads(threads):
            fns = {"torch": lambda: spec.module(*spec.example_inputs)}
            fns.update({p: timed_invoke(f, threads)[0] for p, f in files.items()})
            lat = interleaved(fns, rounds=5, runs=10, warmup=5, threads=threads, budget_s=120)
        torch_ms = lat["torch"].median_ms
        for r in mine:
            r.update(torch_ms=round(torch_ms, 2), load_avg=lat["torch"].load_avg,
                     latency_threads=threads)
            if r["format"] == "tflite" and r["precision"] in lat:
                tfl = lat[r["precision"]].median_ms
                r.update(tflite_ms=round(tfl, 2), tflite_speedup=round(torch_ms / tfl, 2))
        _int8_vs_fp32(mine, retimed=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["*"], help="name patterns (default: all registered)")
    ap.add_argument("--timm", nargs="*", default=["mobilenetv2_100"],
                    help="timm models to add (users' own models go through the same API)")
    ap.add_argument("--formats", nargs="+", default=["coreml", "tflite"])
    ap.add_argument("--precision", nargs="+", default=["fp32"])
    ap.add_argument("--out-dir", default="exports/matrix", help="where the exported files go")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--redo", action="store_true", help="re-export rows already in the CSV")
    ap.add_argument("--merge", nargs="*", default=[],
                    help="CSV files of other runs (e.g. a second process) to take rows from")
    ap.add_argument("--relatency", action="store_true",
                    help="only re-time PyTorch eager and the TFLite files already exported (e.g. "
                         "when the machine is quiet), updating the latency columns")
    ap.add_argument("--threads", type=int, default=2, help="threads for --relatency")
    ap.add_argument("--int8-mode", choices=("auto", "full", "mixed", "dynamic"), default="auto",
                    help="TFLite int8 (rows 'int8-<mode the file has>'): auto keeps the most integer "
                         "file that verifies (full, else mixed, else dynamic range)")
    ap.add_argument("--estimate-stats", nargs="*", default=["*evob0"],
                    help="models whose running statistics are first estimated on photographs "
                         "(random-init EvoNorm-B0 nets are ill-conditioned otherwise)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (no download here)")
    ap.add_argument("--no-latency", dest="latency", action="store_false",
                    help="export and verify only (time later with --relatency on a quiet machine)")
    args = ap.parse_args(argv)

    import torch

    import vizoo
    from vizoo.export.api import build_model

    names = vizoo.list_models(args.models) + [f"timm:{n}" for n in args.timm]
    results = Path(args.results)
    csv_path, md_path = results / "export_matrix.csv", results / "export_matrix.md"
    rows = read_rows(csv_path)
    for other in args.merge:
        extra = read_rows(Path(other))
        keys = {(r["model"], r["format"], r["precision"]) for r in extra}
        rows = [r for r in rows if (r["model"], r["format"], r["precision"]) not in keys] + extra
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (order.get(r["model"], len(order)), r["format"], r["precision"]))
    if args.relatency:
        retime(rows, names, Path(args.out_dir), args.threads)
        write_rows(rows, csv_path, md_path)
        print(f"re-timed latency in {csv_path} and {md_path}")
        return 0
    done = {(r["model"], r["format"], _kind(r["format"], r["precision"])) for r in rows}
    todo = [n for n in names if args.redo or any((n, f, _kind(f, p)) not in done for f in args.formats
                                                 for p in args.precision)]
    print(f"{len(names)} models, {len(names) - len(todo)} already done ({csv_path})")
    for name in tqdm(todo, desc="export matrix"):
        t0 = time.time()
        try:
            torch.manual_seed(args.seed)  # the same random weights every run (int8 modes depend on them)
            model = build_model(name)
            if any(fnmatch.fnmatch(name, pat) for pat in args.estimate_stats):
                model = estimate_running_stats(model)
            report = vizoo.export(model, formats=args.formats, precision=args.precision, name=name,
                                  out_dir=Path(args.out_dir) / name.replace(":", "_"),
                                  verify_images=args.images, latency=args.latency, int8_mode=args.int8_mode)
            new = rows_from_report(report)
        except Exception as e:  # noqa: BLE001 - one model's failure must not stop the matrix
            new = failed_rows(name, args.formats, args.precision, e)
        for r in new:  # the machine's load when timed: latencies on a shared machine need it
            r["load_avg"] = round(os.getloadavg()[0], 1)
            r["latency_threads"] = 2
        keys = {(r["model"], r["format"], _kind(r["format"], r["precision"])) for r in new}
        rows = [r for r in rows if (r["model"], r["format"], _kind(r["format"], r["precision"])) not in keys] + new
        rows.sort(key=lambda r: (order.get(r["model"], len(order)), r["format"], r["precision"]))
        write_rows(rows, csv_path, md_path)
        tqdm.write(f"{name}: " + ", ".join(f"{r['format']} {r['precision']} {r['status']}" for r in new)
                   + f" ({time.time() - t0:.0f} s)")
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (order.get(r["model"], len(order)), r["format"], r["precision"]))
    write_rows(rows, csv_path, md_path)
    bad = [r for r in rows if r["status"] == "failed"]
    print(f"wrote {csv_path} and {md_path}: {len(rows)} rows, {len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

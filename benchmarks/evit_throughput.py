"""EViT-DeiT-S (r = 0.7, fused) against timm's DeiT-S with the same weights, in one run.

- PyTorch eager, batch 32 (the paper's throughput setting, on this machine's CPU threads);
- TFLite (litert-torch -> ai-edge-litert, XNNPACK), batch 1, for each export form of the token
  selection (rank_matmul, onehot_matmul, topk_gather), each file checked against eager PyTorch on
  real photographs first.

Timings are interleaved (every round times every candidate once) and the speed-up is the median
of the per-round ratios, so the load of a shared machine moves both sides alike. Writes
``benchmarks/results/evit_throughput.md`` and ``.csv``.

    python benchmarks/evit_throughput.py                  # everything (~15 min on 2 busy cores)
    python benchmarks/evit_throughput.py --skip-eager --forms rank_matmul
    python benchmarks/evit_throughput.py --profile        # where the time goes (PyTorch op table)
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from tqdm.auto import tqdm

import vizoo
from vizoo.data.bundled import normalize, photo_images
from vizoo.layers.export_mode import export_mode
from vizoo.layers.token_reorg import EXPORT_FORMS, TokenReorganizer

RESULTS = Path(__file__).resolve().parent / "results"


class _FixedSlice(TokenReorganizer):
    """Reference only: keeps the first ``keep`` tokens (+ one as the "fused" token) by a static
    slice. Same token counts and MACs as EViT with no selection work at all: the speed-up a
    token-selection implementation can at best reach on this runtime."""

    def forward(self, x, cls_attn, keep):
        parts = [x[:, :keep + 1]] + ([x[:, keep + 1:keep + 2]] if self.fuse_token else [])
        return torch.cat(parts, dim=1), None


def fixed_slice_copy(evit):
    ref = copy.deepcopy(evit)
    for blk in ref.reorg_blocks:
        blk.reorg = _FixedSlice(fuse_token=blk.reorg.fuse_token)
    return ref


def build_pair(model: str, baseline: str, weights: str | None, seed: int):
    """timm's baseline and the EViT model holding exactly the same weights."""
    torch.manual_seed(seed)
    base = timm.create_model(baseline, pretrained=False).eval()
    if weights:
        vizoo.load_checkpoint(base, weights)
    evit = vizoo.create_model(model).eval()
    evit.load_state_dict(base.state_dict(), strict=True)
    return base, evit


def interleaved(candidates: dict, rounds: int, calls: int, desc: str):
    """Wall-clock and process-CPU seconds per call of each candidate, one entry per round;
    candidates alternate each round. CPU time counts the work of all threads and is less moved
    by other processes than wall-clock time (it still includes thread-pool spinning)."""
    wall = {k: [] for k in candidates}
    cpu = {k: [] for k in candidates}
    for fn in candidates.values():  # warm-up
        fn()
    for _ in tqdm(range(rounds), desc=desc):
        for name, fn in candidates.items():
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            wall[name].append((time.perf_counter() - t0) / calls)
            cpu[name].append((time.process_time() - c0) / calls)
    return wall, cpu


def _row(runtime: str, label: str, key: str, batch: int, threads: int, wall, cpu, parity: str) -> dict:
    med = statistics.median(wall[key])
    first = key == next(iter(wall))
    return dict(runtime=runtime, model=label, batch=batch, threads=threads,
                ms_per_batch=round(med * 1e3, 1), ms_best=round(min(wall[key]) * 1e3, 1),
                img_per_s=round(batch / med, 1),
                speedup=1.0 if first else round(speedup(wall, next(iter(wall)), key), 3),
                speedup_best=1.0 if first else round(best_speedup(wall, next(iter(wall)), key), 3),
                cpu_ms=round(statistics.median(cpu[key]) * 1e3, 1),
                speedup_cpu=1.0 if first else round(speedup(cpu, next(iter(cpu)), key), 3),
                parity=parity)


def speedup(times: dict[str, list[float]], base: str, other: str) -> float:
    return statistics.median(b / o for b, o in zip(times[base], times[other]))


def best_speedup(times: dict[str, list[float]], base: str, other: str) -> float:
    """Ratio of the fastest rounds: on a loaded machine the least disturbed estimate."""
    return min(times[base]) / min(times[other])


def eager_rows(base, evit, batch: int, threads: int, rounds: int) -> list[dict]:
    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, 224, 224)
    ref = fixed_slice_copy(evit)
    with torch.inference_mode():
        wall, cpu = interleaved({"deit": lambda: base(x), "evit": lambda: evit(x), "slice": lambda: ref(x)},
                                rounds, 1, f"PyTorch eager, batch {batch}")
    labels = {"deit": "timm deit_small_patch16_224", "evit": "EViT r=0.7 fused (eager form)",
              "slice": "reference: same token counts by a fixed slice"}
    return [_row("pytorch-eager", labels[k], k, batch, threads, wall, cpu, "") for k in wall]


def convert_tflite(module: torch.nn.Module, path: Path, export: bool, reuse: bool, batch: int = 1,
                   weights: str = "fp32") -> Path:
    """fp32 file, or its dynamic-range int8 version by the exporter's own quantizer (int8 weights:
    a quarter of the bytes every batch-1 call streams through the weight layers)."""
    import litert_torch

    from vizoo.export.quantize import tflite_int8_dynamic
    from vizoo.io import atomic_path

    if reuse and path.is_file():
        return path
    litert_torch.config.show_progress = False
    x = torch.randn(batch, 3, 224, 224)
    with torch.no_grad(), export_mode(module, enabled=export):
        data = bytes(litert_torch.convert(module.eval(), (x,)).model_content())
    with atomic_path(path) as tmp:
        tmp.write_bytes(tflite_int8_dynamic(data) if weights == "int8-dynamic" else data)
    return path


def tflite_runner(path: Path, threads: int):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]

    def run(x: np.ndarray) -> np.ndarray:
        it.set_tensor(inp, x)
        it.invoke()
        return it.get_tensor(out)

    return run


def parity(run, model, images: torch.Tensor, batch: int = 1) -> float:
    """Max |TFLite - eager PyTorch| over real photographs (a different kept token would show as a
    large difference)."""
    worst = 0.0
    with torch.no_grad():
        ref = model(images).numpy()
    for i in range(0, len(images) - batch + 1, batch):
        worst = max(worst, float(np.abs(run(images[i:i + batch].numpy()) - ref[i:i + batch]).max()))
    return worst


def tflite_rows(base, evit, forms, threads: int, rounds: int, calls: int, work: Path, reuse: bool,
                batch: int = 1, weights: str = "fp32") -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    cfg = evit.pretrained_cfg
    images = normalize(photo_images(8, 224), cfg["mean"], cfg["std"])
    tag = (f"_b{batch}" if batch > 1 else "") + ("" if weights == "fp32" else f"_{weights}")
    files = {"deit": convert_tflite(base, work / f"deit_small{tag}.tflite", False, reuse, batch, weights)}
    for form in tqdm(forms, desc="converting"):
        for blk in evit.reorg_blocks:
            blk.reorg.export_form = form
        files[form] = convert_tflite(evit, work / f"evit_r0p7_fuse_{form}{tag}.tflite", True, reuse, batch,
                                     weights)
    files["slice"] = convert_tflite(fixed_slice_copy(evit), work / f"evit_r0p7_fuse_fixed_slice{tag}.tflite",
                                    True, reuse, batch, weights)
    for blk in evit.reorg_blocks:
        blk.reorg.export_form = "rank_matmul"
    runners = {k: tflite_runner(p, threads) for k, p in files.items()}
    checks = {"deit": parity(runners["deit"], base, images, batch)}
    checks.update({f: parity(runners[f], evit, images, batch) for f in forms})
    x = images[:batch].numpy()
    wall, cpu = interleaved({k: (lambda r=r: r(x)) for k, r in runners.items()}, rounds, calls,
                            f"TFLite, batch {batch}, {threads} threads")
    rows = []
    for key in runners:
        if key == "deit":
            label = "timm deit_small_patch16_224"
        elif key == "slice":
            label = "reference: same token counts by a fixed slice"
        else:
            label = f"EViT r=0.7 fused ({key})"
        check = f"max|tflite-eager| {checks[key]:.1e}" if key in checks else "n/a (reference)"
        runtime = "tflite-xnnpack" + ("" if weights == "fp32" else f" ({weights})")
        rows.append(_row(runtime, label, key, batch, threads, wall, cpu, check))
    return rows


def profile_eager(base, evit, batch: int, threads: int) -> str:
    """Self CPU time by op for one batch of each model: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    x = torch.randn(batch, 3, 224, 224)
    out = []
    with torch.inference_mode():
        for label, m in (("DeiT-S", base), ("EViT-DeiT-S r=0.7", evit)):
            m(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                m(x)
            out.append(f"### {label}\n```\n" + prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=12) + "\n```")
    return "\n\n".join(out)


def write_results(rows: list[dict], notes: list[str], profile: str, stem: str = "evit_throughput") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = list(rows[0])
    lines = ["# EViT-DeiT-S (r = 0.7, fused) vs DeiT-S, same weights", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    lines += [""] + [f"- {n}" for n in notes]
    if profile:
        lines += ["", "## Profile (PyTorch eager)", "", profile]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="evit_deit_small_patch16_224.r0p7_fuse")
    p.add_argument("--baseline", default="deit_small_patch16_224", help="timm model with the same weights")
    p.add_argument("--weights", default=None, help="DeiT-S checkpoint (default: seeded random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32, help="PyTorch eager batch size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eager-rounds", type=int, default=5)
    p.add_argument("--tflite-rounds", type=int, default=9)
    p.add_argument("--tflite-calls", type=int, default=10, help="invocations per candidate per round")
    p.add_argument("--tflite-batch", type=int, default=1, choices=(1, 2, 4, 8),
                   help="TFLite batch (the goal is stated at 1; larger batches share the weight reads)")
    p.add_argument("--tflite-weights", default="fp32", choices=("fp32", "int8-dynamic"),
                   help="TFLite files of both models: fp32, or dynamic-range int8 (int8 weights, the "
                        "same quantizer as vizoo.export); parity then includes the quantization error")
    p.add_argument("--forms", nargs="*", default=list(EXPORT_FORMS), choices=EXPORT_FORMS)
    p.add_argument("--skip-eager", action="store_true")
    p.add_argument("--skip-tflite", action="store_true")
    p.add_argument("--work-dir", default="runs/bench_evit", help="where the .tflite files go")
    p.add_argument("--reuse", action="store_true", help="reuse .tflite files already in --work-dir")
    p.add_argument("--results-stem", default="evit_throughput", help="benchmarks/results/STEM.{md,csv}")
    p.add_argument("--profile", action="store_true", help="add a PyTorch op profile to the report")
    args = p.parse_args(argv)

    base, evit = build_pair(args.model, args.baseline, args.weights, args.seed)
    rows: list[dict] = []
    if not args.skip_eager:
        rows += eager_rows(base, evit, args.batch, args.threads, args.eager_rounds)
    if not args.skip_tflite:
        rows += tflite_rows(base, evit, args.forms, args.threads, args.tflite_rounds, args.tflite_calls,
                            Path(args.work_dir), args.reuse, args.tflite_batch, args.tflite_weights)
    if not rows:
        print("nothing measured (both --skip-eager and --skip-tflite)", file=sys.stderr)
        return 2
    macs_note = ("MACs (torch.utils.flop_counter, batch 1): DeiT-S 4.60 G, EViT r=0.7 fused 3.03 G "
                 "(ratio 1.52)")
    notes = [
        f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads; weights "
        f"{'from ' + args.weights if args.weights else f'random (seed {args.seed})'}, identical in both models.",
        "speedup = median over rounds of (DeiT-S time / EViT time), rounds interleaved; speedup_best = "
        "ratio of the fastest rounds (ms_best); speedup_cpu = the same median ratio of process CPU time "
        "(all threads), less moved by other processes on a shared machine.",
        "reference rows keep the same token counts by a fixed slice (no selection work): the best a "
        "token-selection implementation can reach in that runtime.",
        macs_note,
        "paper: +50% throughput at r = 0.7 (GPU, batch 64, fp32); goal here >= 1.45x in both runtimes.",
        "parity: max abs logit difference between the .tflite file and eager PyTorch over 8 real photos.",
    ]
    write_results(rows, notes, "", args.results_stem)  # the timings are safe on disk before the optional extras
    if args.profile:
        write_results(rows, notes, profile_eager(base, evit, args.batch, args.threads), args.results_stem)
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"written: {RESULTS / (args.results_stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

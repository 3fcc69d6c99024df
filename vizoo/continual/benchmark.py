"""The bundled continual benchmark: CLR against its baselines on six offline tasks.

1. A quarter-width ResNet-18 (`vizoo.models.clr.resnet18_025`) is trained once on a proxy task
   that is not in the sequence (self-supervised rotation x colour-order prediction on photo crops
   and drawn scenes; `vizoo.data.continual.proxy_task`) and frozen: the anchor.
2. Every method of `vizoo.continual.METHODS` learns the same task sequence from that anchor, at
   equal epochs, for each seed (`run_sequence`); sequences run in parallel processes.
3. The table: average final accuracy, forgetting, parameters added per task, time; the accuracy
   matrices as a PNG.

Everything lands in ``out`` and is resumable: a finished backbone, task or sequence is reused.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

from ..data.continual import PROXY_CLASSES
from .methods import METHODS

PROXY_RECIPE: dict[str, Any] = dict(opt="adamw", lr=2e-3, weight_decay=0.05, sched="cosine", warmup_epochs=1,
                                    batch_size=64, plots=False, progress="off", deterministic=False)


def backbone_cfg(img_size: int) -> dict[str, Any]:
    from ..registry import get_pretrained_cfg

    cfg = get_pretrained_cfg("clr_resnet18_025").to_dict()
    cfg.update(architecture="resnet18_025", input_size=[3, img_size, img_size], num_classes=len(PROXY_CLASSES))
    return cfg


def pretrain_backbone(out: str | os.PathLike, epochs: int = 10, img_size: int = 32, seed: int = 0,
                      verbose: bool = False) -> Path:
    """Train the anchor on the proxy task once (resumable); returns its best checkpoint."""
    import contextlib
    import io

    from ..engine.trainer import Trainer
    from ..models.clr import resnet18_025

    out = Path(out)
    best = out / "best.safetensors"
    if (out / "done.json").is_file() and best.is_file():
        return best
    model = resnet18_025(num_classes=len(PROXY_CLASSES))
    model.pretrained_cfg = backbone_cfg(img_size)
    cfg = dict(PROXY_RECIPE, model="resnet18_025", task="continual", data="continual:proxy", img_size=img_size,
               epochs=epochs, seed=seed, out=str(out), resume="auto")
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        result = Trainer(cfg, model=model).fit()
    from ..io import write_json_atomic

    write_json_atomic(out / "done.json", {"best_top1": result.best_metric, "epochs": epochs})
    return best


def _run_one(method: str, seed: int, tasks: Sequence[str], backbone: str, out: str, epochs: int,
             img_size: int, threads: int) -> dict[str, Any]:
    """One (method, seed) sequence, in a worker process."""
    import torch

    from ..models.clr import build_continual, resnet18_025
    from .sequence import run_sequence

    torch.set_num_threads(threads)
    model = build_continual(resnet18_025(), 0, method=method, backbone_checkpoint=backbone)
    model.pretrained_cfg = {**backbone_cfg(img_size), "architecture": "clr_resnet18_025"}
    result = run_sequence(model, tasks, Path(out) / method / f"seed{seed}", epochs=epochs, seed=seed,
                          img_size=img_size, model_name="clr_resnet18_025")
    return result.to_dict()


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: mean and std over seeds."""
    rows = []
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        acc = [r["average_accuracy"] for r in runs]
        fgt = [r["mean_forgetting"] for r in runs]
        std = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        backbone = runs[0]["backbone_params"]
        rows.append({
            "method": method, "title": METHODS[method].title, "seeds": len(runs),
            "avg_acc": statistics.mean(acc), "avg_acc_std": std(acc),
            "forgetting": statistics.mean(fgt), "forgetting_std": std(fgt),
            "max_abs_forgetting": max(abs(f) for r in runs for f in r["forgetting"]),
            "params_per_task": runs[0]["params_per_task"],
            "params_per_task_pct": 100.0 * runs[0]["params_per_task"] / backbone,
            "params_with_head_mean": statistics.mean(runs[0]["params_per_task_with_head"]),
            "backbone_params": backbone,
            "minutes_per_sequence": statistics.mean(r["seconds"] for r in runs) / 60.0,
        })
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | average accuracy (%) | forgetting (points) | params added per task (w/o head) | "
             "min / sequence |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['avg_acc']:.1f} ± {r['avg_acc_std']:.1f} | "
                     f"{r['forgetting']:+.2f} ± {r['forgetting_std']:.2f} | "
                     f"{r['params_per_task']:,} ({r['params_per_task_pct']:.2f} % of {r['backbone_params']:,}) | "
                     f"{r['minutes_per_sequence']:.1f} |")
    return "\n".join(lines)


def plot_matrices(results: list[dict[str, Any]], path: str | os.PathLike, seed: int | None = None) -> Path:
    """The accuracy matrix (row: after training task j, column: task i) of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seed = seed if seed is not None else min(r["seed"] for r in results)
    chosen = [r for m in METHODS for r in results if r["method"] == m and r["seed"] == seed]
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3.6), squeeze=False)
    for ax, r in zip(axes[0], chosen):
        mat = np.array([[np.nan if v is None else v for v in row] for row in r["accuracy"]], dtype=float)
        ax.imshow(mat, vmin=0, vmax=100, cmap="viridis")
        n = len(r["tasks"])
        for j in range(n):
            for i in range(j + 1):
                ax.text(i, j, f"{mat[j, i]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[j, i] < 60 else "black")
        ax.set_xticks(range(n), [t.replace("_", "\n") for t in r["tasks"]], fontsize=6)
        ax.set_yticks(range(n), [f"after {j + 1}" for j in range(n)], fontsize=6)
        ax.set_title(f"{r['method']}: avg {r['average_accuracy']:.1f} %", fontsize=8)
    fig.suptitle(f"Test accuracy (%) of task i (column) after training task j (row), seed {seed}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def run_benchmark(out: str | os.PathLike = "runs/continual", methods: Sequence[str] | None = None,
                  seeds: Sequence[int] = (0, 1, 2), tasks: Sequence[str] | None = None, epochs: int = 8,
                  proxy_epochs: int = 10, img_size: int = 32, jobs: int = 2, threads: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the whole benchmark; returns and writes ``results.json``/``results.md``/PNG."""
    from tqdm.auto import tqdm

    from ..data.continual import TASK_NAMES
    from ..io import write_json_atomic, write_text_atomic
    from .methods import get_method

    methods = list(methods or METHODS)
    for m in methods:
        get_method(m)
    tasks = list(tasks or TASK_NAMES)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = max(1, int(jobs))
    threads = threads or max(1, (os.cpu_count() or 2) // jobs)
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if progress:
        print(f"anchor: resnet18_025 on the proxy task ({proxy_epochs} epochs) -> {out / 'backbone'}", flush=True)
    backbone = pretrain_backbone(out / "backbone", proxy_epochs, img_size)
    proxy = json.loads((out / "backbone" / "done.json").read_text())
    t_backbone = time.perf_counter() - t0
    units = [(m, s) for s in seeds for m in methods]
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(units), desc="sequences", unit="seq", disable=not progress)
    ctx = get_context("spawn")  # fresh interpreters: no inherited thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        pending = {pool.submit(_run_one, m, s, tasks, str(backbone), str(out), epochs, img_size, threads): (m, s)
                   for m, s in units}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                m, s = pending.pop(fut)
                r = fut.result()
                results.append(r)
                bar.update(1)
                bar.write(f"{m:<10} seed {s}: average accuracy {r['average_accuracy']:.1f} %, forgetting "
                          f"{r['mean_forgetting']:+.2f}, {r['seconds'] / 60:.1f} min")
    bar.close()
    results.sort(key=lambda r: (list(METHODS).index(r["method"]), r["seed"]))
    rows = summarize(results)
    total = time.perf_counter() - t0
    summary = {"tasks": tasks, "epochs": epochs, "seeds": list(seeds), "img_size": img_size, "jobs": jobs,
               "threads_per_job": threads, "proxy_top1": proxy.get("best_top1"), "proxy_epochs": proxy_epochs,
               "backbone_seconds": round(t_backbone, 1), "total_seconds": round(total, 1),
               "rows": rows, "runs": results}
    write_json_atomic(out / "results.json", summary)
    table = format_summary(rows)
    write_text_atomic(out / "results.md", table + "\n")
    plot_matrices(results, out / "accuracy_matrix.png")
    return summary

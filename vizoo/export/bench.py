"""Latency: median and spread of repeated runs after warm-up, PyTorch eager vs the TFLite file.

Absolute times move from run to run on shared machines, so compare backends measured in one run
(the ratio is the figure that holds). Runs are interleaved per model: torch, then tflite.
"""
from __future__ import annotations

import contextlib
import csv
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..layers.export_mode import export_mode

BACKENDS = ("torch", "tflite")


@dataclass
class Latency:
    median_ms: float
    p25_ms: float
    p75_ms: float
    min_ms: float
    runs: int
    warmup: int
    threads: int
    batch: int
    #: the machine's 1-minute load average when timed (shared machines: read times with it)
    load_avg: float | None = None

    def __post_init__(self) -> None:
        if self.load_avg is None and hasattr(os, "getloadavg"):
            self.load_avg = round(os.getloadavg()[0], 2)

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"{self.median_ms:.2f} ms [{self.p25_ms:.2f}-{self.p75_ms:.2f}]"


def measure(fn: Callable[[], Any], warmup: int = 5, runs: int = 30, threads: int = 0,
            batch: int = 1, min_seconds: float = 0.0) -> Latency:
    """Time ``fn`` ``runs`` times after ``warmup`` calls (more runs until ``min_seconds``)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return Latency(statistics.median(times), q[0], q[2], min(times), len(times), warmup, threads, batch)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 5, runs: int = 10, warmup: int = 3,
                threads: int = 0, batch: int = 1, budget_s: float | None = None) -> dict[str, Latency]:
    """Time several backends in alternating rounds, so load drifts on a shared machine hit all
    of them alike; each Latency pools the runs of every round. After ``budget_s`` seconds no
    new round starts (at least one always runs)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for i in range(rounds):
        if i and budget_s is not None and time.perf_counter() - start > budget_s:
            break
        for key, fn in fns.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for key, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[key] = Latency(statistics.median(ts), q[0], q[2], min(ts), len(ts), warmup, threads, batch)
    return out


def paired_ratio(fn: Callable[[], Any], base: Callable[[], Any], rounds: int = 9,
                 seconds: float = 2.0, warmup: int = 3) -> dict[str, Any]:
    """Latency of ``fn`` relative to ``base``, robust to load drift on a shared machine.

    Each round times both (their order alternating) for about ``seconds / rounds`` together; the
    ratio is the median over rounds of the two per-round medians' ratio, so a load spike hits one
    round's numerator and denominator alike. Returns ``{"ratio", "ms", "base_ms", "round_ratios"}``.
    """
    for _ in range(warmup):
        fn()
        base()
    t0 = time.perf_counter()
    fn()
    base()
    runs = max(3, min(100, int(seconds / rounds / max(time.perf_counter() - t0, 1e-6))))
    mine, theirs, ratios = [], [], []
    for i in range(rounds):
        per: dict[int, list[float]] = {0: [], 1: []}
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for _ in range(runs):
            for k in order:
                f = fn if k == 0 else base
                t = time.perf_counter()
                f()
                per[k].append((time.perf_counter() - t) * 1e3)
        a, b = statistics.median(per[0]), statistics.median(per[1])
        mine.append(a)
        theirs.append(b)
        ratios.append(a / b)
    return {"ratio": statistics.median(ratios), "ms": statistics.median(mine),
            "base_ms": statistics.median(theirs), "round_ratios": [round(r, 3) for r in ratios],
            "runs_per_round": runs}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def torch_latency(model: nn.Module, inputs: Sequence[torch.Tensor], threads: int = 2,
                  warmup: int = 5, runs: int = 30, export_form: bool = False) -> Latency:
    """PyTorch eager latency of ``model(*inputs)`` on the CPU (eval mode)."""
    model.eval()
    with torch_threads(threads), export_mode(model, enabled=export_form):
        return measure(lambda: model(*inputs), warmup, runs, threads, int(inputs[0].shape[0]))


def tflite_latency(path: str | os.PathLike, threads: int = 2, warmup: int = 5, runs: int = 30) -> Latency:
    """ai-edge-litert (XNNPACK) latency of one invoke of a .tflite file."""
    from .tflite import timed_invoke

    invoke, batch = timed_invoke(path, threads)
    return measure(invoke, warmup, runs, threads, batch)


def compare_backends(model: nn.Module, inputs: Sequence[torch.Tensor], tflite_path: str | os.PathLike | None,
                     backends: Sequence[str] = BACKENDS, threads: int = 2, warmup: int = 10,
                     runs: int = 50, rounds: int = 5) -> dict[str, Latency]:
    """PyTorch eager and TFLite latency of the same model, measured interleaved in one run."""
    from .tflite import timed_invoke

    fns: dict[str, Callable[[], Any]] = {}
    batch = int(inputs[0].shape[0])
    model.eval()
    with torch.no_grad(), torch_threads(threads):
        if "torch" in backends:
            fns["torch"] = lambda: model(*inputs)
        if "tflite" in backends and tflite_path is not None:
            fns["tflite"], batch = timed_invoke(tflite_path, threads)
        return interleaved(fns, rounds=rounds, runs=max(1, runs // rounds), warmup=warmup,
                           threads=threads, batch=batch)


# --- `vizoo bench` ------------------------------------------------------------------------------
def bench_models(names: Sequence[str], backends: Sequence[str] = BACKENDS, threads: int = 2,
                 batch: int = 1, img_size: int | None = None, warmup: int = 10, runs: int = 50,
                 workdir: str | os.PathLike = "exports/bench", layout: str = "nhwc") -> list[dict[str, Any]]:
    """Latency of each model on each backend, measured in this one run.

    TFLite files are converted at the benchmark's batch size into ``workdir`` and reused by
    later runs (delete them to re-convert).
    """
    from .api import build_model
    from .errors import require
    from .formats import get_format
    from .spec import resolve_spec

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
    if "tflite" in backends:
        fmt = get_format("tflite")
        require(fmt.requires, "TFLite benchmarking")
    rows = []
    for name in tqdm(names, desc="bench", disable=len(names) < 2):
        model = build_model(name)
        spec = resolve_spec(model, img_size, name=name, batch_size=batch)
        row_base = {"model": name, "input": "x".join(map(str, spec.input_shapes[0])),
                    "threads": threads, "batch": batch}
        path = None
        if "tflite" in backends:
            path = Path(workdir) / f"{spec.stem}_{'x'.join(map(str, spec.input_size))}_b{batch}_{layout}.tflite"
            if not path.is_file():
                from ..io import atomic_path
                from .tflite import convert

                with atomic_path(path) as tmp:
                    convert(spec, tmp, "fp32", {"layout": layout, "int8_mode": "full"})
        results = compare_backends(spec.module, spec.example_inputs, path, backends, threads,
                                   warmup=warmup, runs=runs)
        ref = results.get("torch")
        for backend, lat in results.items():
            rows.append({**row_base, "backend": backend, **lat.to_dict(),
                         "speedup_vs_torch": round(ref.median_ms / lat.median_ms, 3) if ref else None})
    return rows


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table (the README's format) of ``columns`` of ``rows``."""
    def cell(v: Any) -> str:
        if v is None:
            return ""
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    from ..io import write_text_atomic

    path = Path(path)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    import io as _io

    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())
    return path

"""End-to-end FPS of the webcam demos: decode -> preprocess -> infer -> draw -> encode, headless.

    python benchmarks/demo_fps.py [--frames 300] [--rounds 3] [--threads 2] [--pytorch-frames 60]

Runs `vizoo.demo`'s loop (the code behind `vizoo demo classify|detect` and demos/webcam_*.py)
with ``--save out.mp4`` on sample videos of the bundled data, for every model file found:

- classification: the quickstart's digits model (``runs/quickstart``: `vizoo quickstart`) as
  TFLite fp32 / int8 at its demo size (32x32 input) and as the PyTorch checkpoint, on a
  640x480 video of held-out digits (a camera's frame size); also the top-1 accuracy on those
  frames, from what the demo printed;
- detection: ``stageinteractor_tiny`` (``runs/stageinteractor_tiny``: `vizoo train
  stageinteractor_tiny --data shapes`, then `vizoo export`) as TFLite fp32 / fp16 / int8 and as
  the PyTorch checkpoint, on a 384x384 video of held-out shapes (the 128 px images enlarged 3x);
  also how many ground-truth shapes got a box of their class (IoU >= 0.5) and how many boxes
  were on a shape, at the demo's default threshold.

Rounds are interleaved (every configuration once per round) so load from other processes hits
all alike; the table gives the median FPS over rounds and the range. Decoding runs in the
source's prefetch thread, so on 2 cores it overlaps inference. Writes
benchmarks/results/demo_fps.md and .csv.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vizoo.demo.classify import ClassifyTask
from vizoo.demo.detect import DetectTask
from vizoo.demo.loop import run_demo
from vizoo.demo.runners import load_backend
from vizoo.demo.samples import digits_frames, shapes_frames, write_video
from vizoo.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICKSTART = ROOT / "runs" / "quickstart"
DETECTOR = ROOT / "runs" / "stageinteractor_tiny"
SHAPES = ["circle", "square", "triangle", "ellipse", "cross"]


def configurations() -> list[dict[str, Any]]:
    """Every model file present, as load_backend keyword arguments."""
    cfgs = []
    for prec in ("fp32", "int8"):
        f = QUICKSTART / "export" / f"mobilenetv2_100_evos0_{prec}.tflite"
        if f.is_file():
            cfgs.append({"task": "classify", "label": f"tflite {prec}", "kwargs": {"tflite": str(f)}})
    ckpt = QUICKSTART / "train" / "best.safetensors"
    if ckpt.is_file():
        cfgs.append({"task": "classify", "label": "pytorch", "kwargs": {"checkpoint": str(ckpt)}})
    for prec in ("fp32", "fp16", "int8"):
        f = DETECTOR / "export" / f"stageinteractor_tiny_{prec}.tflite"
        if f.is_file():
            cfgs.append({"task": "detect", "label": f"tflite {prec}", "kwargs": {"tflite": str(f), "labels": SHAPES}})
    ckpt = DETECTOR / "best.safetensors"
    if ckpt.is_file():
        cfgs.append({"task": "detect", "label": "pytorch", "kwargs": {"checkpoint": str(ckpt)}})
    return cfgs


class _Recording:
    """Wraps a task to keep every frame's result (the benchmark's accuracy columns)."""

    def __init__(self, task: Any):
        self.task, self.name, self.results = task, task.name, []

    def geometry(self, *a: Any) -> Any:
        return self.task.geometry(*a)

    def postprocess(self, *a: Any) -> Any:
        result = self.task.postprocess(*a)
        self.results.append(result)
        return result

    def draw(self, *a: Any) -> None:
        self.task.draw(*a)

    def describe(self, result: Any) -> str:
        return self.task.describe(result)


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def quality(task: str, results: list[Any], truth: list[Any]) -> dict[str, Any]:
    if task == "classify":
        top1 = [r.ids[0] == t for r, t in zip(results, truth)]
        return {"quality": f"top-1 {100 * np.mean(top1):.1f}% of {len(top1)} digits"}
    matched_gt = boxes_on_shape = n_boxes = n_gt = 0
    for dets, gts in zip(results, truth):
        n_gt += len(gts)
        n_boxes += len(dets)
        matched_gt += sum(any(d.class_id == c and _iou(d.box, box) >= 0.5 for d in dets) for c, box in gts)
        boxes_on_shape += sum(any(d.class_id == c and _iou(d.box, box) >= 0.5 for c, box in gts) for d in dets)
    return {"quality": f"{matched_gt}/{n_gt} shapes boxed ({100 * matched_gt / max(1, n_gt):.0f}%), "
                       f"{boxes_on_shape}/{n_boxes} boxes on a shape"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pytorch-frames", type=int, default=60, help="frames of the (slow) PyTorch runs")
    args = ap.parse_args(argv)
    cfgs = configurations()
    if not cfgs:
        print("no model files: run `vizoo quickstart` (classification) and train + export stageinteractor_tiny "
              "(detection) first", file=sys.stderr)
        return 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="demo_fps-") as tmp:
        tmp_path = Path(tmp)
        digits = list(digits_frames(args.frames, height=480, width=640))
        shapes = list(shapes_frames(args.frames, scale=3))
        videos = {"classify": tmp_path / "digits_640x480.mp4", "detect": tmp_path / "shapes_384x384.mp4"}
        write_video(videos["classify"], (f for f, _ in digits), fps=30)
        write_video(videos["detect"], (f for f, _ in shapes), fps=30)
        truth = {"classify": [t for _, t in digits], "detect": [t for _, t in shapes]}
        backends = {id(c): load_backend(threads=args.threads, **c["kwargs"]) for c in cfgs}
        runs: dict[int, list[Any]] = {id(c): [] for c in cfgs}
        for r in range(args.rounds):
            for c in cfgs:
                task = ClassifyTask() if c["task"] == "classify" else DetectTask()
                rec = _Recording(task)
                stats = run_demo(rec, backends[id(c)], str(videos[c["task"]]), headless=True,
                                 save=tmp_path / f"out_{c['task']}.mp4", quiet=True,
                                 max_frames=min(args.frames, args.pytorch_frames) if c["label"] == "pytorch" else None)
                runs[id(c)].append((stats, rec.results))
                print(f"round {r + 1}/{args.rounds} {c['task']} {c['label']}: {stats.summary()}", flush=True)
    load_after = os.getloadavg()
    rows = []
    for c in cfgs:
        b = backends[id(c)]
        stats_list = [s for s, _ in runs[id(c)]]
        fps = [s.fps for s in stats_list]
        best = max(stats_list, key=lambda s: s.fps)
        row = {"demo": c["task"], "model": "mobilenetv2_100_evos0 (digits)" if c["task"] == "classify"
               else "stageinteractor_tiny (shapes)", "backend": c["label"],
               "input": b.pre.size_text, "frame": "640x480" if c["task"] == "classify" else "384x384",
               "frames": stats_list[0].frames, "fps_median": round(statistics.median(fps), 1),
               "fps_range": f"{min(fps):.1f}-{max(fps):.1f}",
               **{f"{k}_ms": round(statistics.median(s.median_ms(k) for s in stats_list), 2)
                  for k in ("pre", "infer", "post", "draw", "out")}}
        common = min(len(runs[id(o)][0][1]) for o in cfgs if o["task"] == c["task"])
        row.update(quality(c["task"], runs[id(c)][0][1][:common], truth[c["task"]]))   # same frames for all
        row["best_run"] = best.summary()
        rows.append(row)
    columns = ["demo", "model", "backend", "input", "frame", "frames", "fps_median", "fps_range", "pre_ms",
               "infer_ms", "post_ms", "draw_ms", "out_ms", "quality"]
    today = datetime.date.today().isoformat()
    cpu = platform.processor() or platform.machine()
    try:   # Linux: the CPU's name
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    md = ["# Demo end-to-end FPS (headless, --save out.mp4)", "",
          f"Measured {today} on {cpu}, {os.cpu_count()} cores (shared with other jobs: load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after, so the figures are noisy), "
          f"{args.threads} model threads, Python {platform.python_version()}. {args.rounds} interleaved rounds "
          f"of {args.frames} frames per configuration: FPS = frames / wall time from the first frame "
          "read to the last written (decode in the prefetch thread, preprocess, infer, post-process, "
          "draw, MPEG-4 encode); stage columns are medians per frame (`out` = encode + write); PyTorch runs "
          f"stop at {args.pytorch_frames} frames, and `quality` is measured on the frames every run of the "
          "task saw (what the demo printed: top-1 vs the digit's label; a shape counts as boxed by a "
          "detection of its class with IoU >= 0.5, at the default --score-threshold 0.3). "
          "Command: `python benchmarks/demo_fps.py`.", "",
          "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(str(r.get(k, "")) for k in columns) + " |" for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / "demo_fps.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(RESULTS / "demo_fps.csv", buf.getvalue())
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

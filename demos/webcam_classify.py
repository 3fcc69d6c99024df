"""Classify a webcam stream, a video file or images with a zoo model or an exported .tflite.

Examples:
    python demos/webcam_classify.py --model mobilenetv2_100_evos0 --source 0
    python demos/webcam_classify.py --checkpoint runs/quickstart/train/best.safetensors --source clip.mp4
    python demos/webcam_classify.py --tflite runs/quickstart/export/model_fp32.tflite --source photos/ --headless --save out/

The .tflite path runs the file an Android app would ship, preprocessed from its sidecar JSON
(mean/std, layout, labels), so what you see is what the phone computes. ``--headless`` writes
annotated frames instead of opening a window (servers, CI).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _cv2():
    try:
        import cv2
    except ImportError:
        sys.exit("this demo needs OpenCV: pip install 'vizoo[demo]'")
    return cv2


def frames(source: str, max_frames: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, BGR frame) from a camera index, a video file, an image, or a folder of images."""
    cv2 = _cv2()
    path = Path(source)
    if path.is_dir() or (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
        if not files:
            sys.exit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
        for i, f in enumerate(files):
            if max_frames is not None and i >= max_frames:
                return
            img = cv2.imread(str(f))
            if img is None:
                print(f"skipping unreadable image {f}", file=sys.stderr)
                continue
            yield f.name, img
        return
    cap = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not cap.isOpened():
        sys.exit(f"cannot open {source!r}: not a camera index, a readable video file or an image path")
    i = 0
    try:
        while max_frames is None or i < max_frames:
            ok, frame = cap.read()
            if not ok:
                return
            yield f"frame_{i:06d}.jpg", frame
            i += 1
    finally:
        cap.release()


def preprocess(bgr: np.ndarray, size: tuple[int, int], mean, std, crop_pct: float = 1.0,
               channels: int = 3) -> np.ndarray:
    """Resize the short side, center-crop ``crop_pct``, scale to [0, 1], normalise -> (1, C, H, W)."""
    cv2 = _cv2()
    h, w = size
    img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    scale = max(h, w) / crop_pct / min(img.shape[:2])
    img = cv2.resize(img, (max(w, round(img.shape[1] * scale)), max(h, round(img.shape[0] * scale))),
                     interpolation=cv2.INTER_AREA)
    top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
    x = img[top:top + h, left:left + w].astype(np.float32) / 255.0
    if channels == 1:
        x = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)[:, None]
    x = (x - np.asarray(mean[:channels], np.float32)) / np.asarray(std[:channels], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def load_predictor(args: argparse.Namespace) -> tuple[Callable[[np.ndarray], np.ndarray], dict, str]:
    """A function NCHW float -> logits, the preprocessing config and a backend label."""
    if args.tflite:
        from vizoo.export.tflite import TFLiteRunner, _read_sidecar_or_metadata

        runner = TFLiteRunner(args.tflite, threads=args.threads)
        meta = _read_sidecar_or_metadata(Path(args.tflite))
        pre = meta.get("preprocessing", {})
        shape = meta["inputs"][0]["shape"]
        nhwc = meta.get("input_layout", "NCHW") == "NHWC"
        c, h, w = (shape[3], shape[1], shape[2]) if nhwc else (shape[1], shape[2], shape[3])
        cfg = {"input_size": [c, h, w], "mean": pre.get("mean", [0.0] * c), "std": pre.get("std", [1.0] * c),
               "crop_pct": pre.get("resize", {}).get("crop_pct", 1.0), "labels": meta.get("labels")}
        return (lambda x: runner(x)[0]), cfg, f"tflite ({runner.runtime})"

    import torch

    import vizoo
    from vizoo.hub import load_model

    model = load_model(args.checkpoint) if args.checkpoint else vizoo.create_model(args.model, pretrained=args.pretrained)
    model.eval()
    cfg = dict(model.pretrained_cfg)
    cfg["labels"] = getattr(model, "labels", None)
    torch.set_num_threads(args.threads)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run, cfg, "pytorch"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="registered model name (random weights unless --pretrained)")
    what.add_argument("--checkpoint", help="a vizoo checkpoint (.safetensors with its .json sidecar)")
    what.add_argument("--tflite", help="an exported .tflite (its .tflite.json sidecar gives preprocessing)")
    ap.add_argument("--pretrained", default=False, help="with --model: true, a path or a URL")
    ap.add_argument("--source", default="0", help="camera index, video file, image, or folder of images")
    ap.add_argument("--topk", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--headless", action="store_true", help="no window; print predictions (and --save frames)")
    ap.add_argument("--save", help="folder for annotated frames")
    ap.add_argument("--max-frames", type=int, default=None)
    args = ap.parse_args(argv)

    predict, cfg, backend = load_predictor(args)
    c, h, w = cfg["input_size"]
    labels = cfg.get("labels")
    cv2 = _cv2()
    save = Path(args.save) if args.save else None
    if save:
        save.mkdir(parents=True, exist_ok=True)
    print(f"backend {backend}, input {c}x{h}x{w}, source {args.source}")
    for name, frame in frames(args.source, args.max_frames):
        x = preprocess(frame, (h, w), cfg["mean"], cfg["std"], cfg.get("crop_pct") or 1.0, c)
        t0 = time.perf_counter()
        logits = np.asarray(predict(x))[0]
        ms = (time.perf_counter() - t0) * 1e3
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[: args.topk]
        text = [f"{labels[i] if labels else i}: {p[i]:.2f}" for i in top]
        print(f"{name}: " + ", ".join(text) + f"  ({ms:.1f} ms)")
        for j, line in enumerate(text + [f"{backend} {ms:.1f} ms"]):
            cv2.putText(frame, line, (8, 22 + 22 * j), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 0), 2)
        if save:
            cv2.imwrite(str(save / name), frame)
        if not args.headless:
            cv2.imshow("vizoo", frame)
            if cv2.waitKey(1) & 0xFF in (27, ord("q")):
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sample videos from the bundled data, for trying the demos without a camera (and for the tests).

- digits: scikit-learn's held-out handwritten digits (the quickstart model's validation split),
  each enlarged to fill the frame's height, centred;
- shapes: the procedural shapes detection data (:mod:`vizoo.data.shapes`, validation split)
  enlarged ``scale`` times, with their ground-truth boxes.

    vizoo demo video shapes shapes.mp4 --frames 60
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .errors import DemoError, import_cv2

SHAPES_SIZE = 128   # the shapes data's native size (what stageinteractor_tiny was trained on)


def digits_frames(n: int, height: int = 240, width: int = 320, split: str = "val") -> Iterator[tuple[np.ndarray, int]]:
    """``n`` BGR frames ``(height, width, 3)`` of held-out digits (cycled) and their labels."""
    from vizoo.data.digits import digits_split_tensors

    cv2 = import_cv2()
    images, labels = digits_split_tensors(split, img_size=8, in_chans=1)
    pixels = (images[:, 0].numpy() * 255).round().astype(np.uint8)
    side = min(height, width)
    for i in range(n):
        j = i % len(pixels)
        digit = cv2.resize(pixels[j], (side, side), interpolation=cv2.INTER_LINEAR)
        frame = np.zeros((height, width, 3), np.uint8)
        top, left = (height - side) // 2, (width - side) // 2
        frame[top:top + side, left:left + side] = digit[..., None]
        yield frame, int(labels[j])


def shapes_frames(n: int, scale: int = 3, seed: int = 0,
                  split: str = "val") -> Iterator[tuple[np.ndarray, list[tuple[int, tuple[float, float, float, float]]]]]:
    """``n`` BGR frames of the shapes validation images enlarged ``scale`` times, with their
    objects as ``(class index 0-4, (x0, y0, x1, y1) frame pixels)``."""
    from vizoo.data.shapes import render_sample

    cv2 = import_cv2()
    for i in range(n):
        sample = render_sample(seed, split, i, SHAPES_SIZE)
        rgb = sample.image
        if scale != 1:
            rgb = cv2.resize(rgb, (SHAPES_SIZE * scale,) * 2, interpolation=cv2.INTER_LINEAR)
        boxes = [(o.category_id - 1, (o.bbox[0] * scale, o.bbox[1] * scale, (o.bbox[0] + o.bbox[2]) * scale,
                                      (o.bbox[1] + o.bbox[3]) * scale)) for o in sample.objects]
        yield cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), boxes


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 30.0) -> int:
    """Write BGR frames to ``path`` (.mp4: MPEG-4, .avi: MJPEG); returns how many."""
    cv2 = import_cv2()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix.lower() == ".avi" else "mp4v"))
    writer, count = None, 0
    try:
        for frame in frames:
            if writer is None:
                writer = cv2.VideoWriter(str(path), fourcc, float(fps), (frame.shape[1], frame.shape[0]))
                if not writer.isOpened():
                    raise DemoError(f"cannot write the video {path}: use .mp4 or .avi in a writable folder")
            writer.write(frame)
            count += 1
    finally:
        if writer is not None:
            writer.release()
    return count


def _cmd_video(args: argparse.Namespace) -> int:
    if args.frames < 1:
        raise ValueError(f"--frames must be at least 1, got {args.frames}")
    if args.kind == "digits":
        frames = (f for f, _ in digits_frames(args.frames))
    else:
        frames = (f for f, _ in shapes_frames(args.frames, scale=args.scale))
    n = write_video(args.out, frames, fps=args.fps)
    print(f"wrote {n} frames of bundled {args.kind} to {args.out}")
    return 0


def add_video_parser(tasks: argparse._SubParsersAction) -> None:
    p = tasks.add_parser("video", help="write a sample video of bundled digits or shapes (no camera needed)")
    p.add_argument("kind", choices=("digits", "shapes"))
    p.add_argument("out", help="the video to write (.mp4 or .avi)")
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--fps", type=float, default=10.0, help="frame rate stored in the file (default 10)")
    p.add_argument("--scale", type=int, default=3, help=f"shapes: enlarge the {SHAPES_SIZE} px images "
                   "this many times (default 3)")
    p.add_argument("--verbose", action="store_true", help="show third-party warnings and banners")
    p.set_defaults(func=_cmd_video)

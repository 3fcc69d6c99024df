"""`vizoo demo classify|detect`: live classification or detection from a camera, a video, images
or a stream, with a zoo model (PyTorch) or an exported file (TFLite; CoreML on macOS).

    vizoo demo classify --checkpoint runs/quickstart/train/best.safetensors            # camera 0, a window
    vizoo demo classify --tflite runs/quickstart/export/mobilenetv2_100_evos0_fp32.tflite --source clip.mp4
    vizoo demo detect --tflite runs/stageinteractor_tiny/export/stageinteractor_tiny_fp32.tflite \\
        --source shapes.mp4 --headless --save out.mp4

No camera? ``vizoo demo video shapes shapes.mp4`` writes a sample video of the bundled data.
``--source``: a camera index (0), a video or image file, a folder of images, or a stream URL.
A window opens unless ``--headless`` (q or Esc quits; a still image waits for a key); headless
runs print each frame's predictions, ``--save`` writes the annotated frames (a .mp4/.avi file or
a folder). The last line is the statistics: frames, dropped frames, end-to-end FPS, median ms
per stage. ``demos/webcam_classify.py`` and ``demos/webcam_detect.py`` run this same code.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

TASKS = ("classify", "detect")


def _add_common(p: argparse.ArgumentParser, task: str) -> None:
    what = p.add_argument_group("model (one of)")
    what.add_argument("--model", metavar="NAME", help="a registered model (random weights unless --pretrained; "
                      "with --checkpoint: overrides the checkpoint's model name)")
    what.add_argument("--checkpoint", metavar="FILE", help="a vizoo checkpoint (.safetensors + its .json sidecar)")
    what.add_argument("--tflite", metavar="FILE", help="an exported .tflite, run by ai-edge-litert as an app runs "
                      "it (its .tflite.json sidecar or embedded metadata gives the preprocessing and labels)")
    what.add_argument("--coreml", metavar="FILE", help="an exported .mlpackage (Core ML on macOS; elsewhere "
                      "vizoo's slow NumPy MIL executor)")
    p.add_argument("--pretrained", default=False, help="with --model: true (published weights), a path or a URL")
    p.add_argument("--source", default="0", help="camera index, video file, image, folder of images, or "
                   "stream URL (default 0: the first camera)")
    p.add_argument("--img-size", "--input-size", dest="img_size", metavar="N|HxW", help="model input size "
                   "for --model/--checkpoint (default: the model's); an exported file's size is fixed")
    p.add_argument("--labels", metavar="A,B,...|FILE", help="class names (comma-separated, or a file with "
                   "one per line) when the model or file carries none")
    p.add_argument("--topk", type=int, default=3 if task == "classify" else 20,
                   help="classes to show" if task == "classify" else
                   "most (query, class) pairs to keep, by score (default 20)")
    if task == "detect":
        p.add_argument("--score-threshold", type=float, default=0.3, help="hide detections below this "
                       "score (default 0.3)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of the model (default 2)")
    p.add_argument("--headless", action="store_true", help="no window: print predictions (servers, CI); "
                   "with --save, write the annotated frames")
    p.add_argument("--save", metavar="PATH", help="write annotated frames: a video (.mp4, .avi) or a folder")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N frames")
    p.add_argument("--quiet", action="store_true", help="headless: no per-frame lines, only the summary")
    p.add_argument("--verbose", action="store_true", help="show third-party warnings and banners")
    p.set_defaults(func=_cmd_demo, demo_task=task)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .classify import ClassifyTask
    from .detect import DetectTask
    from .errors import import_cv2
    from .loop import report, run_demo
    from .overlay import check_display
    from .runners import load_backend, parse_input_size, parse_labels

    import_cv2()
    if not args.headless:
        check_display()        # before anything slow: a missing display is one line at once
    task = ClassifyTask(args.topk) if args.demo_task == "classify" else DetectTask(args.topk, args.score_threshold)
    backend = load_backend(model=args.model, checkpoint=args.checkpoint, tflite=args.tflite, coreml=args.coreml,
                           pretrained=_pretrained(args.pretrained), input_size=parse_input_size(args.img_size),
                           labels=parse_labels(args.labels), threads=args.threads)
    try:
        what = args.tflite or args.coreml or args.checkpoint or args.model
        backend.check_task(args.demo_task, what)
        print(f"{args.demo_task}: {backend.name}, input {backend.pre.channels}x{backend.pre.size_text}, "
              f"source {args.source}", flush=True)
        for note in backend.notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
        stats = run_demo(task, backend, args.source, headless=args.headless, save=args.save,
                         max_frames=args.max_frames, quiet=args.quiet)
    finally:
        backend.close()
    report(stats)
    return 0


def _pretrained(value: str | bool) -> str | bool:
    if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", ""):
        return False
    return value


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="live classification / detection from a camera, video, images or stream",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="demo_task", required=True, metavar="TASK")
    for task, text in (("classify", "top-k labels of each frame"), ("detect", "boxes with labels and scores")):
        _add_common(tasks.add_parser(task, help=text, description=f"vizoo demo {task}: {text}, live. "
                                     "Examples and keys: vizoo demo --help"), task)
    from .samples import add_video_parser

    add_video_parser(tasks)


def run_script(task: str, argv: Sequence[str] | None = None) -> int:
    """``demos/webcam_<task>.py``: the same command as ``vizoo demo <task>`` (same errors, exit codes)."""
    from vizoo.cli import main

    return main(["demo", task, *(sys.argv[1:] if argv is None else argv)])

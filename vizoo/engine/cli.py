"""`vizoo train` and `vizoo eval`.

    vizoo train NAME --data digits|PATH --epochs N --img-size S --batch-size B --out DIR [--resume] [--pretrained [SRC]]
    vizoo train --config runs/x/config.yaml              # rerun a run exactly
    vizoo train --resume --out runs/x                    # continue a stopped run (its config.yaml)
    Ctrl-C                                               # checkpoint at the next step, print the
                                                         # command that continues, exit 130
    torchrun --nproc_per_node 2 -m vizoo train NAME ...  # same command, several processes
    vizoo eval [NAME] --checkpoint FILE|RUN_DIR --data digits|PATH [--split val] [--out DIR]

Every `TrainConfig` field is a flag (see `vizoo train -h`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from .config import TrainConfig, add_config_arguments, config_from_args


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import TrainingInterrupted, train

    base = None
    if args.config:
        base = TrainConfig.from_yaml(args.config)
    elif not args.model_name and getattr(args, "resume", None) and getattr(args, "out", None):
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"--resume without a model name needs {saved}; give the model name too")
        base = TrainConfig.from_yaml(saved)
    cfg = config_from_args(args, base)
    if args.model_name:
        cfg = cfg.replace(model=args.model_name)
    try:
        result = train(cfg)
    except TrainingInterrupted as stop:  # Ctrl-C: checkpoint written; one line, no traceback
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{stop.where}: checkpoint saved; continue with: {_resume_command(stop.run_dir)}",
                  file=sys.stderr, flush=True)
        return 130  # the shell's status for a command stopped by SIGINT
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if args.json:
        print(json.dumps({"run_dir": str(result.run_dir), "best": str(result.best_path),
                          "last": str(result.last_path), "metrics": result.metrics}, indent=2))
    else:
        print(f"run directory: {result.run_dir}\n  best: {result.best_path}\n  last: {result.last_path}")
    return 0


def _resume_command(run_dir: str | os.PathLike, argv: list[str] | None = None) -> str:
    """The command line that continues a stopped run: the one that started it (``sys.argv``),
    without any ``--resume`` it had, plus ``--resume`` (and ``--out DIR`` when the directory was
    the default one, so that the command does not depend on where it is typed). When this
    process was not started as ``vizoo train`` (``main([...])`` from Python), the run's saved
    config.yaml is what ``vizoo train --out DIR --resume`` continues from."""
    argv = list(sys.argv if argv is None else argv)
    run_dir = str(run_dir)
    if len(argv) < 2 or argv[1] != "train":
        return shlex.join(["vizoo", "train", "--out", run_dir, "--resume"])
    args = _without_resume(argv[2:])
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", run_dir]
    return f"{_launcher(argv[0])} {shlex.join(['train', *args, '--resume'])}"


def _without_resume(args: list[str]) -> list[str]:
    """``args`` less ``--resume [VALUE]``: argparse takes the next word as its value unless it is
    an option, so that word goes too (the new ``--resume`` continues from the run directory)."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--resume="):
            i += 1
        elif a == "--resume":
            i += 2 if i + 1 < len(args) and not args[i + 1].startswith("-") else 1
        else:
            out.append(a)
            i += 1
    return out


def _launcher(argv0: str) -> str:
    """How this process was started: ``vizoo`` (the console script), ``python -m vizoo`` (with
    the interpreter as typed), or torchrun (its single-node form; multi-node options cannot be
    seen from a worker, so they are left to the user)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        nproc = os.environ.get("LOCAL_WORLD_SIZE", "1")
        if os.environ.get("WORLD_SIZE", nproc) == nproc:
            return f"torchrun --standalone --nproc_per_node {nproc} -m vizoo"
        return "torchrun <your torchrun options> -m vizoo"
    if Path(argv0).name == "__main__.py":  # python -m vizoo
        python = getattr(sys, "orig_argv", [sys.executable])[0] or sys.executable
        return f"{shlex.quote(python)} -m vizoo"
    on_path = shutil.which(Path(argv0).name)
    if on_path and Path(argv0).exists() and os.path.samefile(on_path, argv0):
        return shlex.quote(Path(argv0).name)
    return shlex.quote(argv0) if Path(argv0).exists() else "vizoo"


def _cmd_eval(args: argparse.Namespace) -> int:
    from .detection import is_detection_checkpoint, run_eval_command

    if is_detection_checkpoint(args.checkpoint, args.model_name):  # boxes and COCO AP, not top-1
        return run_eval_command(args)
    from .evaluate import evaluate

    ckpt = Path(args.checkpoint)
    out = args.out
    if out is None:
        data_name = "digits" if args.data == "digits" else Path(args.data).name
        out = (ckpt if ckpt.is_dir() else ckpt.parent) / f"eval-{data_name}-{args.split}"
    report = evaluate(ckpt, data=args.data, split=args.split, name=args.model_name, img_size=args.img_size,
                      batch_size=args.batch_size, num_workers=args.num_workers, val_fraction=args.val_fraction,
                      split_seed=args.split_seed, device=args.device, amp=args.amp, out_dir=out,
                      progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} on {report['data']} ({report['split']}, {report['num_samples']} images): "
          f"top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%  loss {report['loss']:.4f}")
    worst = sorted(((v, k) for k, v in report["per_class_accuracy"].items() if v is not None))[:5]
    print("lowest per-class accuracy: " + ", ".join(f"{k} {v:.1f}%" for v, k in worst))
    print(f"wrote {', '.join(report['files'])}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model (classification on digits or your folders)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_name", nargs="?", metavar="NAME", help="registered model name (see `vizoo list`)")
    p.add_argument("--config", help="YAML file of config keys (flags given here override it)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("eval", help="top-1/top-5, per-class accuracy and confusion matrix of a checkpoint")
    p.add_argument("model_name", nargs="?", metavar="NAME", help="model name (default: the checkpoint's sidecar)")
    p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint or a run directory (its best)")
    p.add_argument("--data", default="digits", help="'digits' or a folder of class sub-folders (detectors: "
                   "'shapes' or a COCO folder; default: the data they were trained on)")
    p.add_argument("--split", default="val", choices=("train", "val", "all"))
    p.add_argument("--img-size", type=int, default=None, help="default: the size the model was trained at")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2, help="as in training, for data without a val split")
    p.add_argument("--split-seed", type=int, default=0, help="as in training")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="none", choices=("none", "bf16"))
    p.add_argument("--out", default=None, help="folder for eval.json and confusion_matrix.png")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.set_defaults(func=_cmd_eval)

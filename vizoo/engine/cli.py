"""`vizoo train` and `vizoo eval`.

    vizoo train NAME --data digits|PATH --epochs N --img-size S --batch-size B --out DIR [--resume] [--pretrained [SRC]]
    vizoo train --config runs/x/config.yaml              # rerun a run exactly
    vizoo train --resume --out runs/x                    # continue a stopped run (its config.yaml)
    torchrun --nproc_per_node 2 -m vizoo train NAME ...  # same command, several processes
    vizoo eval [NAME] --checkpoint FILE|RUN_DIR --data digits|PATH [--split val] [--out DIR]

Every `TrainConfig` field is a flag (see `vizoo train -h`).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .config import TrainConfig, add_config_arguments, config_from_args


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import train

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
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    if args.json:
        print(json.dumps({"run_dir": str(result.run_dir), "best": str(result.best_path),
                          "last": str(result.last_path), "metrics": result.metrics}, indent=2))
    else:
        print(f"run directory: {result.run_dir}\n  best: {result.best_path}\n  last: {result.last_path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
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
    p.add_argument("--data", default="digits", help="'digits' or a folder of class sub-folders")
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

"""``vizoo continual``: the bundled continual-learning benchmark (CLR against its baselines).

Trains a quarter-width ResNet-18 once on a proxy task, then every method on six offline tasks
(digits, textures, shapes, colours, more digits, rotated/inverted digits) for each seed, and prints
average accuracy, forgetting, parameters added per task and time; writes results.json,
results.md and accuracy_matrix.png to --out. Interrupted? Run the same command again: finished
sequences, tasks and epochs are reused.

Example:
    vizoo continual --out runs/continual --seeds 0 1 2 --jobs 2
"""
from __future__ import annotations

import argparse

from .methods import METHODS


def _cmd_continual(args: argparse.Namespace) -> int:
    from .benchmark import format_summary, run_benchmark

    summary = run_benchmark(args.out, methods=args.methods, seeds=args.seeds, tasks=args.tasks, epochs=args.epochs,
                            proxy_epochs=args.proxy_epochs, img_size=args.img_size, jobs=args.jobs,
                            threads=args.threads, progress=True)
    print(f"\nanchor: resnet18_025, proxy top-1 {summary['proxy_top1']:.1f} %; tasks: {', '.join(summary['tasks'])}; "
          f"{summary['epochs']} epochs a task, seeds {summary['seeds']}")
    print(format_summary(summary["rows"]))
    print(f"total {summary['total_seconds'] / 60:.1f} min; {args.out}/results.md, results.json, accuracy_matrix.png")
    if "clr" in args.methods:
        seed = args.seeds[0]
        print(f"one phone file for all tasks: vizoo export clr_resnet18_025 --checkpoint {args.out}/backbone/best.safetensors "
              f"--tasks {args.out}/clr/seed{seed}/*/task_state.safetensors")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("continual", help="continual-learning benchmark: CLR vs baselines on six bundled tasks",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/continual", help="results folder (reused to resume)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                   help=f"methods to run (default all: {', '.join(METHODS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=None, help="task names (default: the bundled sequence)")
    p.add_argument("--epochs", type=int, default=8, help="epochs per task (every method the same)")
    p.add_argument("--proxy-epochs", type=int, default=10, help="epochs of the anchor's proxy task")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--jobs", type=int, default=2, help="sequences trained in parallel processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / jobs)")
    p.set_defaults(func=_cmd_continual)

"""`vizoo` command line: list, info, and the commands each subsystem adds.

Subsystems (engine, exporter, ...) contribute commands through a ``register_cli(subparsers)``
function in their ``cli`` module, listed in ``_COMMAND_MODULES``; this file stays small.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Sequence

from . import __version__, quiet
from .info import format_info, model_info
from .registry import get_family, get_pretrained_cfg, list_models

#: Modules whose ``register_cli(subparsers)`` adds commands (train/eval, export/bench, ...).
_COMMAND_MODULES = (
    "vizoo.engine.cli",
    "vizoo.export.cli",
    "vizoo.quickstart",
    "vizoo.visualize",
    "vizoo.doctor",
    "vizoo.continual.cli",
    "vizoo.demo.cli",
    "vizoo.quant.cli",
)


def _cmd_list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern or "*", pretrained=args.pretrained, family=args.family,
                        features_only=args.features_only)
    if not names:
        print(f"no model matches {args.pattern!r}; `vizoo list` shows all", file=sys.stderr)
        return 1
    if args.verbose:
        width = max(map(len, names))
        for n in names:
            cfg = get_pretrained_cfg(n)
            print(f"{n:<{width}}  {get_family(n):<16} {'x'.join(map(str, cfg.input_size[1:])):>7}  {cfg.paper}")
    else:
        print("\n".join(names))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    for name in args.names:
        info = model_info(name)
        print(json.dumps(info.to_dict(), indent=2) if args.json else format_info(info))
        if len(args.names) > 1 and not args.json:
            print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vizoo", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vizoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list registered models (shell wildcards)")
    p.add_argument("pattern", nargs="?", default="*", help="e.g. '*evo*' or 'evit*.r0p7*'")
    p.add_argument("--pretrained", action="store_true", help="only names with published weights")
    p.add_argument("--family", help="only this family (e.g. evonorm_nets)")
    p.add_argument("--features-only", action="store_true",
                   help="only models that create_model(..., features_only=True) can build (feature maps)")
    p.add_argument("-v", "--verbose", action="store_true", help="family, input size and paper")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="paper, params and MACs (ours and the paper's) of models")
    p.add_argument("names", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if not e.name or not (module_name + ".").startswith(e.name + "."):
                raise  # a missing dependency inside the module, not an optional command
            continue
        module.register_cli(sub)
    for name, command in sub.choices.items():
        if not any("--verbose" in a.option_strings for a in command._actions):
            command.add_argument("--verbose", action="store_true",
                                 help="show third-party warnings, banners and converter progress")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before any converter is imported: their start-up messages are hidden unless --verbose.
    quiet.install(verbose="--verbose" in argv and (not argv or argv[0] != "list"))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"vizoo {args.command}: interrupted; nothing partial was written", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        # User-facing errors (unknown model, bad checkpoint, bad input size...) get one clear line.
        print(f"vizoo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""One process vs `torchrun --nproc_per_node N` on the same command: same accuracy band?

    python benchmarks/torchrun_parity.py [--model mobilenetv2_100_evos0] [--epochs 10] [--img-size 32] [--nproc 2]

Runs `vizoo train` twice with identical flags (``--batch-size`` is the global batch, so both
runs take the same optimizer steps on the same global batches) and prints the per-epoch val
top-1 of both, the final gap, the largest weight difference and the wall times. Models without
batch statistics (EvoNorm-S0 nets, ViTs) follow the single-process trajectory up to float
summation order; BatchNorm models differ by per-process batch statistics (use --sync-bn to
share them). Exit status 1 if the final top-1 gap exceeds --band points.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2_100_evos0")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--band", type=float, default=2.0, help="allowed final top-1 gap in points")
    ap.add_argument("--out", default=None, help="keep the two run directories here")
    ap.add_argument("extra", nargs="*", help="more `vizoo train` flags (after --)")
    args = ap.parse_args(argv)

    from safetensors.torch import load_file

    root = Path(args.out or tempfile.mkdtemp(prefix="vizoo_parity_"))
    flags = [args.model, "--data", args.data, "--epochs", str(args.epochs), "--img-size", str(args.img_size),
             "--batch-size", str(args.batch_size), "--progress", "off", *args.extra]
    threads = max(1, (os.cpu_count() or 2) // args.nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    one = run([sys.executable, "-m", "vizoo", "train", *flags, "--out", str(root / "one")], env)
    many = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                "-m", "vizoo", "train", *flags, "--out", str(root / f"ddp{args.nproc}")], env)

    def history(d: Path) -> list[dict]:
        return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]

    h1, h2 = history(root / "one"), history(root / f"ddp{args.nproc}")
    a, b = load_file(root / "one" / "last.safetensors"), load_file(root / f"ddp{args.nproc}" / "last.safetensors")
    drift = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"{'epoch':>5} {'1 proc top-1':>13} {f'{args.nproc} procs top-1':>14}")
    for r1, r2 in zip(h1, h2):
        print(f"{r1['epoch']:>5} {r1['val_top1']:>13.2f} {r2['val_top1']:>14.2f}")
    gap = abs(h1[-1]["val_top1"] - h2[-1]["val_top1"])
    print(f"final gap {gap:.2f} points (band {args.band}); max weight difference {drift:.2e}; "
          f"wall {one:.0f} s (1 process) vs {many:.0f} s ({args.nproc} processes, {threads} thread(s) each)")
    print(f"runs kept in {root}")
    return 0 if gap <= args.band else 1


if __name__ == "__main__":
    sys.exit(main())

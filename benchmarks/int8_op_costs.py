"""Per-op cost of XNNPACK's int8 and fp32 kernels on the ops of a normalisation layer, in ONE run.

    python benchmarks/int8_op_costs.py [--shapes 4x192 16x32 56x144] [--threads 1 2]

Each file is a chain of N identical ops (after one 1x1 conv) on a 1xSxSxC NHWC tensor, converted
by litert-torch and quantized to full int8 by vizoo's recipe (calibrated on random inputs); per-op
time = (chain file - conv-only file) / N, fp32 and int8 files timed in the same interleaved rounds.
Shows which ops int8 makes cheaper at which size: why EvoNorm-S0's int8 file is slower than fp32
at 32 px while BN nets (whose norms fold into the convs) gain. Writes
benchmarks/results/int8_op_costs.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: Each chain step avoids scalar constants and subtractions (an int8 ADD/SUB whose operands' scales
#: differ too much is refused by XNNPACK, which splits the chain: chains of x - mean(x) ran with 36-40
#: partitions, so no SUB row is shown) and constant folding (consecutive constant MULs fold).
OPS = {
    "conv 1x1 only (baseline)": lambda m, x: x,
    "MUL by a per-channel constant, fused ReLU": lambda m, x: torch.relu(x * m.v.view(1, -1, 1, 1)),
    "MUL same shape (x·sigmoid(x)) + LOGISTIC": lambda m, x: x * torch.sigmoid(x),
    "LOGISTIC": lambda m, x: torch.sigmoid(x),
    "MEAN + LOGISTIC on (1,1,1,C) + broadcast MUL": lambda m, x: x * torch.sigmoid(x.mean((2, 3), keepdim=True)) * 2,
}


class Chain(nn.Module):
    def __init__(self, op: str, channels: int, n: int):
        super().__init__()
        self.op, self.n = op, n
        self.conv = nn.Conv2d(channels, channels, 1)
        self.v = nn.Parameter(torch.rand(channels) * 0.2 + 0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        for _ in range(self.n):
            x = OPS[self.op](self, x)
        return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["4x192", "16x32", "56x144"], help="SxC")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--results", default=str(RESULTS / "int8_op_costs"))
    args = ap.parse_args(argv)

    import litert_torch

    from fast_path import timed_rounds
    from vizoo.export import quantize
    from vizoo.export.tflite import _signature_inputs, timed_invoke, xnnpack_delegation
    from vizoo.io import write_text_atomic

    litert_torch.config.show_progress = False
    rng = np.random.default_rng(0)
    files: dict[tuple[str, int, str], bytes] = {}
    deleg: dict[str, Any] = {}
    for shape in args.shapes:
        s, c = (int(v) for v in shape.split("x"))
        n = 40 if s * s * c < 20_000 else 8
        for op in OPS:
            torch.manual_seed(0)
            m = Chain(op, c, 0 if op.startswith("conv") else n).eval()
            fp32 = bytes(litert_torch.convert(litert_torch.to_channel_last_io(m, args=[0]).eval(),
                                              (torch.randn(1, s, s, c),)).model_content())
            name = _signature_inputs(fp32)[0]
            calib = [{name: rng.standard_normal((1, s, s, c)).astype(np.float32)} for _ in range(8)]
            int8, _ = quantize.tflite_int8_static(fp32, calib, "full")
            files[(shape, n, op + "|fp32")] = fp32
            files[(shape, n, op + "|int8")] = int8
            for p, d in (("fp32", fp32), ("int8", int8)):
                info = xnnpack_delegation(d)
                deleg[f"{shape} {op} {p}"] = {"partitions": info.get("partitions"),
                                              "ops_outside": info.get("ops_outside")}
    rows = []
    for th in args.threads:
        fns = {f"{shape}|{n}|{key}": timed_invoke(d, th)[0] for (shape, n, key), d in files.items()}
        r = timed_rounds(fns, args.rounds, seconds_per_call=0.1)
        med = {k: statistics.median(v) for k, v in r.items()}
        for shape in args.shapes:
            n = next(nn_ for (s_, nn_, _) in files if s_ == shape)
            base = {p: med[f"{shape}|{n}|conv 1x1 only (baseline)|{p}"] for p in ("fp32", "int8")}
            for op in OPS:
                if op.startswith("conv"):
                    continue
                per = {p: (med[f"{shape}|{n}|{op}|{p}"] - base[p]) / n * 1e3 for p in ("fp32", "int8")}
                rows.append({"threads": th, "shape": f"1x{shape.split('x')[0]}x{shape.split('x')[0]}x{shape.split('x')[1]}",
                             "op": op, "fp32_us": per["fp32"], "int8_us": per["int8"],
                             "int8_over_fp32": per["int8"] / per["fp32"] if per["fp32"] > 0.01 else None,
                             "int8_partitions": deleg[f"{shape} {op} int8"]["partitions"]})
    lines = [f"# int8 vs fp32 cost per op in XNNPACK ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"`python benchmarks/int8_op_costs.py`: chains of identical ops after a 1x1 conv, per-op time = "
             "(chain - conv only) / chain length, fp32 and int8 files timed in the same interleaved "
             f"rounds ({args.rounds}); shared 2-core VM.", "",
             "| threads | tensor (NHWC) | op | fp32 µs | int8 µs | int8 / fp32 | int8 partitions |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "" if r["int8_over_fp32"] is None else f"{r['int8_over_fp32']:.2f}"
        lines.append(f"| {r['threads']} | {r['shape']} | {r['op']} | {r['fp32_us']:.2f} | {r['int8_us']:.2f} | "
                     f"{ratio} | {r['int8_partitions']} |")
    write_text_atomic(Path(args.results + ".md"), "\n".join(lines) + "\n")
    write_text_atomic(Path(args.results + ".json"), json.dumps({"rows": rows, "delegation": deleg}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

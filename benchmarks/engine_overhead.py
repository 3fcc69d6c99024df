"""Per-step cost of the vizoo Trainer against a bare PyTorch loop, same model and data, one run.

    python benchmarks/engine_overhead.py [--model mobilenetv2_100_evos0] [--img-size 32] [--rounds 5]

Both loops train the same architecture on the same prepared digits dataset (same transform, same
tensor cache, batch size, AdamW). The bare loop is `for x, y in loader: loss = CE(model(x), y);
zero_grad; backward; step`. The Trainer's epoch adds what it always does per step: the model hook
check, autocast context, the non-finite-loss check, the per-update LR schedule, progress
accounting and checkpoint bookkeeping (no checkpoint is written inside the timed epochs). Rounds
are interleaved (engine-bare, bare-engine, ...) and the median of the paired ratios is the
overhead, so machine load drifts hit both alike. CPU time is reported beside wall time: on a shared machine it is the steadier
measure of work done (run with --threads 1 for that reason). Exit status 1 if overhead > 5 %.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def bare_epoch(model, optimizer, loader) -> tuple[float, float, int]:
    model.train()
    t, c = time.perf_counter(), time.process_time()
    steps = 0
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return time.perf_counter() - t, time.process_time() - c, steps


def engine_epoch(trainer) -> tuple[float, float, int]:
    trainer.batch_in_epoch = 0
    t, c = time.perf_counter(), time.process_time()
    trainer._train_one_epoch()
    return time.perf_counter() - t, time.process_time() - c, trainer.batches_per_epoch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenetv2_100_evos0")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the steadiest per-step times)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import vizoo
    from vizoo.engine import TrainConfig, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(model=args.model, data="digits", img_size=args.img_size, batch_size=args.batch_size,
                          epochs=args.rounds + 1, out=tmp, progress="off", weight_decay=0.05, lr=1e-3,
                          recipe="none")
        trainer = Trainer(cfg)
        trainer.setup()
        train_set = trainer.data.splits["train"]
        for i in range(len(train_set)):  # fill the tensor cache both loops read from
            train_set[i]
        torch.manual_seed(0)
        model = vizoo.create_model(args.model, num_classes=10)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
        bare_epoch(model, optimizer, loader)  # warm-up both (allocator, first-call costs)
        engine_epoch(trainer)
        rows = []
        for r in range(args.rounds):
            trainer.epoch = r + 1
            if r % 2 == 0:  # alternate which loop goes first, so order effects cancel
                e = engine_epoch(trainer)
                b = bare_epoch(model, optimizer, loader)
            else:
                b = bare_epoch(model, optimizer, loader)
                e = engine_epoch(trainer)
            rows.append({"engine_wall_ms": 1e3 * e[0] / e[2], "engine_cpu_ms": 1e3 * e[1] / e[2],
                         "bare_wall_ms": 1e3 * b[0] / b[2], "bare_cpu_ms": 1e3 * b[1] / b[2], "steps": e[2]})
            print(f"round {r + 1}: engine {rows[-1]['engine_wall_ms']:.1f} ms/step "
                  f"(cpu {rows[-1]['engine_cpu_ms']:.1f}), bare {rows[-1]['bare_wall_ms']:.1f} ms/step "
                  f"(cpu {rows[-1]['bare_cpu_ms']:.1f})", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "steps"}
    # paired ratios (each round's engine epoch against the bare epoch next to it), then the median
    wall = statistics.median(r["engine_wall_ms"] / r["bare_wall_ms"] for r in rows)
    cpu = statistics.median(r["engine_cpu_ms"] / r["bare_cpu_ms"] for r in rows)
    result = {"model": args.model, "img_size": args.img_size, "batch_size": args.batch_size,
              "threads": torch.get_num_threads(), "rounds": rows, "median": med,
              "overhead_wall_pct": 100 * (wall - 1), "overhead_cpu_pct": 100 * (cpu - 1)}
    print(f"median per step: engine {med['engine_wall_ms']:.1f} ms, bare {med['bare_wall_ms']:.1f} ms; "
          f"median paired overhead {result['overhead_wall_pct']:+.2f}% wall, {result['overhead_cpu_pct']:+.2f}% cpu")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["overhead_cpu_pct"] <= 5.0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""``vizoo quantize``: the bundled QuEST benchmark (low-bit diffusion PTQ with selective finetuning).

Trains (or reuses) a small DDPM UNet on the 16x16 digits, then for every bit width and seed
quantizes it four ways, each building on the last: naive PTQ (round-to-nearest, min-max, one
activation set), a Q-Diffusion-style baseline (AdaRound + per-timestep activation sets),
+ time-embedding finetuning (QuEST stage 1), full QuEST (+ attention layers and activation scales,
stage 2). Prints ε-MSE vs FP, final-sample PSNR vs FP, the Fréchet distance to real digits
and the share of parameters finetuned (mean ± std over seeds); writes quest.md, quest.json and
quest_samples.png to --out. Interrupted? Run the same command again: finished work is reused.

Example:
    vizoo quantize --out runs/quest --seeds 0 1 2 --bits w8a8 w4a8 w4a4 --jobs 2 --results benchmarks/results
"""
from __future__ import annotations

import argparse
import sys


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .benchmark import BenchmarkSettings, format_table, run_benchmark
    from .finetune import StageOptions
    from .pipeline import PipelineSettings

    pipeline = PipelineSettings(adaround_iters=args.adaround_iters, act_init=args.act_init,
                                weight_init=args.weight_init, single_act_set=args.single_act_set,
                                te_layers=args.te_layers,
                                te=StageOptions(stage="te", steps_per_t=args.te_steps, batch_size=args.te_batch),
                                attn=StageOptions(stage="attn", epochs=args.attn_epochs, batch_size=args.attn_batch,
                                                  local_loss=args.local_loss))
    settings = BenchmarkSettings(calib_samples=args.calib_samples, eval_samples=args.eval_samples,
                                 keep_every=args.keep_every,
                                 image_samples=args.image_samples, fp_dir=args.fp_dir,
                                 fp_checkpoint=args.fp_checkpoint, pipeline=pipeline)
    try:
        summary = run_benchmark(args.out, seeds=args.seeds, bits=args.bits, jobs=args.jobs, threads=args.threads,
                                settings=settings, results=args.results, progress=True)
    except KeyboardInterrupt:
        print(f"vizoo quantize: interrupted; finished runs, snapshots and finetuning checkpoints are kept in "
              f"{args.out}: run the same command to resume", file=sys.stderr)
        return 130
    print()
    print(format_table(summary["rows"]))
    where = f"{args.out}/quest.md, quest.json, quest_samples.png"
    if args.results:
        where += f" (copied to {args.results})"
    print(f"total {summary['total_seconds'] / 60:.1f} min; {where}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    from .benchmark import BITS, BenchmarkSettings
    from .pipeline import PipelineSettings

    b, p = BenchmarkSettings(), PipelineSettings()
    te, attn = p.te, p.attn
    cmd = sub.add_parser("quantize", help="QuEST benchmark: low-bit PTQ + selective finetuning of a digit DDPM",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("--out", default="runs/quest", help="results folder (reused to resume)")
    cmd.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    cmd.add_argument("--bits", nargs="+", default=list(BITS), metavar="WxAy",
                     help=f"bit widths (default: {' '.join(BITS)})")
    cmd.add_argument("--jobs", type=int, default=2, help="(bits, seed) runs in parallel processes")
    cmd.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / jobs)")
    cmd.add_argument("--results", default=None, help="also copy quest.md/json/png here (e.g. benchmarks/results)")
    cmd.add_argument("--fp-dir", default=b.fp_dir, help="FP model run folder, trained there when absent and "
                     "reused after (default: %(default)s)")
    cmd.add_argument("--fp-checkpoint", default=None, help="use this FP checkpoint as is (no training)")
    g = cmd.add_argument_group("scale (defaults fit 40 minutes on 2 cores with --jobs 2)")
    g.add_argument("--calib-samples", type=int, default=b.calib_samples, help="calibration samples per timestep (default: %(default)s)")
    g.add_argument("--eval-samples", type=int, default=b.eval_samples, help="held-out (x_t, t) per timestep (default: %(default)s)")
    g.add_argument("--keep-every", type=int, default=b.keep_every,
                   help="calibrate every K-th of the 20 DDIM steps (default: %(default)s = all; the others "
                   "use the next higher set)")
    g.add_argument("--image-samples", type=int, default=b.image_samples, help="samples for PSNR and FD (default: %(default)s)")
    g.add_argument("--adaround-iters", type=int, default=p.adaround_iters, help="AdaRound iterations per block (default: %(default)s)")
    g.add_argument("--te-steps", type=int, default=te.steps_per_t, help="stage 1: Adam steps per calibrated timestep (default: %(default)s)")
    g.add_argument("--te-batch", type=int, default=te.batch_size, help="stage 1: samples per step (default: %(default)s)")
    g.add_argument("--attn-epochs", type=int, default=attn.epochs, help="stage 2: epochs over the calibrated steps (default: %(default)s)")
    g.add_argument("--attn-batch", type=int, default=attn.batch_size, help="stage 2: samples per step (default: %(default)s)")
    v = cmd.add_argument_group("method variants")
    v.add_argument("--weight-init", choices=("minmax", "mse"), default=p.weight_init,
                   help="weight ranges of qdiff/QuEST before AdaRound: min-max, or the official code's "
                        "per-channel L2.4 search (clips this UNet's output conv; see vizoo.quant.pipeline)")
    v.add_argument("--act-init", choices=("minmax", "percentile"), default=p.act_init,
                   help="activation range init of qdiff/QuEST")
    v.add_argument("--single-act-set", action="store_true",
                   help="the paper's variant: one activation set for all timesteps (code: one per timestep)")
    v.add_argument("--te-layers", choices=("proj", "mlp+proj"), default=p.te_layers,
                   help="stage 1 layers: ResBlock time_emb_proj (code) or also the time-embedding MLP")
    v.add_argument("--local-loss", action="store_true", default=None,
                   help="stage 2: add the local attention-output MSE (code: global loss only)")
    cmd.set_defaults(func=_cmd_quantize)

"""StageInteractor's ablation in miniature: baseline, +CSLA, +reuse, full, at equal iterations.

    python benchmarks/stageinteractor_ablation.py                       # A B C D x seeds 0 1 2, 4 epochs
    python benchmarks/stageinteractor_ablation.py --resume              # continue / re-aggregate
    python benchmarks/stageinteractor_ablation.py --variants A D --seeds 0 --iters 20 --num-train 64
        --num-val 16 --jobs 1 --out-dir /tmp/abl --results /tmp/abl/res     # smoke test (one line)

Variants of `stageinteractor_tiny` (the paper's Table "cross-stage interactions", in small):

- A baseline: ``reuse=False, csla=False`` (the AdaMixer-style decoder, per-stage Hungarian labels)
- B +CSLA: ``csla=True`` (cross-stage label assignment in the loss)
- C +reuse: ``reuse=True`` (cross-stage filter reuse in the decoder)
- D full: both

Each variant x seed is one ``python -m vizoo train stageinteractor_tiny --data shapes ...`` in its
own process (``OMP_NUM_THREADS=--threads``; ``--jobs`` of them at a time), with the detection
recipe's defaults untouched (AdamW 2e-4, batch 8, cosine, flips) and only ``--model-kwargs``,
``--seed`` and ``--epochs`` given, so every variant sees the same images in the same order with
the same flips for a seed. The default 4 epochs of the 3,000 training images at batch 8 are 1,500
iterations (the loader drops the last partial batch: ``num_train // 8`` per epoch). The engine
has no max-steps option, so ``--iters N`` becomes the smallest whole number of epochs of the
(``--num-train``) training set that reaches N iterations (the cosine schedule is laid out per epoch).

Runs go to ``OUT_DIR/e{epochs}-n{num_train}-v{num_val}/{variant}_seed{S}/`` (the engine's run
directory plus ``train.log`` and ``ablation_wall.json``), so other settings never mix with them.
``--resume`` skips runs whose ``metrics.jsonl`` reaches the last epoch and continues the others
with the engine's ``--resume`` (``--checkpoint-every`` steps lose at most that much). Ctrl-C (or
SIGTERM) is forwarded once to each run, which checkpoints at its next step and exits.

Reported per variant (mean +- sample std over seeds): the FINAL-epoch val AP / AP50 / AP75 (COCO,
in points), the best-epoch AP, the classification positives per ground-truth box at each decoder
stage (the last epoch's training average; exactly 1.0 without CSLA; with CSLA the matches of
several stages where the stage's own box has IoU >= 0.5 with the GT, so 0 while boxes are coarse) and the
wall time per run; then whether "D > A" and "B > A" hold in mean final AP and whether each
difference exceeds the seed std. Writes ``RESULTS/stageinteractor_ablation.{md,csv,json}``
(atomically; ``--results`` defaults to benchmarks/results). The .csv is the per-variant summary,
the .json has every run.

A smaller ``--num-train``/``--num-val`` uses its own generated copy of the shapes (the engine's
cache folder is named by a hash of the parameters, so the standard 3000/400 cache is never
replaced; images are rendered per index, so the subset is the first images of the standard set).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
STEM = "stageinteractor_ablation"
MODEL = "stageinteractor_tiny"
#: variant -> (name, reuse, csla)
VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "A": ("baseline", False, False),
    "B": ("+CSLA", False, True),
    "C": ("+reuse", True, False),
    "D": ("full", True, True),
}
METRICS = ("AP", "AP50", "AP75")


# ----------------------------------------------------------------------------- settings
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="A baseline, B +CSLA, C +reuse, D full (default: all)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="engine --seed of each run (default 0 1 2)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4)")
    length.add_argument("--iters", type=int, default=None,
                        help="iterations per run, rounded up to whole epochs of the training set")
    p.add_argument("--num-train", type=int, default=3000, help="training images (default: the standard 3000)")
    p.add_argument("--num-val", type=int, default=400, help="validation images (default: the standard 400)")
    p.add_argument("--data-root", default=None,
                   help="where a non-standard --num-train/--num-val copy of the shapes is generated "
                        "(default: the engine's cache, a folder named by the parameters)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS; default 1)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one process each (default 2)")
    p.add_argument("--device", default="auto", help="engine --device (default auto)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="engine --checkpoint-every (optimizer steps; 0: per epoch only). Does not change results")
    p.add_argument("--out-dir", default="runs/ablation", help="parent of the run directories (default runs/ablation)")
    p.add_argument("--results", default=str(RESULTS),
                   help=f"folder for {STEM}.md/.csv/.json (default benchmarks/results)")
    p.add_argument("--resume", action="store_true",
                   help="skip finished runs, continue stopped ones (without it, existing runs are an error)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = p.parse_args(argv)
    if args.threads < 1 or args.jobs < 1:
        p.error("--threads and --jobs must be >= 1")
    if args.num_train < 1 or args.num_val < 1:
        p.error("--num-train and --num-val must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds has repeats")
    args.variants = list(dict.fromkeys(args.variants))
    return args


def batch_size() -> int:
    from vizoo.engine.config import RECIPES

    return int(RECIPES["detection"]["batch_size"])


def resolve_length(args: argparse.Namespace) -> tuple[int, int, int]:
    """(epochs, iterations per epoch, total iterations) of every run."""
    batch = batch_size()
    per_epoch = args.num_train // batch  # the train loader drops the last partial batch
    if per_epoch < 1:
        raise SystemExit(f"--num-train {args.num_train} is less than one batch of {batch}")
    if args.iters is not None:
        if args.iters < 1:
            raise SystemExit("--iters must be >= 1")
        epochs = math.ceil(args.iters / per_epoch)
    else:
        epochs = 4 if args.epochs is None else args.epochs
        if epochs < 1:
            raise SystemExit("--epochs must be >= 1")
    return epochs, per_epoch, epochs * per_epoch


def prepare_data(args: argparse.Namespace) -> tuple[str, Path]:
    """(the engine's --data value, the folder it reads): ``shapes`` for the standard set, else
    the path of a generated copy of the given size (never the standard cache folder)."""
    from vizoo.data.shapes import default_shapes_root, ensure_shapes
    from vizoo.engine.detection import SHAPES

    params = {**SHAPES, "num_train": args.num_train, "num_val": args.num_val}
    standard_root = default_shapes_root(**SHAPES).resolve()
    if params == SHAPES and args.data_root is None:
        # generated here once, so that parallel runs do not all wait on its lock
        return "shapes", ensure_shapes(**SHAPES)["root"]
    root = Path(args.data_root).expanduser() if args.data_root else default_shapes_root(**params)
    if root.resolve() == standard_root and params != SHAPES:
        raise SystemExit(f"--data-root {root} is the standard shapes cache; generating {params} there would "
                         "replace it. Choose another folder")
    return str(root.resolve()), ensure_shapes(root, **params)["root"]


# ----------------------------------------------------------------------------- runs
class Run:
    def __init__(self, variant: str, seed: int, run_dir: Path):
        self.variant, self.seed, self.dir = variant, seed, run_dir
        self.name, self.reuse, self.csla = VARIANTS[variant]
        self.status = "pending"  # pending | done | skipped | failed | stopped
        self.returncode: int | None = None

    @property
    def label(self) -> str:
        return f"{self.variant}_seed{self.seed}"

    def command(self, data: str, epochs: int, args: argparse.Namespace, resume: bool) -> list[str]:
        cmd = [sys.executable, "-m", "vizoo", "train", MODEL, "--data", data,
               "--model-kwargs", f"reuse={str(self.reuse).lower()}", f"csla={str(self.csla).lower()}",
               "--seed", str(self.seed), "--epochs", str(epochs), "--out", str(self.dir),
               "--device", args.device, "--checkpoint-every", str(args.checkpoint_every), "--progress", "off"]
        return cmd + (["--resume"] if resume else [])


def _shown(path: Path) -> str:
    """A path as results files record it: relative to the working directory when inside it, so
    the results say nothing about the machine they were made on."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_config(run: Run, data: str, epochs: int) -> None:
    """A run directory left by other settings must not be continued or counted as this run."""
    path = run.dir / "config.yaml"
    if not path.is_file():
        return
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    want = {"model": MODEL, "seed": run.seed, "epochs": epochs, "data": data,
            "model_kwargs": {"reuse": run.reuse, "csla": run.csla}}
    have = {k: cfg.get(k) for k in want}
    if have != want:
        raise SystemExit(f"{run.dir} holds a run of other settings ({have}, wanted {want}); "
                         "use another --out-dir")


def is_finished(run_dir: Path, epochs: int) -> bool:
    history = read_history(run_dir)
    return len(history) >= epochs and history[-1].get("epoch") == epochs


def add_wall(run_dir: Path, seconds: float) -> None:
    from vizoo.io import write_json_atomic

    path = run_dir / "ablation_wall.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"wall_s": 0.0, "launches": 0}
    write_json_atomic(path, {"wall_s": round(saved["wall_s"] + seconds, 3), "launches": saved["launches"] + 1})


class Launcher:
    """Starts runs as subprocesses (own sessions, so a terminal's Ctrl-C reaches only this script,
    which forwards exactly one SIGINT: the engine takes a second one as "stop at once")."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def run(self, run: Run, cmd: list[str]) -> Run:
        run.dir.mkdir(parents=True, exist_ok=True)
        with open(run.dir / "train.log", "a") as log:
            with self.lock:
                if self.stopping:
                    run.status = "stopped"
                    return run
                log.write(f"\n$ OMP_NUM_THREADS={self.env['OMP_NUM_THREADS']} {shlex.join(cmd)}\n")
                log.flush()
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
                self.procs[run.label] = proc
            run.returncode = proc.wait()
            add_wall(run.dir, time.perf_counter() - t0)
            with self.lock:
                self.procs.pop(run.label, None)
        run.status = {0: "done", 130: "stopped"}.get(run.returncode, "failed")
        return run

    def stop_all(self, timeout_s: float = 300.0) -> None:
        """SIGINT to each run once (it checkpoints at its next step), then wait; SIGTERM if it hangs."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs.values())
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_all(runs: list[Run], data: str, epochs: int, args: argparse.Namespace) -> bool:
    """Train every run not yet finished; False if stopped by Ctrl-C / SIGTERM."""
    from tqdm.auto import tqdm

    todo: list[tuple[Run, list[str]]] = []
    for run in runs:
        check_config(run, data, epochs)
        if is_finished(run.dir, epochs):
            if not args.resume:
                raise SystemExit(f"{run.dir} already holds a finished run; add --resume to reuse it, "
                                 "or use another --out-dir")
            run.status = "skipped"
            continue
        started = (run.dir / "last_state.pt").exists() or (run.dir / "config.yaml").exists()
        if started and not args.resume:
            raise SystemExit(f"{run.dir} already holds a run; add --resume to continue it, or use another --out-dir")
        # --resume with nothing saved yet: the engine says so and starts from scratch
        todo.append((run, run.command(data, epochs, args, resume=args.resume and started)))
    if args.dry_run:
        for run, cmd in todo:
            print(f"OMP_NUM_THREADS={args.threads} {shlex.join(cmd)}")
        return True
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1")
    launcher = Launcher(env)
    skipped = len(runs) - len(todo)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background (`... &` from a script ignores SIGINT): the runs would inherit
        # the ignore and the engine could not be stopped cleanly; a handled signal resets on exec
        signal.signal(signal.SIGINT, signal.default_int_handler)
    bar = tqdm(total=len(runs), initial=skipped, desc="ablation runs", unit="run", dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        futures = [pool.submit(launcher.run, run, cmd) for run, cmd in todo]
        for fut in as_completed(futures):
            run = fut.result()
            history = read_history(run.dir)
            ap = (f"final AP {100 * history[-1]['val_AP']:.2f}" if history and "val_AP" in history[-1]
                  else "no epoch")
            bar.write(f"{run.label} ({run.name}): {run.status} (exit {run.returncode}), {ap}; "
                      f"log {run.dir / 'train.log'}")
            bar.update(1)
    except KeyboardInterrupt:
        bar.write("stopping: each run checkpoints at its next step ...")
        launcher.stop_all()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        again = [sys.executable, *sys.argv, *([] if args.resume else ["--resume"])]
        print("stopped; continue with:\n  " + shlex.join(again), file=sys.stderr)
        return False
    finally:
        signal.signal(signal.SIGTERM, previous)
    pool.shutdown(wait=True)
    bar.close()
    return True


# ----------------------------------------------------------------------------- aggregation
def run_summary(run: Run, epochs: int) -> dict[str, Any]:
    history = read_history(run.dir)
    row: dict[str, Any] = {"variant": run.variant, "name": run.name, "reuse": run.reuse, "csla": run.csla,
                           "seed": run.seed, "run_dir": _shown(run.dir), "epochs_done": len(history),
                           "finished": bool(history) and history[-1].get("epoch") == epochs}
    if not history:
        return row
    last = history[-1]
    for m in METRICS:
        v = last.get(f"val_{m}")
        row[m] = None if v is None else 100.0 * v
    aps = [(r.get("val_AP"), r["epoch"]) for r in history if r.get("val_AP") is not None]
    if aps:
        best, at = max(aps)
        row["best_AP"], row["best_epoch"] = 100.0 * best, at
    stages = sorted(int(k[len("train_pos_per_gt_s"):]) for k in last if k.startswith("train_pos_per_gt_s"))
    for s in stages:
        row[f"pos_per_gt_s{s}"] = last[f"train_pos_per_gt_s{s}"]
    row["updates"] = last.get("updates")
    row["epoch_seconds"] = round(sum(r.get("seconds") or 0.0 for r in history), 1)  # train + val, per epoch
    row["train_seconds"] = sum(r.get("train_seconds") or 0.0 for r in history)
    row["eval_seconds"] = row["epoch_seconds"] - row["train_seconds"]
    wall = run.dir / "ablation_wall.json"
    row["wall_s"] = json.loads(wall.read_text())["wall_s"] if wall.is_file() else None
    return row


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    stage_keys = sorted({k for r in rows for k in r if k.startswith("pos_per_gt_s")}, key=lambda k: int(k[12:]))
    out = []
    for v in variants:
        done = [r for r in rows if r["variant"] == v and r.get("finished")]
        name, reuse, csla = VARIANTS[v]
        s: dict[str, Any] = {"variant": v, "name": name, "reuse": reuse, "csla": csla, "n_seeds": len(done),
                             "seeds": " ".join(str(r["seed"]) for r in done)}
        for key in (*METRICS, "best_AP", *stage_keys, "wall_s"):
            s[f"{key}_mean"], s[f"{key}_std"] = mean_std([r.get(key) for r in done])
        out.append(s)
    return out


def fmt(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def claim(summary: list[dict[str, Any]], rows: list[dict[str, Any]], better: str, base: str, text: str) -> str:
    by = {s["variant"]: s for s in summary}
    if better not in by or base not in by or not by[better]["n_seeds"] or not by[base]["n_seeds"]:
        return f"- {text}: not measured (variants {better} and {base} both need finished runs)."
    b, a = by[better], by[base]
    diff = b["AP_mean"] - a["AP_mean"]
    verdict = ("holds as measured" if diff > 0 else
               "does NOT hold as measured" + (" (equal means)" if diff == 0 else ""))
    line = (f"- {text}: {verdict}: mean final AP {b['AP_mean']:.2f} ({better}) vs {a['AP_mean']:.2f} ({base}), "
            f"difference {diff:+.2f} points over {b['n_seeds']} / {a['n_seeds']} seed(s)")
    if b["AP_std"] is None or a["AP_std"] is None:
        return line + "; one seed, so the difference is not compared with seed-to-seed spread."
    largest = max(a["AP_std"], b["AP_std"])
    spread = ("exceeds" if abs(diff) > largest else "does not exceed")
    # per seed: same seed = same data order and flips, so the paired differences are the sharper view
    pairs = {r["seed"]: r["AP"] for r in rows if r["variant"] == base and r.get("finished")}
    paired = [r["AP"] - pairs[r["seed"]] for r in rows
              if r["variant"] == better and r.get("finished") and r["seed"] in pairs]
    wins = sum(d > 0 for d in paired)
    return (line + f"; the difference {spread} the larger seed std ({largest:.2f}; {base} {a['AP_std']:.2f}, "
            f"{better} {b['AP_std']:.2f}). Same-seed pairs: {better} higher in {wins} of {len(paired)} "
            f"(differences {', '.join(f'{d:+.2f}' for d in paired)}).")


def markdown(rows: list[dict[str, Any]], summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    stage_keys = sorted({k for r in rows for k in r if k.startswith("pos_per_gt_s")}, key=lambda k: int(k[12:]))
    stages = [k[len("pos_per_gt_"):] for k in stage_keys]
    head = (["variant", "reuse", "CSLA", "seeds", "AP", "AP50", "AP75", "best-epoch AP"]
            + [f"pos/GT {s}" for s in stages] + ["wall/run (s)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [f"{s['variant']} {s['name']}", "✓" if s["reuse"] else "", "✓" if s["csla"] else "",
                 str(s["n_seeds"])]
        cells += [fmt(s[f"{m}_mean"], s[f"{m}_std"]) for m in (*METRICS, "best_AP")]
        cells += [fmt(s[f"{k}_mean"], s[f"{k}_std"]) for k in stage_keys]
        cells.append(fmt(s["wall_s_mean"], s["wall_s_std"], 0))
        lines.append("| " + " | ".join(cells) + " |")
    per_run_head = ["run", "AP", "AP50", "AP75", "best AP (epoch)"] + [f"pos/GT {s}" for s in stages] + [
        "iters", "train s", "val s", "wall s", "status"]
    per_run = ["| " + " | ".join(per_run_head) + " |", "|" + "---|" * len(per_run_head)]
    for r in rows:
        n = lambda k, d=2: "n/a" if r.get(k) is None else f"{r[k]:.{d}f}"  # noqa: E731
        best = "n/a" if r.get("best_AP") is None else f"{r['best_AP']:.2f} ({r['best_epoch']})"
        status = "finished" if r.get("finished") else f"{r['epochs_done']}/{meta['epochs']} epochs"
        per_run.append("| " + " | ".join([f"{r['variant']}_seed{r['seed']}", n("AP"), n("AP50"), n("AP75"), best,
                                          *[n(k) for k in stage_keys], str(r.get("updates", "n/a")),
                                          n("train_seconds", 0), n("eval_seconds", 0), n("wall_s", 0), status]) + " |")
    claims = [claim(summary, rows, "D", "A", "full (D) > baseline (A) in mean AP"),
              claim(summary, rows, "B", "A", "CSLA (B) > baseline (A) in mean AP")]
    standard = meta["num_train"] == 3000 and meta["num_val"] == 400
    return "\n".join([
        "# StageInteractor ablation in miniature (stageinteractor_tiny on the bundled shapes)", "",
        f"Date: {meta['date']}. Machine: {meta['machine']}; torch {meta['torch']}; vizoo commit {meta['commit']}.",
        f"Command: `{meta['command']}`", "",
        f"Each run: `vizoo train {MODEL} --data {'shapes' if standard else '<generated subset>'} --model-kwargs "
        f"reuse=.. csla=.. --seed S --epochs {meta['epochs']}` with the detection recipe's defaults (batch "
        f"{meta['batch_size']}), {meta['epochs']} epoch(s) x {meta['iters_per_epoch']} = {meta['iters']} iterations "
        f"on {meta['num_train']} training images, scored on {meta['num_val']} val images"
        + ("" if standard else " (NOT the standard 3000/400 split: a smoke-test size)") + "; "
        f"{meta['threads']} torch thread(s) per run, {meta['jobs']} run(s) at a time.", "",
        "AP, AP50, AP75: COCO box AP of the final epoch's weights, in points (x100), mean ± sample std over "
        "seeds; best-epoch AP: the highest per-epoch val AP. pos/GT sN: classification positives per "
        "ground-truth box at decoder stage N, averaged over the last training epoch (without CSLA exactly "
        "1.00, the stage's own one-to-one matches; with CSLA the matches of several stages, kept only where "
        "the stage's own box overlaps the GT with IoU >= 0.5, so it is 0 while boxes are still coarse). "
        "Wall/run: the whole process (start-up, data, training, per-epoch and final evaluation).", "",
        *lines, "", "## Claims checked (final-epoch AP)", "", *claims, "",
        "Same seed across variants = same training images order and flips. Initial weights differ "
        "between decoders of different structure (reuse adds adapter layers, so the random stream "
        "is consumed differently); CSLA changes only the loss, so A/B (and C/D) start from identical weights.",
        "", "## Runs", "", *per_run, ""])


def write_results(rows: list[dict[str, Any]], summary: list[dict[str, Any]], meta: dict[str, Any],
                  folder: Path) -> str:
    from vizoo.io import write_json_atomic, write_text_atomic

    text = markdown(rows, summary, meta)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / f"{STEM}.md", text)
    buf = io.StringIO()
    fields = list(dict.fromkeys(["variant", "name", "reuse", "csla", "n_seeds", "seeds",
                                 *[k for s in summary for k in s]]))
    writer = csv.DictWriter(buf, fieldnames=[*fields, "epochs", "iters", "num_train", "num_val", "date"])
    writer.writeheader()
    for s in summary:
        writer.writerow({**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()},
                         **{k: meta[k] for k in ("epochs", "iters", "num_train", "num_val", "date")}})
    write_text_atomic(folder / f"{STEM}.csv", buf.getvalue())
    write_json_atomic(folder / f"{STEM}.json", {"meta": meta, "summary": summary, "runs": rows})
    return text


def estimate_standard(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str | None:
    """Wall time of one standard run (1,500 iterations, 4 evaluations of 400 images + the final
    one), scaled from these runs' per-iteration and per-val-image times plus their fixed cost."""
    done = [r for r in rows if r.get("finished") and r.get("wall_s") and r.get("updates")]
    if not done:
        return None
    per_iter = statistics.fmean(r["train_seconds"] / r["updates"] for r in done)
    per_img = statistics.fmean(r["eval_seconds"] / (meta["epochs"] * meta["num_val"]) for r in done)
    # what the epochs do not contain: start-up, data loading, the final evaluation of the best weights
    fixed = statistics.fmean(max(0.0, r["wall_s"] - r["epoch_seconds"] - per_img * meta["num_val"]) for r in done)
    std_iters, std_epochs, std_val = 4 * (3000 // meta["batch_size"]), 4, 400
    est = per_iter * std_iters + per_img * std_val * (std_epochs + 1) + fixed
    return (f"estimated standard run ({std_iters} iterations, {std_epochs} x {std_val} val images + final eval) "
            f"at {meta['threads']} thread(s), with {meta['jobs']} job(s) sharing this machine as now: "
            f"~{est / 60:.0f} min ({per_iter * 1e3:.0f} ms/iteration, {per_img * 1e3:.1f} ms/val image, "
            f"{fixed:.0f} s fixed)")


# ----------------------------------------------------------------------------- main
def cpu_name() -> str:
    """platform.processor() is empty on many Linux systems: the CPU model from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    epochs, per_epoch, iters = resolve_length(args)
    data, data_root = prepare_data(args)
    group = Path(args.out_dir).expanduser().resolve() / f"e{epochs}-n{args.num_train}-v{args.num_val}"
    runs = [Run(v, s, group / f"{v}_seed{s}") for v in args.variants for s in args.seeds]
    if args.iters is not None and iters != args.iters:
        print(f"--iters {args.iters}: {epochs} epoch(s) x {per_epoch} iterations = {iters} iterations "
              "(the engine schedules whole epochs)")
    print(f"{len(runs)} run(s) of {MODEL}: {epochs} epoch(s) x {per_epoch} = {iters} iterations each; "
          f"data {data_root}; runs in {group}; {args.jobs} at a time, {args.threads} thread(s) each")
    if not run_all(runs, data, epochs, args):
        return 130  # stopped: no results written, so a partial ablation never replaces a whole one
    if args.dry_run:
        return 0

    import torch

    rows = [run_summary(r, epochs) for r in runs]
    for r, run in zip(rows, runs):
        r["status"] = run.status
    summary = summarise(rows, args.variants)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    meta = {"date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": f"{platform.machine()} {platform.processor() or cpu_name()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "commit": commit,
            "command": shlex.join(["python", *[os.path.relpath(sys.argv[0], REPO) if i == 0 else a
                                               for i, a in enumerate(sys.argv)]]),
            "epochs": epochs, "iters_per_epoch": per_epoch, "iters": iters, "batch_size": batch_size(),
            "num_train": args.num_train, "num_val": args.num_val, "threads": args.threads, "jobs": args.jobs,
            "data": data, "runs_dir": _shown(group)}
    text = write_results(rows, summary, meta, Path(args.results).expanduser())
    print(text)
    estimate = estimate_standard(rows, meta)
    if estimate and (args.num_train, args.num_val, epochs) != (3000, 400, 4):
        print(estimate)
    print(f"written: {Path(args.results) / (STEM + '.md')}, .csv, .json")
    failed = [r for r in runs if r.status == "failed"]
    for r in failed:
        print(f"FAILED: {r.label} (exit {r.returncode}); see {r.dir / 'train.log'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

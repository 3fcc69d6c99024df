"""A run killed with SIGKILL at an arbitrary step and resumed ends bit-identical to an unbroken run.

The killed run is a real `vizoo train` process; the recipe exercises every piece of state a
resume must restore: dropout (torch RNG), seeded augmentation, EMA, gradient accumulation,
the per-update LR schedule and a mid-epoch position.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import test_engine_tinynet  # noqa: F401  (registers engine_tinynet in this process)
from vizoo.engine import train
from vizoo.engine.metrics import read_jsonl

TESTS = Path(__file__).resolve().parent
RECIPE = dict(model="engine_tinynet", data="digits", img_size=8, epochs=2, batch_size=32, lr=1e-2,
              model_kwargs={"drop_rate": 0.2}, augment=True, aug_scale=[0.7, 1.0], hflip=0.0, color_jitter=0.0,
              ema=True, ema_decay=0.9, accum_steps=2, checkpoint_every=2, progress="off", plots=False)
CLI = ["engine_tinynet", "--imports", "test_engine_tinynet", "--data", "digits", "--img-size", "8",
       "--epochs", "2", "--batch-size", "32", "--lr", "1e-2", "--model-kwargs", "drop_rate=0.2", "--augment",
       "--aug-scale", "0.7", "1.0", "--hflip", "0", "--color-jitter", "0", "--ema", "--ema-decay", "0.9",
       "--accum-steps", "2", "--checkpoint-every", "2", "--progress", "off", "--no-plots"]


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _kill_after_first_checkpoint(proc: subprocess.Popen, state: Path, outcome: dict) -> None:
    """Wait for the first checkpoint, then SIGKILL at a random moment shortly after it."""
    deadline = time.time() + 300
    while not state.exists():
        if proc.poll() is not None or time.time() > deadline:
            outcome["error"] = f"training process ended or stalled before a checkpoint (rc {proc.poll()})"
            proc.kill()
            return
        time.sleep(0.005)
    time.sleep(random.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    outcome["rc"] = proc.wait()


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(torch.get_num_threads()))  # same threads: same float reductions
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vizoo", "train", *CLI, "--out", str(out)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    outcome: dict = {}
    killer = threading.Thread(target=_kill_after_first_checkpoint, args=(proc, out / "last_state.pt", outcome))
    killer.start()
    unbroken = train(out=str(tmp_path / "unbroken"), **RECIPE)  # meanwhile, the reference run
    killer.join()
    log.close()
    assert "error" not in outcome, outcome.get("error", "") + (tmp_path / "killed.log").read_text()[-2000:]
    assert outcome["rc"] == -signal.SIGKILL, "the run finished before it could be killed"
    state = out / "last_state.pt"
    killed_at = torch.load(state, weights_only=True)
    total_updates = unbroken.history[-1]["updates"]
    assert 0 < killed_at["updates"] < total_updates, "the kill must land inside the run"

    resumed = train(out=str(out), resume="auto", **RECIPE)

    assert _same(unbroken.last_path, resumed.last_path)
    assert _same(unbroken.run_dir / "last_ema.safetensors", out / "last_ema.safetensors")
    assert _same(unbroken.best_path, resumed.best_path)
    keys = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "updates")
    a, b = read_jsonl(unbroken.run_dir / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]

"""The same command under torchrun (2 processes, gloo, CPU) trains what one process trains.

With ``--batch-size`` meaning the global batch, process r takes every 2nd sample of each global
batch and DDP averages the gradients, so a model without batch statistics follows the
single-process trajectory up to float summation order; metrics are summed exactly across shards.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import test_engine_tinynet  # noqa: F401
from vizoo.engine import train
from vizoo.engine.metrics import read_jsonl

TESTS = Path(__file__).resolve().parent


def test_torchrun_two_processes_match_one_process(tmp_path):
    common = ["--data", "digits", "--img-size", "8", "--epochs", "1", "--batch-size", "32", "--lr", "1e-2",
              "--warmup-epochs", "0", "--progress", "off", "--no-plots", "--recipe", "none"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vizoo", "train", "engine_tinynet", "--imports", "test_engine_tinynet",
           "--model-kwargs", "use_bn=false", *common, "--out", str(tmp_path / "ddp")]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the workers
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    # the single-process reference runs while the two workers start up
    single = train(model="engine_tinynet", data="digits", img_size=8, epochs=1, batch_size=32, lr=1e-2,
                   warmup_epochs=0, progress="off", plots=False, model_kwargs={"use_bn": False}, recipe="none",
                   out=str(tmp_path / "one"))
    proc.wait(timeout=300)
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "2 process(es)" in output
    assert output.count("run directory:") == 1  # only rank 0 reports and writes
    a, b = load_file(single.last_path), load_file(tmp_path / "ddp" / "last.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-3, f"2-process weights drift from 1-process weights by {worst}"
    r1, r2 = read_jsonl(single.run_dir / "metrics.jsonl")[-1], read_jsonl(tmp_path / "ddp" / "metrics.jsonl")[-1]
    assert r1["updates"] == r2["updates"]
    assert abs(r1["val_top1"] - r2["val_top1"]) <= 1.0 and abs(r1["train_loss"] - r2["train_loss"]) < 1e-3
    report = __import__("json").loads((tmp_path / "ddp" / "confusion_matrix.json").read_text())
    assert report["num_samples"] == 359 and sum(map(sum, report["confusion_matrix"])) == 359
    assert torch.isfinite(torch.tensor(r2["val_loss"]))

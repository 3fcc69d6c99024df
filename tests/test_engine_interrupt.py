"""Ctrl-C keeps the run: `vizoo train` stopped by SIGINT writes a resumable checkpoint at a step
boundary, prints one line with the command that continues it, exits with 130 and no traceback;
that command then ends bit-identical to an unbroken run (the pattern of test_engine_resume.py).

The CLI run gets its SIGINT the way a terminal sends it: to its whole process group, DataLoader
worker included. Stopping inside validation is checked in-process, through the Python API.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_engine_tinynet  # noqa: F401  (registers engine_tinynet in this process)
from vizoo.engine import TrainConfig, Trainer, train
from vizoo.engine.metrics import read_jsonl
from vizoo.engine.trainer import TrainingInterrupted, _InterruptWatch
from vizoo.hub import read_sidecar

TESTS = Path(__file__).resolve().parent
# Every piece of state a resume restores: dropout, seeded augmentation, EMA, accumulation, per-update LR.
RECIPE = dict(model="engine_tinynet", data="digits", img_size=8, epochs=2, batch_size=32, lr=1e-2,
              model_kwargs={"drop_rate": 0.2}, augment=True, aug_scale=[0.7, 1.0], hflip=0.0, color_jitter=0.0,
              ema=True, ema_decay=0.9, accum_steps=2, progress="off", plots=False)
# The same run from the command line; --checkpoint-every only tells the test that training has begun,
# and one DataLoader worker checks that a terminal's Ctrl-C, which reaches the worker too, is survived.
CLI = ["engine_tinynet", "--imports", "test_engine_tinynet", "--data", "digits", "--img-size", "8",
       "--epochs", "2", "--batch-size", "32", "--lr", "1e-2", "--model-kwargs", "drop_rate=0.2", "--augment",
       "--aug-scale", "0.7", "1.0", "--hflip", "0", "--color-jitter", "0", "--ema", "--ema-decay", "0.9",
       "--accum-steps", "2", "--checkpoint-every", "3", "--num-workers", "1", "--progress", "off", "--no-plots"]
FIRST_CHECKPOINT = 3  # optimizer steps


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _assert_same_run(reference: Path, run: Path) -> None:
    """Weights (last, EMA, best) bit-identical, and the same metric history."""
    for name in ("last.safetensors", "last_ema.safetensors", "best.safetensors"):
        assert _same(reference / name, run / name), f"{name} differs from the unbroken run"
    keys = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "updates")
    a, b = read_jsonl(reference / "metrics.jsonl"), read_jsonl(run / "metrics.jsonl")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS=str(torch.get_num_threads()))  # same threads: same float reductions


def _sigint_as_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    """`vizoo train` in its own process group, so that os.killpg reaches it like a terminal's Ctrl-C.
    A SIGINT this process ignores (background job of a non-interactive shell) would be inherited and
    respected by the trainer, so the child gets the default back then."""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen([sys.executable, "-m", "vizoo", "train", *args], env=_env(), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_sigint_as_default if ignored else None)


def _ctrl_c_after_first_checkpoint(proc: subprocess.Popen, state: Path, outcome: dict) -> None:
    """Wait until training is under way (its first checkpoint exists), then Ctrl-C the process group."""
    deadline = time.time() + 120
    while not state.exists():
        if proc.poll() is not None or time.time() > deadline:
            outcome["error"] = f"training ended or stalled before its first checkpoint (rc {proc.poll()})"
            proc.kill()
            return
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        outcome["rc"] = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        outcome["error"] = "the run did not stop within 120 s of Ctrl-C"
        proc.kill()


def test_ctrl_c_checkpoints_then_the_printed_command_resumes_bit_identically(tmp_path):
    out = tmp_path / "interrupted"
    log = tmp_path / "interrupted.log"
    proc = _launch([*CLI, "--out", str(out)], log)
    outcome: dict = {}
    watcher = threading.Thread(target=_ctrl_c_after_first_checkpoint, args=(proc, out / "last_state.pt", outcome))
    watcher.start()
    unbroken = train(out=str(tmp_path / "unbroken"), **RECIPE)  # meanwhile, the reference run
    watcher.join()
    text = log.read_text()
    assert "error" not in outcome, outcome.get("error", "") + text[-2000:]
    assert outcome["rc"] == 130, f"exit status {outcome['rc']} (0: it finished before Ctrl-C)\n{text[-2000:]}"
    assert "Traceback" not in text, text[-3000:]
    resume_lines = [line for line in text.splitlines() if "--resume" in line]
    assert len(resume_lines) == 1, text[-2000:]
    assert resume_lines[0].startswith("interrupted at epoch "), resume_lines[0]

    state = torch.load(out / "last_state.pt", weights_only=True)
    total_updates = unbroken.history[-1]["updates"]
    assert FIRST_CHECKPOINT < state["updates"] < total_updates, "the interrupt must write a new, mid-run checkpoint"
    if state["batch_in_epoch"]:  # (at an epoch's start the epoch's own checkpoint is the resume point)
        assert read_sidecar(out / "last.safetensors")["reason"].startswith("interrupted")
    assert f"step {state['updates'] - 22 * state['epoch']}/22" in resume_lines[0]  # 44 batches, 2 per step

    command = shlex.split(resume_lines[0].split("continue with: ", 1)[1])
    resumed = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    _assert_same_run(unbroken.run_dir, out)


class _CtrlCInFirstValidation(Trainer):
    """Sends this process SIGINT from inside the first validation batch (a forward hook on the
    evaluated model): a deterministic stop in the validation loop."""

    def setup(self) -> None:
        super().setup()
        self.sent = False
        self._eval_model().register_forward_hook(self._ctrl_c_once)

    def _ctrl_c_once(self, module: torch.nn.Module, args: object, output: object) -> None:
        if module.training or self.sent:
            return
        # Were fit() not handling SIGINT, the signal would stop pytest itself: fail instead.
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "fit() does not own SIGINT"
        self.sent = True
        signal.raise_signal(signal.SIGINT)


def test_ctrl_c_in_validation_keeps_the_epoch_and_redoes_validation_on_resume(tmp_path):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("this process does not use Python's default SIGINT handler")
    out = tmp_path / "interrupted"
    trainer = _CtrlCInFirstValidation(TrainConfig.from_dict(dict(RECIPE, out=str(out))))
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit()
    assert isinstance(stopped.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "fit() must restore the handler"
    stop = stopped.value
    assert (stop.epoch, stop.step, stop.steps, stop.updates) == (1, 22, 22, 22)
    assert str(out) in str(stop) and "resume" in str(stop)
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["updates"]) == (0, 44, 22)
    assert not (out / "metrics.jsonl").exists(), "the interrupted validation must not be recorded"

    unbroken = train(out=str(tmp_path / "unbroken"), **RECIPE)
    train(out=str(out), resume="auto", **RECIPE)
    _assert_same_run(unbroken.run_dir, out)


def test_second_ctrl_c_stops_at_once_and_the_handler_is_restored():
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        pytest.skip("this process does not use Python's default SIGINT handler")
    with _InterruptWatch(grace_s=60.0) as watch:  # torchrun's forwarded duplicate: one interrupt
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        assert watch.requested
    assert signal.getsignal(signal.SIGINT) is previous
    with pytest.raises(KeyboardInterrupt):
        with _InterruptWatch() as watch:
            signal.raise_signal(signal.SIGINT)
            assert watch.requested
            signal.raise_signal(signal.SIGINT)  # the user insists: KeyboardInterrupt now
            pytest.fail("a second Ctrl-C must raise at once")
    assert signal.getsignal(signal.SIGINT) is previous

"""The Trainer: one loop for every task, built from timm and torch parts.

    for epoch:                                   (seeded data order per epoch, resumable mid-epoch)
        for micro-batch:
            model.on_train_step(epochs elapsed)  (if the model defines it; EViT's keep rate)
            loss = task.train_step(model, batch) under autocast
            stop on a non-finite loss (nothing of that step is saved)
            backward (DDP syncs only on the last micro-batch of an accumulation group)
            every accum_steps: clip, optimizer.step, scheduler.step_update, EMA update,
                               checkpoint every N updates
        evaluate (sharded, reduced exactly), write last/best/state, metrics.jsonl, curves

Ctrl-C (SIGINT) during `Trainer.fit` only sets a flag (`_InterruptWatch`); the loop reads it at
step boundaries (after a whole optimizer step, never inside one), writes the same checkpoint
`--checkpoint-every` writes there, and raises `TrainingInterrupted` (a KeyboardInterrupt).

Parts reused, not rewritten: timm.optim.create_optimizer_v2, timm.scheduler.create_scheduler_v2
(stepped per update, so a mid-epoch resume gets exactly the same learning rate),
timm.utils.ModelEmaV3, timm.utils.dispatch_clip_grad, timm losses and Mixup (in the task),
torch.amp autocast and GradScaler, DistributedDataParallel.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .checkpoint import (RunPaths, capture_rng, load_state, plain_scheduler_state, restore_rng, save_state,
                         seed_everything)
from .config import TrainConfig
from .distributed import (DistEnv, all_gather_objects, all_reduce_sum, any_true, barrier, init_distributed,
                          shutdown, wrap_ddp)
from .freeze import apply_freeze, frozen_norm_layers
from .metrics import write_jsonl
from .tasks import TaskAdapter, TaskData, create_task, resolved_img_size


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and the last good checkpoint is untouched."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped `Trainer.fit` at a step boundary, after a resumable checkpoint was written.

    A KeyboardInterrupt, so code that already stops on Ctrl-C keeps doing so; it carries where the
    run stopped so that `vizoo train` can print one line and exit with 130 instead of a traceback.
    ``epoch`` is 1-based (the epoch in progress), ``step`` counts optimizer steps done in it.
    """

    def __init__(self, run_dir: Path, state_path: Path, epoch: int, epochs: int, step: int, steps: int,
                 updates: int):
        self.run_dir, self.state_path = Path(run_dir), Path(state_path)
        self.epoch, self.epochs, self.step, self.steps, self.updates = epoch, epochs, step, steps, updates
        super().__init__(f"{self.where}: checkpoint saved in {self.run_dir}; continue with "
                         f"train(..., out={str(self.run_dir)!r}, resume='auto') or "
                         f"`vizoo train --resume --out {self.run_dir}`")

    @property
    def where(self) -> str:
        return f"interrupted at epoch {self.epoch}/{self.epochs}, step {self.step}/{self.steps}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (e.g. out of a worker process) despite __init__
        return type(self), (self.run_dir, self.state_path, self.epoch, self.epochs, self.step, self.steps,
                            self.updates)


class _StopRequested(Exception):
    """Internal: unwinds from a stop point to `Trainer.fit`, which checkpoints and raises
    `TrainingInterrupted` (an exception, so no loop needs a "stopping" return path)."""


class _InterruptWatch:
    """While entered, SIGINT sets ``requested`` instead of raising KeyboardInterrupt.

    Python raises KeyboardInterrupt wherever the main thread happens to be, usually inside
    autograd or between optimizer.step and the EMA/scheduler updates, so a run stopped that way
    cannot be checkpointed consistently. The flag is read at step boundaries instead. A second
    SIGINT restores the previous handler and re-delivers the signal (default: KeyboardInterrupt at
    once), so a step that hangs can still be stopped. Repeats within ``grace_s`` of the first count
    as the same interrupt (torchrun forwards the Ctrl-C that the terminal already sent each worker).
    Only the main thread can own signal handlers, and a SIGINT the parent process ignores
    (background jobs of a non-interactive shell) stays ignored: then the watch does nothing.
    """

    def __init__(self, grace_s: float = 0.0):
        self.requested = False
        self._grace_s = grace_s
        self._first_at = 0.0
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "_InterruptWatch":
        if threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):  # None: a handler not installed from Python; leave it
            return self
        self._previous = previous
        signal.signal(signal.SIGINT, self._on_sigint)
        self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    @property
    def stop(self) -> bool:
        """Ctrl-C arrived while the watch is on; False once it is off, so that evaluations run
        after `fit` returned or raised are not cut short by an old Ctrl-C."""
        return self.requested and self._installed

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self._first_at = True, now
            return
        if now - self._first_at < self._grace_s:
            return
        self._restore()
        signal.raise_signal(signum)  # the previous handler runs now (KeyboardInterrupt, or the default kill)


def _duplicate_sigint_grace() -> float:
    """Under torchrun a Ctrl-C reaches each worker twice: from the terminal and forwarded by the
    launcher moments later. Those must not count as the second, "stop at once" Ctrl-C."""
    return 1.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0


def _worker_ignores_sigint(worker_id: int, then: Callable[[int], None] | None = None) -> None:
    """DataLoader worker start: a terminal's Ctrl-C reaches the workers too, and torch's worker
    exits on it, so the main process, which is finishing its step to checkpoint, would die on
    "worker exited unexpectedly". Workers leave SIGINT to the main process; they still stop with
    it (the loader shuts them down, and they exit when the main process is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def _leave_sigint_to_main_process(loader: Any) -> None:
    if loader.num_workers > 0:
        loader.worker_init_fn = functools.partial(_worker_ignores_sigint, then=loader.worker_init_fn)


@dataclass
class TrainResult:
    """What `train` returns: where the files are and how the run ended."""

    run_dir: Path
    last_path: Path
    best_path: Path | None
    state_path: Path
    metrics: dict[str, Any]
    best_metric: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None


def _trajectory_keys() -> tuple[str, ...]:
    """Config keys that change the numbers of a run (a resumed run should not change them)."""
    skip = {"out", "resume", "progress", "plots", "num_workers", "checkpoint_every", "epochs", "verify_images", "imports",
            "eval_batch_size", "device"}
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in skip)


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data``; see the module docstring for the loop."""

    def __init__(self, cfg: TrainConfig | Mapping[str, Any], model: nn.Module | None = None):
        self.cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
        self.cfg.validate()
        self._given_model = model
        self.env: DistEnv | None = None
        self._interrupt = _InterruptWatch()  # replaced by an installed one for the duration of fit()
        self._rng_before_eval: dict[str, Any] | None = None
        self._saved_position: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ logging
    def log(self, msg: str) -> None:
        if self.env is None or self.env.is_main:
            print(msg, flush=True)

    def _show_progress(self) -> bool:
        if not self.env.is_main or self.cfg.progress == "off":
            return False
        return self.cfg.progress == "on" or sys.stderr.isatty()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        for module in cfg.imports:
            importlib.import_module(module)
        self.env = env = init_distributed(cfg.device)
        self.device = env.device
        self._set_determinism(cfg.deterministic)
        self.paths = RunPaths(cfg.run_dir)
        self.resume_from = self._resolve_resume()

        seed_everything(cfg.seed)  # identical initial weights on every process
        self.task: TaskAdapter = create_task(cfg)
        self.data: TaskData = self.task.load_data(cfg)
        model = self._given_model or self.task.create_model(cfg, self.data)
        self.task.attach_transforms(cfg, self.data, model)
        if cfg.head_init_scale is not None:
            _scale_head(model, cfg.head_init_scale)
        self.img_size = resolved_img_size(cfg, model)
        n_train, n_total = apply_freeze(model, cfg.freeze, cfg.trainable)
        if env.distributed and cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.frozen_norms = frozen_norm_layers(model) if cfg.freeze_bn_stats else []
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        self.log(f"model {cfg.model}: {n_total / 1e6:.3f} M parameters, {n_train / 1e6:.3f} M trainable "
                 f"({100.0 * n_train / max(n_total, 1):.1f}%); input {tuple(model.pretrained_cfg['input_size'])}; "
                 f"{len(self.data.splits['train'])} train / {len(self.data.splits['val'])} val images; "
                 f"{env.world_size} process(es) on {self.device}")

        from timm.optim import create_optimizer_v2

        groups = self.task.param_groups(model)
        self.optimizer = create_optimizer_v2(groups if groups is not None else model, opt=cfg.opt, lr=cfg.lr,
                                             weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                                             layer_decay=cfg.layer_decay)
        self._build_loaders()
        self._build_scheduler()
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
        self.autocast, self.scaler = self._amp()
        self.train_model = wrap_ddp(model, env, self.task.ddp_find_unused_parameters)
        hook = getattr(model, "on_train_step", None)
        self.hook = hook if callable(hook) else None

        # counters and history (replaced by the state when resuming)
        self.epoch, self.batch_in_epoch, self.updates = 0, 0, 0
        self.history: list[dict[str, Any]] = []
        self.best_metric: float | None = None
        self.partial = {"loss_sum": 0.0, "samples": 0, "seconds": 0.0, "cpu_seconds": 0.0}
        self.last_saved_update: int | None = None
        if self.resume_from is not None:
            self._load_state(self.resume_from)
            self.last_saved_update = self.updates
            self._saved_position = self._position()
        else:
            seed_everything(cfg.seed + env.rank)  # per-process streams for dropout / mixup
            if env.is_main:
                self._write_config()

    def _set_determinism(self, on: bool) -> None:
        if on and self.device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(on, warn_only=True)

    def _resolve_resume(self) -> Path | None:
        cfg, paths = self.cfg, self.paths
        if cfg.resume in (None, "", False):
            if paths.state.exists():
                raise RuntimeError(f"{paths.root} already holds a run; add --resume to continue it, or choose "
                                   "another --out")
            return None
        path = paths.state if cfg.resume in ("auto", True, "true") else Path(cfg.resume)
        if path.is_dir():
            path = RunPaths(path).state
        if not path.exists():
            if cfg.resume in ("auto", True, "true"):
                self.log(f"nothing to resume in {paths.root} yet (no {path.name}); starting from scratch")
                return None
            raise FileNotFoundError(f"--resume {path}: no such training state")
        return path

    def _build_loaders(self) -> None:
        from vizoo.data.loaders import eval_loader, train_loader

        cfg, env = self.cfg, self.env
        pin = self.device.type == "cuda"
        self.train_loader = train_loader(self.data.splits["train"], cfg.batch_size, seed=cfg.seed, rank=env.rank,
                                         world_size=env.world_size, num_workers=cfg.num_workers,
                                         collate_fn=self.task.collate_fn, pin_memory=pin)
        self.val_loader = eval_loader(self.data.splits["val"], cfg.eval_batch_size or 2 * cfg.batch_size,
                                      rank=env.rank, world_size=env.world_size, num_workers=cfg.num_workers,
                                      collate_fn=self.task.collate_fn, pin_memory=pin)
        for loader in (self.train_loader, self.val_loader):
            _leave_sigint_to_main_process(loader)
        self.batches_per_epoch = len(self.train_loader.batch_sampler)
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / cfg.accum_steps)

    def _build_scheduler(self) -> None:
        from timm.scheduler import create_scheduler_v2

        cfg = self.cfg
        warmup = min(cfg.warmup_epochs, max(cfg.epochs - 1, 0))
        if cfg.sched == "none":
            self.scheduler = None
            return
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=warmup,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
            step_on_epochs=False, updates_per_epoch=self.updates_per_epoch)

    def _amp(self):
        cfg, dev = self.cfg, self.device
        if cfg.amp == "none":
            return contextlib.nullcontext, None
        if cfg.amp == "fp16" and dev.type != "cuda":
            raise ValueError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16")
        dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
        scaler = torch.amp.GradScaler(dev.type) if cfg.amp == "fp16" else None
        return (lambda: torch.autocast(device_type=dev.type, dtype=dtype)), scaler

    def _write_config(self) -> None:
        from vizoo.io import write_text_atomic
        import timm

        from vizoo import __version__

        resolved = self.cfg.replace(out=str(self.paths.root), resume=None, img_size=self.img_size)
        header = (f"# vizoo {__version__}, torch {torch.__version__}, timm {timm.__version__}; "
                  f"{self.env.world_size} process(es). Rerun: vizoo train --config {self.paths.config}\n")
        write_text_atomic(self.paths.config, header + resolved.to_yaml())

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        rngs = all_gather_objects(capture_rng(), self.env)
        partials = all_gather_objects(dict(self.partial), self.env)
        state = {
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "updates": self.updates,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": plain_scheduler_state(self.scheduler),
            "rng": rngs, "partial": partials, "history": list(self.history), "best_metric": self.best_metric,
            "world_size": self.env.world_size, "config": self.cfg.to_dict(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def _load_state(self, path: Path) -> None:
        state = load_state(path)
        old = state.get("config", {})
        changed = [k for k in _trajectory_keys() if k in old and old[k] != self.cfg.to_dict()[k]]
        if changed:
            warnings.warn(f"resuming {path} with changed settings {changed}: the run will not match an "
                          "uninterrupted one", stacklevel=2)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.updates = state["epoch"], state["batch_in_epoch"], state["updates"]
        self.history = list(state.get("history", []))
        self.best_metric = state.get("best_metric")
        rank = self.env.rank
        if state.get("world_size") == self.env.world_size:
            restore_rng(state["rng"][rank])
            self.partial = dict(state["partial"][rank])
        else:
            warnings.warn(f"{path} was written by {state.get('world_size')} process(es), this run has "
                          f"{self.env.world_size}: data order is kept, random streams are re-seeded", stacklevel=2)
            seed_everything(self.cfg.seed + rank + 7919 * self.updates)
            self.partial = {"loss_sum": 0.0, "samples": 0, "seconds": 0.0, "cpu_seconds": 0.0}
        self.log(f"resumed {path}: epoch {self.epoch + 1}, batch {self.batch_in_epoch}/{self.batches_per_epoch}, "
                 f"{self.updates} optimizer steps done")

    def _save_last(self, reason: str) -> None:
        """Weights (safetensors + sidecar) and the training state; rank 0 writes, all ranks agree."""
        from vizoo.hub import save_model

        state = self._state()  # collective: every rank takes part
        if self.env.is_main:
            extra = {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "updates": self.updates,
                     "reason": reason, "train_config": self.cfg.to_dict()}
            labels = self.task.checkpoint_labels
            save_model(self.model, self.paths.last, labels=labels, extra=extra)
            if self.ema is not None:
                save_model(self.ema.module, self.paths.last_ema, labels=labels, extra=extra)
            save_state(self.paths.state, state)
        self.last_saved_update = self.updates
        self._saved_position = self._position()
        barrier(self.env)

    def _position(self) -> tuple[int, int, int]:
        """Where the run is: a checkpoint written at the same position would be the same file."""
        return self.epoch, self.batch_in_epoch, self.updates

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        """Train to ``cfg.epochs``, then evaluate the best weights.

        Ctrl-C stops at the next step boundary: the current optimizer step (all its micro-batches,
        then EMA, scheduler and counters) completes, the checkpoint `--checkpoint-every` would write
        there is written (in validation: the one before it; validation reruns on resume), and
        `TrainingInterrupted` is raised. Under torchrun every process stops at the same step.
        """
        if self.env is None:
            self.setup()
        self._interrupt = _InterruptWatch(grace_s=_duplicate_sigint_grace())
        with self._interrupt:
            try:
                result = self._run_epochs()
            except _StopRequested:
                raise self._checkpoint_interrupted() from None
        shutdown(self.env)
        return result

    def _run_epochs(self) -> TrainResult:
        cfg = self.cfg
        while self.epoch < cfg.epochs:
            self._stop_point()  # e.g. Ctrl-C while the previous epoch wrote its files
            train_stats = self._train_one_epoch()
            self._stop_point()
            # Validation may draw random numbers; an interrupted one is redone from these streams.
            self._rng_before_eval = capture_rng()
            t_eval = time.perf_counter()
            val = self.evaluate_model(self._eval_model())
            record = {"epoch": self.epoch + 1, "train_loss": train_stats["loss"], "val_loss": val["loss"],
                      "val_top1": val.get("top1"), "val_top5": val.get("top5"), "lr": self._lr(),
                      "seconds": None, "train_seconds": round(train_stats["seconds"], 3),
                      "train_images_per_sec": round(train_stats["samples"] / max(train_stats["seconds"], 1e-9), 1),
                      # CPU time of this process: on a shared machine, what the epoch costs a free one
                      "train_cpu_seconds": round(train_stats["cpu_seconds"], 3), "updates": self.updates}
            # the task's other metrics (detection: AP, AP50, ...) and loss terms, by name
            record.update({f"val_{k}": v for k, v in val.items()
                           if k not in ("loss", "top1", "top5") and isinstance(v, (int, float))
                           and math.isfinite(v)})  # COCO's APl is NaN when no object is large
            record.update({f"train_{k}": v for k, v in train_stats.get("terms", {}).items()})
            if self.ema is not None:
                raw = self.evaluate_model(self.model)
                record.update({"val_top1_no_ema": raw.get("top1"), "val_loss_no_ema": raw["loss"]})
            record["seconds"] = round(train_stats["seconds"] + time.perf_counter() - t_eval, 3)
            self._stop_point()  # under torchrun validation is not cut short: all processes stop here
            self._end_epoch(record, val)
            self._rng_before_eval = None
        self._stop_point()
        return self._finish()

    # ------------------------------------------------------------------ Ctrl-C
    def _stop_requested(self) -> bool:
        """Whether any process got Ctrl-C; in DDP a collective, so all processes agree on the step."""
        return any_true(self._interrupt.stop, self.env)

    def _stop_point(self) -> None:
        if self._stop_requested():
            raise _StopRequested

    def _checkpoint_interrupted(self) -> TrainingInterrupted:
        """Write the resume point (unless the last checkpoint already is it) and say where it is."""
        if self._rng_before_eval is not None:
            restore_rng(self._rng_before_eval)
        if self._saved_position != self._position():
            self._save_last(f"interrupted at step {self.updates}")
        cfg, accum = self.cfg, self.cfg.accum_steps
        done = self.epoch >= cfg.epochs  # only the final evaluation was left
        epoch = cfg.epochs if done else self.epoch + 1
        step = self.updates_per_epoch if done else math.ceil(self.batch_in_epoch / accum)
        return TrainingInterrupted(self.paths.root, self.paths.state, epoch, cfg.epochs, step,
                                   self.updates_per_epoch, self.updates)

    def _train_one_epoch(self) -> dict[str, float]:
        cfg, env = self.cfg, self.env
        model, task = self.train_model, self.task
        start = self.batch_in_epoch
        self.train_loader.batch_sampler.set_epoch(self.epoch, start)
        dataset = self.train_loader.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.epoch)
        model.train(not cfg.train_in_eval_mode)
        for m in self.frozen_norms:
            m.eval()
        n = self.batches_per_epoch
        accum = cfg.accum_steps
        show = self._show_progress()
        from tqdm import tqdm

        bar = tqdm(total=n, initial=start, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not show, dynamic_ncols=True, leave=False)
        t_start, cpu_start = time.perf_counter(), time.process_time()
        seconds_before = self.partial["seconds"]
        cpu_before = self.partial.get("cpu_seconds", 0.0)
        i = start
        for i, batch in enumerate(self.train_loader, start=start):
            group_start = (i // accum) * accum
            group_size = min(accum, n - group_start)
            last_of_group = (i - group_start) == group_size - 1
            if self.hook is not None:
                self.hook(self.epoch + i / n)
            batch = task.to_device(batch, self.device, cfg.channels_last)
            sync = contextlib.nullcontext() if (last_of_group or not env.distributed) else model.no_sync()
            with sync:
                with self.autocast():
                    out = task.train_step(model, batch)
                loss_value = float(out.loss.detach())
                if any_true(not math.isfinite(loss_value), env):
                    self._non_finite(loss_value, i)
                loss = out.loss / group_size
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            self.partial["loss_sum"] += loss_value * out.num_samples
            self.partial["samples"] += out.num_samples
            for key, value in out.logs.items():  # the task's loss terms, averaged like the loss
                if key != "loss" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.partial[f"log_{key}"] = self.partial.get(f"log_{key}", 0.0) + value * out.num_samples
            self.batch_in_epoch = i + 1
            if last_of_group:
                self._optimizer_step()
                stop = i + 1 < n and self._stop_requested()  # at the epoch's end fit() checks
                if stop or (cfg.checkpoint_every and self.updates % cfg.checkpoint_every == 0 and i + 1 < n):
                    self.partial["seconds"] = seconds_before + time.perf_counter() - t_start
                    self.partial["cpu_seconds"] = cpu_before + time.process_time() - cpu_start
                    if stop:
                        bar.close()
                        raise _StopRequested  # fit() writes the checkpoint that the line below would
                    self._save_last(f"step {self.updates}")
            if show:
                bar.update(1)
                if i % 5 == 0 or i + 1 == n:
                    elapsed = seconds_before + time.perf_counter() - t_start
                    bar.set_postfix(loss=f"{self.partial['loss_sum'] / max(self.partial['samples'], 1):.4f}",
                                    lr=f"{self._lr():.2e}",
                                    img_s=f"{self.partial['samples'] * env.world_size / max(elapsed, 1e-9):.0f}",
                                    refresh=False)
        bar.close()
        seconds = seconds_before + time.perf_counter() - t_start
        self.partial["seconds"] = seconds  # kept by a checkpoint taken before validation
        self.partial["cpu_seconds"] = cpu_before + time.process_time() - cpu_start
        sums = torch.tensor([self.partial["loss_sum"], float(self.partial["samples"])], dtype=torch.float64)
        all_reduce_sum(sums, env)
        local = max(float(self.partial["samples"]), 1.0)  # terms: this process's average
        terms = {k[len("log_"):]: round(v / local, 6) for k, v in self.partial.items() if k.startswith("log_")}
        return {"loss": float(sums[0] / max(float(sums[1]), 1.0)), "samples": float(sums[1]), "seconds": seconds,
                "cpu_seconds": self.partial["cpu_seconds"], "terms": terms}

    def _optimizer_step(self) -> None:
        cfg = self.cfg
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.clip_grad:
            from timm.utils import dispatch_clip_grad

            dispatch_clip_grad([p for p in self.model.parameters() if p.requires_grad], cfg.clip_grad,
                               mode=cfg.clip_mode)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.updates)
        if self.ema is not None:
            self.ema.update(self.model, step=self.updates)

    def _non_finite(self, value: float, batch_index: int) -> None:
        where = (f"epoch {self.epoch + 1}, batch {batch_index + 1}/{self.batches_per_epoch} "
                 f"(after {self.updates} optimizer steps, lr {self._lr():.3g})")
        if self.last_saved_update is not None:
            kept = f"The last good checkpoint is intact: {self.paths.state} (step {self.last_saved_update})"
        else:
            kept = "No checkpoint had been written yet (nothing was saved from this run)"
        raise NonFiniteLossError(
            f"the loss became {value} at {where}; training stopped and this step was not saved. {kept}. "
            "Usual causes: a learning rate too high (lower --lr or add --warmup-epochs), no gradient "
            "clipping (--clip-grad 1.0), fp16 overflow (--amp bf16 or none), or broken input data.")

    def _lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @torch.no_grad()
    def evaluate_model(self, model: nn.Module, meter: Any = None) -> dict[str, Any]:
        """Sharded evaluation on the val split, reduced over processes (exact sums).

        Inside `fit`, a Ctrl-C ends it early in one process (nothing of it is kept: the checkpoint
        is the one before it). Not under torchrun: processes may hold different numbers of batches,
        so a per-batch agreement could deadlock; there `fit` stops right after the evaluation.
        """
        was_training = model.training
        model.eval()
        meter = meter if meter is not None else self.task.new_meter()
        try:
            for batch in self.val_loader:
                if self._interrupt.stop and not self.env.distributed:
                    raise _StopRequested
                batch = self.task.to_device(batch, self.device, self.cfg.channels_last)
                with self.autocast():
                    self.task.eval_step(model, batch, meter)
        finally:
            model.train(was_training)
        meter.reduce(self.env)
        self._last_meter = meter
        return meter.compute()

    def _end_epoch(self, record: dict[str, Any], val: dict[str, Any]) -> None:
        from vizoo.hub import save_model

        cfg, task = self.cfg, self.task
        metric = val.get(task.primary_metric)
        improved = metric is not None and (self.best_metric is None or (
            metric > self.best_metric if task.higher_is_better else metric < self.best_metric))
        if improved:
            self.best_metric = metric
            if self.env.is_main:
                save_model(self._eval_model(), self.paths.best, labels=task.checkpoint_labels,
                           extra={"epoch": self.epoch + 1, "metrics": record, "train_config": cfg.to_dict()})
        record["best"] = bool(improved)
        self.history.append(record)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.partial = {"loss_sum": 0.0, "samples": 0, "seconds": 0.0, "cpu_seconds": 0.0}
        self._save_last(f"epoch {self.epoch}")
        if self.env.is_main:
            write_jsonl(self.paths.metrics, self.history)
        if self.env.is_main and cfg.plots:
            try:
                from .plots import plot_training_curves

                plot_training_curves(self.history, self.paths.curves, title=f"{cfg.model} on {cfg.data}")
            except Exception as e:  # a figure must never stop a run
                warnings.warn(f"could not draw training curves: {e}", stacklevel=2)
        top = f" val_top1 {record['val_top1']:.2f}%" if record.get("val_top1") is not None else ""
        primary = task.primary_metric
        if primary not in ("top1", "loss") and isinstance(record.get(f"val_{primary}"), (int, float)):
            top = f" val_{primary} {record[f'val_{primary}']:.4g}"
        self.log(f"epoch {self.epoch}/{cfg.epochs}: train_loss {record['train_loss']:.4f} "
                 f"val_loss {record['val_loss']:.4f}{top} lr {record['lr']:.2e} "
                 f"({record['seconds']:.1f}s, {record['train_images_per_sec']:.0f} img/s){' *' if improved else ''}")

    def _finish(self) -> TrainResult:
        """Full evaluation of the best weights: per-class accuracy and the confusion matrix."""
        from vizoo.hub import read_checkpoint

        paths, report = self.paths, None
        barrier(self.env)
        if paths.best.exists():
            model = self._eval_model()
            current = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(read_checkpoint(paths.best))
            try:
                self.evaluate_model(model)
            finally:  # an interrupted evaluation must not leave the best weights in place of the last
                model.load_state_dict(current)
            report = self.task.final_report(self._last_meter)
        if report is not None and self.env.is_main:
            from vizoo.io import write_json_atomic

            write_json_atomic(paths.root / self.task.report_file, report)
            if self.cfg.plots and "confusion_matrix" in report:
                try:
                    from .plots import plot_confusion_matrix

                    plot_confusion_matrix(report["confusion_matrix"], report["labels"], paths.confusion_png,
                                          title=f"{self.cfg.model}: top-1 {report['top1']:.2f}%")
                except Exception as e:
                    warnings.warn(f"could not draw the confusion matrix: {e}", stacklevel=2)
        final = dict(self.history[-1]) if self.history else {}
        if self.best_metric is not None:
            final[f"best_{self.task.primary_metric}"] = self.best_metric
        self.log(f"done: {paths.root} (best {self.task.primary_metric} "  # top-k in %, others 4 digits
                 + ("n/a" if self.best_metric is None else f"{self.best_metric:.2f} %"
                    if self.task.primary_metric in ("top1", "top5") else f"{self.best_metric:.4g}") + ")")
        return TrainResult(run_dir=paths.root, last_path=paths.last,
                           best_path=paths.best if paths.best.exists() else None, state_path=paths.state,
                           metrics=final, best_metric=self.best_metric, history=list(self.history), eval=report)


@torch.no_grad()
def _scale_head(model: nn.Module, scale: float) -> None:
    """Scale the classifier's initial weights and zero its bias. timm's classifier init scales
    with 1/sqrt(num_classes), so with few classes the first logits are large (loss ~5 instead of
    ln 10 on 10 classes); zero or small heads start from uniform predictions."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module) or not hasattr(head, "weight"):
        raise ValueError("--head-init-scale needs a model with get_classifier() returning a layer with weights")
    head.weight.mul_(scale)
    if getattr(head, "bias", None) is not None:
        head.bias.zero_()


def train(cfg: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None, /, **kwargs: Any) -> TrainResult:
    """Train a model: ``train(TrainConfig(...))``, ``train({"model": ...})``, ``train("cfg.yaml")``
    or ``train(model="mobilenetv2_100_evos0", data="digits", epochs=10)``; keyword arguments
    override the config. Returns a `TrainResult` (run dir, last/best checkpoints, final metrics)."""
    if isinstance(cfg, TrainConfig):
        base = cfg.replace(**kwargs)
    elif cfg is None or isinstance(cfg, Mapping):
        base = TrainConfig.from_dict({**(cfg or {}), **kwargs})
    else:
        base = TrainConfig.from_yaml(cfg)
        if kwargs:
            base = TrainConfig.from_dict({**base.to_dict(), **kwargs})
    trainer = Trainer(base)
    try:
        return trainer.fit()
    except BaseException:
        if trainer.env is not None:
            shutdown(trainer.env)
        raise

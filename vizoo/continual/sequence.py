"""`run_sequence`: train a `ContinualModel` on a task sequence through the engine, one run per task.

For each task: ``add_task`` (fresh head, the anchor's kernels and norms), one `vizoo.engine.Trainer`
run of the ``continual`` adapter (the model's method decides what trains), the best-val weights
kept, the task's state saved alone (``task_state.safetensors``), then every task seen so far
evaluated on its test split: row j of the accuracy matrix. A finished task is recorded in
``task.json`` and skipped on resume; an interrupted one resumes inside its Trainer run.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .bank import ContinualModel

#: CLR's recipe (official main.py: Adam 1e-3, x0.1 every 20 of 60 epochs, batch 32, no augmentation,
#: lambda 1e-5 on the non-squared L2 norm of each trainable tensor, best-val weights) scaled to a
#: few epochs: Adam 3e-3 with one x0.1 step at 3/4 of the epochs. At 8 epochs the official
#: 1e-3 with steps at 1/3 and 2/3 leaves CLR's few parameters under-trained (measured on the
#: colours task: 65 % vs 85 %); every method gets the same recipe.
RECIPE: dict[str, Any] = dict(opt="adam", lr=3e-3, weight_decay=0.0, sched="step", decay_rate=0.1,
                              warmup_epochs=0, batch_size=32, eval_batch_size=128, param_norm_penalty=1e-5,
                              augment=False, smoothing=0.0, plots=False, progress="off", deterministic=False)


@dataclass
class SequenceResult:
    method: str
    seed: int
    tasks: list[str]
    accuracy: list[list[float | None]]          # accuracy[j][i]: task i's test top-1 (%) after training task j
    params_per_task: int                         # without the head
    params_per_task_with_head: list[int]
    backbone_params: int
    seconds: float
    task_seconds: list[float] = field(default_factory=list)

    @property
    def final(self) -> list[float]:
        return [float(v) for v in self.accuracy[-1]]

    @property
    def average_accuracy(self) -> float:
        return sum(self.final) / len(self.final)

    @property
    def forgetting(self) -> list[float]:
        """acc(task i after the last task) - acc(task i right after learning it); 0 = none."""
        return [self.accuracy[-1][i] - self.accuracy[i][i] for i in range(len(self.tasks))]

    @property
    def mean_forgetting(self) -> float:
        f = self.forgetting[:-1] or [0.0]
        return sum(f) / len(f)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(average_accuracy=self.average_accuracy, forgetting=self.forgetting,
                 mean_forgetting=self.mean_forgetting)
        return d


@torch.no_grad()
def task_logits(model: ContinualModel, task: str, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Logits of ``task`` on images ``x`` in [0, 1] (normalised with the model's mean/std)."""
    cfg = model.pretrained_cfg
    c = x.shape[1]
    mean = torch.tensor(list(cfg.get("mean", (0.0,) * c))[:c]).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.get("std", (1.0,) * c))[:c]).view(1, -1, 1, 1)
    was = model.training
    model.eval()
    model.set_task(task)
    out = torch.cat([model((x[i:i + batch] - mean) / std) for i in range(0, len(x), batch)])
    model.train(was)
    return out


def test_accuracy(model: ContinualModel, task: str, split: Any) -> float:
    x, y = split.test
    return float((task_logits(model, task, x).argmax(1) == y).float().mean()) * 100.0


def run_sequence(model: ContinualModel, tasks: Sequence[str], out: str | os.PathLike, *, epochs: int = 8,
                 seed: int = 0, img_size: int = 32, data_seed: int = 0, model_name: str = "",
                 overrides: dict[str, Any] | None = None, verbose: bool = False,
                 on_task: Callable[[int, str, list[float | None]], None] | None = None) -> SequenceResult:
    """Train ``model`` on ``tasks`` (names of `vizoo.data.continual`) in order; resumable in ``out``."""
    from vizoo.engine.continual import load_split
    from vizoo.engine.trainer import Trainer
    from vizoo.hub import read_checkpoint
    from vizoo.io import write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    accuracy: list[list[float | None]] = []
    heads: list[int] = []
    task_seconds: list[float] = []
    shared_trains = model.method.train_shared
    for j, task in enumerate(tasks):
        run_dir = out / f"{j:02d}_{task}"
        done = run_dir / "task.json"
        state_file = run_dir / "task_state.safetensors"
        split = load_split(task, img_size, data_seed)
        if done.is_file() and state_file.is_file():  # finished before: restore, do not retrain
            record = json.loads(done.read_text())
            model.load_task(state_file, name=task, check_backbone=not shared_trains)
            if shared_trains:
                model.load_state_dict(read_checkpoint(run_dir / "model_after_task.safetensors"))
            accuracy.append(record["accuracy_row"])
            heads.append(record["params_with_head"])
            task_seconds.append(record["seconds"])
            if on_task:
                on_task(j, task, accuracy[-1])
            continue
        t0 = time.perf_counter()
        if task in model.tasks:  # a run interrupted after add_task in this process
            model.remove_task(task)
        model.add_task(task, len(split.classes), labels=split.classes, seed=seed * 1000 + j)
        cfg = dict(RECIPE, model=model_name or model.pretrained_cfg.get("architecture") or "continual",
                   task="continual", data=f"continual:{task}", img_size=img_size, split_seed=data_seed,
                   epochs=epochs, decay_epochs=max(1, round(0.75 * epochs)), seed=seed, out=str(run_dir),
                   resume="auto")
        cfg.update(overrides or {})
        trainer = Trainer(cfg, model=model)
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with sink:
            result = trainer.fit()
        if result.best_path is not None:
            model.load_state_dict(read_checkpoint(result.best_path))
        model.save_task(task, state_file)
        if shared_trains:
            from vizoo.io import save_safetensors_atomic

            save_safetensors_atomic(model.state_dict(), run_dir / "model_after_task.safetensors")
        row: list[float | None] = [test_accuracy(model, tasks[i], load_split(tasks[i], img_size, data_seed))
                                   for i in range(j + 1)]
        model.set_task(task)
        seconds = time.perf_counter() - t0
        heads.append(model.parameters_per_task(include_head=True))
        write_json_atomic(done, {"task": task, "accuracy_row": row, "best_val_top1": result.best_metric,
                                 "params_with_head": heads[-1], "seconds": round(seconds, 2),
                                 "epochs": epochs})
        accuracy.append(row)
        task_seconds.append(seconds)
        if on_task:
            on_task(j, task, row)
    padded = [row + [None] * (len(tasks) - len(row)) for row in accuracy]
    return SequenceResult(method=model.method.name, seed=seed, tasks=list(tasks), accuracy=padded,
                          params_per_task=model.parameters_per_task(), params_per_task_with_head=heads,
                          backbone_params=model.backbone_parameters(),
                          seconds=time.perf_counter() - t_start, task_seconds=task_seconds)

"""The continual-learning methods the task bank runs: what each one reprograms, stores per task and trains.

CLR and CLR-Full are the paper's; the others are its baselines at equal epochs (specs: head
only, head + norm, per-task full finetuning as the upper bound, sequential finetuning of one
shared backbone with per-task heads, which shows forgetting).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    clr_mode: str | None      # "main" / "full": convs wrapped in CLR layers; None: none
    task_state: str           # what each task owns: "head", "norm" (+head), "clr" (+norm+head), "all"
    train_shared: bool        # the shared backbone trains too (sequential finetuning: it forgets)

    @property
    def zero_forgetting(self) -> bool:
        """Nothing a later task trains is read by an earlier one."""
        return not self.train_shared


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("head", "head only (linear probe)", None, "head", False),
    Method("head_norm", "head + norm layers", None, "norm", False),
    Method("clr", "CLR (3x3 reprogramming of non-1x1 convs) + norm + head", "main", "clr", False),
    Method("clr_full", "CLR-Full (every conv reprogrammed) + norm + head", "full", "clr", False),
    Method("finetune", "per-task full finetuning (upper bound, a whole model per task)", None, "all", False),
    Method("sequential", "sequential finetuning, one shared backbone, per-task heads", None, "head", True),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown continual method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]

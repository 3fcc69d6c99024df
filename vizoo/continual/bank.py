"""`ContinualModel`: one frozen, shared backbone and a bank of per-task states.

CLR (Ge et al., ICCV 2023) keeps the anchor network immutable and gives every task its own
reprogramming kernels, *every* norm layer's parameters and running statistics (easy to miss:
sharing BN statistics across tasks silently breaks zero forgetting) and a linear head. The task
is named at inference (the paper's task oracle). Switching tasks copies the task's tensors into
the live modules, so training one task cannot touch what another task reads: its logits stay
bit-identical. A task's state saves alone (safetensors, kilobytes), tied to its backbone by a
fingerprint of the shared weights.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from ..layers.clr import apply_clr, clr_layers
from .methods import Method, get_method

STATE_FORMAT = "vizoo-continual-task-1"


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm / GroupNorm / LayerNorm / InstanceNorm and the zoo's EvoNorm layers."""
    return (isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
            or "norm" in type(module).__name__.lower())


def norm_tensor_names(model: nn.Module, prefix: str = "") -> list[str]:
    """State-dict names of every norm layer's own parameters and buffers (statistics included)."""
    names = []
    for mname, m in model.named_modules():
        if is_norm_layer(m):
            own = [n for n, _ in m.named_parameters(recurse=False)] + [n for n, _ in m.named_buffers(recurse=False)]
            names += [f"{prefix}{mname}.{n}" if mname else f"{prefix}{n}" for n in own]
    return names


@dataclass
class TaskRecord:
    num_classes: int
    labels: list[str] | None
    state: dict[str, torch.Tensor] = field(default_factory=dict)


class ContinualModel(nn.Module):
    """A backbone (classifier removed), reprogrammed per ``method``, with one head per task.

    ``create_model("clr_resnet50")`` builds one; ``add_task(name, num_classes)`` then
    ``set_task(name)`` selects what ``forward`` computes. ``method``: a name of
    `vizoo.continual.METHODS` (``clr`` by default).
    """

    def __init__(self, backbone: nn.Module, method: str | Method = "clr", clr_kernel: int = 3):
        super().__init__()
        self.method = get_method(method) if isinstance(method, str) else method
        if not hasattr(backbone, "reset_classifier"):
            raise TypeError(f"{type(backbone).__name__} has no reset_classifier(); the backbone must be a "
                            "timm-style classifier (vizoo, timm or a model with get_classifier/reset_classifier)")
        backbone.reset_classifier(0)
        if self.method.clr_mode is not None:
            apply_clr(backbone, self.method.clr_mode, kernel_size=clr_kernel)
        self.backbone = backbone
        self.num_features = int(getattr(backbone, "num_features"))
        self.head = nn.Linear(self.num_features, 1)
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", {}) or {})
        self._tasks: dict[str, TaskRecord] = {}
        self._current: str | None = None
        self._anchor = {k: v.detach().clone() for k, v in self.state_dict().items()
                        if k in self.task_tensor_names() and not k.startswith("head.")}
        self._fingerprint: str | None = None
        self._update_requires_grad()

    # ---------------------------------------------------------------- what a task owns
    def task_tensor_names(self) -> list[str]:
        """State-dict names a task owns (the method decides): stored per task, swapped on set_task."""
        kind = self.method.task_state
        names = ["head.weight", "head.bias"]
        if kind == "all":
            return [k for k in self.state_dict() if not k.startswith("head.")] + names
        if kind in ("norm", "clr"):
            names += norm_tensor_names(self.backbone, "backbone.")
        if kind == "clr":
            names += [f"backbone.{n}.clr.weight" for n, _ in clr_layers(self.backbone)]
        return names

    def trainable_parameter_names(self) -> list[str]:
        """What trains on a task: the task's own parameters, or everything (sequential finetuning)."""
        params = [n for n, _ in self.named_parameters()]
        if self.method.train_shared:
            return params
        owned = set(self.task_tensor_names())
        return [n for n in params if n in owned]

    def parameters_per_task(self, include_head: bool = False) -> int:
        """Parameters a new task adds (CLR kernels + norm affines [+ head]); statistics are buffers."""
        owned = set(self.task_tensor_names())
        return sum(p.numel() for n, p in self.named_parameters()
                   if n in owned and (include_head or not n.startswith("head.")))

    def backbone_parameters(self) -> int:
        """Parameters of the backbone as built, without the task's reprogramming layers or head."""
        clr = {f"backbone.{n}.clr.weight" for n, _ in clr_layers(self.backbone)}
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith("backbone.") and n not in clr)

    def _update_requires_grad(self) -> None:
        train = set(self.trainable_parameter_names())
        for n, p in self.named_parameters():
            p.requires_grad_(n in train)

    # ---------------------------------------------------------------- tasks
    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def current_task(self) -> str | None:
        return self._current

    @property
    def num_classes(self) -> int:
        return self._tasks[self._current].num_classes if self._current else 0

    @property
    def labels(self) -> list[str] | None:
        return self._tasks[self._current].labels if self._current else None

    def _unknown(self, name: str) -> ValueError:
        have = ", ".join(repr(t) for t in self._tasks) or "none yet"
        return ValueError(f"unknown task {name!r}; this model has tasks: {have}. "
                          "Add it first with add_task(name, num_classes) or load_task(file)")

    def add_task(self, name: str, num_classes: int, labels: Sequence[str] | None = None,
                 seed: int | None = None, select: bool = True) -> None:
        """A new task starting from the anchor (identity CLR kernels, the backbone's norms) with a
        fresh head; ``seed`` makes the head's initial weights reproducible."""
        if not isinstance(name, str) or not name:
            raise ValueError("a task name must be a non-empty string")
        if name in self._tasks:
            raise ValueError(f"task {name!r} already exists; set_task({name!r}) selects it")
        if int(num_classes) < 1:
            raise ValueError(f"task {name!r} needs at least one class, got num_classes={num_classes}")
        if labels is not None and len(labels) != num_classes:
            raise ValueError(f"task {name!r}: {len(labels)} labels for {num_classes} classes")
        head = nn.Linear(self.num_features, int(num_classes))
        if seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
            bound = 1.0 / self.num_features ** 0.5  # nn.Linear's default init, from a private stream
            with torch.no_grad():
                head.weight.uniform_(-bound, bound, generator=gen)
                head.bias.uniform_(-bound, bound, generator=gen)
        state = {k: v.clone() for k, v in self._anchor.items()}
        state.update({"head.weight": head.weight.detach().clone(), "head.bias": head.bias.detach().clone()})
        self._tasks[name] = TaskRecord(int(num_classes), list(map(str, labels)) if labels is not None else None, state)
        if select or self._current is None:
            self.set_task(name)

    def set_task(self, name: str) -> "ContinualModel":
        """Make ``name`` the task ``forward`` computes (its kernels, norms and head go live)."""
        if name not in self._tasks:
            raise self._unknown(name)
        if name == self._current:
            return self
        if self._current is not None:
            self._tasks[self._current].state = self._live_state()
        self._load_live(self._tasks[name].state)
        self._current = name
        return self

    def remove_task(self, name: str) -> None:
        if name not in self._tasks:
            raise self._unknown(name)
        del self._tasks[name]
        if self._current == name:
            self._current = None

    def _live_state(self) -> dict[str, torch.Tensor]:
        sd = self.state_dict()
        return {k: sd[k].detach().clone() for k in self.task_tensor_names()}

    def _load_live(self, state: dict[str, torch.Tensor]) -> None:
        w = state["head.weight"]
        if tuple(self.head.weight.shape) != tuple(w.shape):
            self.head = nn.Linear(w.shape[1], w.shape[0]).to(self.head.weight.device)
            self._update_requires_grad()
        missing = [k for k in self.task_tensor_names() if k not in state]
        if missing:
            raise ValueError(f"task state lacks {missing[:4]} (it was made for another method or backbone)")
        with torch.no_grad():
            sd = self.state_dict()
            for k, v in state.items():
                sd[k].copy_(v)

    def task_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors task ``name`` owns (the current task's from the live modules)."""
        name = name or self._current
        if name is None:
            raise ValueError("no task selected; call set_task(name) first")
        if name not in self._tasks:
            raise self._unknown(name)
        if name == self._current:
            return self._live_state()
        return {k: v.clone() for k, v in self._tasks[name].state.items()}

    # ---------------------------------------------------------------- save / load
    def fingerprint(self) -> str:
        """SHA-256 (16 hex) of the shared, frozen weights a task state is only valid with."""
        if self._fingerprint is None:
            owned = set(self.task_tensor_names())
            h = hashlib.sha256()
            for k, v in self._anchor_shared_state(owned):
                h.update(k.encode())
                h.update(str(tuple(v.shape)).encode())
                h.update(v.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _anchor_shared_state(self, owned: set[str]) -> Iterable[tuple[str, torch.Tensor]]:
        if self.method.task_state == "all":  # every tensor is the task's: the anchor is what tasks start from
            return sorted(self._anchor.items())
        return sorted((k, v) for k, v in self.state_dict().items() if k not in owned)

    def save_task(self, name: str, path: str | os.PathLike) -> Path:
        """Write task ``name``'s own tensors (never the backbone) as safetensors, atomically."""
        from ..io import save_safetensors_atomic

        state = self.task_state_dict(name)
        rec = self._tasks[name]
        meta = {"format": STATE_FORMAT, "task": name, "num_classes": rec.num_classes, "labels": rec.labels,
                "method": self.method.name, "backbone": self.pretrained_cfg.get("architecture", ""),
                "backbone_fingerprint": self.fingerprint()}
        path = Path(path)
        save_safetensors_atomic(state, path, metadata={"vizoo": json.dumps(meta)})
        return path

    def load_task(self, path: str | os.PathLike, name: str | None = None, select: bool = True,
                  check_backbone: bool = True) -> str:
        """Add a task saved by `save_task` (under its own name, or ``name``); returns the name.

        ``check_backbone=False`` skips the fingerprint check: for methods that train the shared
        backbone (sequential finetuning), whose weights a resumed run restores separately."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_task_metadata(path)
        if meta.get("method") != self.method.name:
            raise ValueError(f"{path} holds a {meta.get('method')!r} task state; this model runs "
                             f"{self.method.name!r}: build the model with method={meta.get('method')!r}")
        if check_backbone and meta.get("backbone_fingerprint") != self.fingerprint():
            raise ValueError(f"{path} was trained on another backbone ({meta.get('backbone') or 'unknown'}, weights "
                             f"{meta.get('backbone_fingerprint')}; this one is {self.fingerprint()}): load it into the "
                             "backbone (same architecture and weights) it was trained with")
        name = name or meta["task"]
        state = load_file(str(path))
        n_cls = int(meta["num_classes"])
        if state["head.weight"].shape[0] != n_cls:
            raise ValueError(f"{path}: the head has {state['head.weight'].shape[0]} outputs but the file says "
                             f"{n_cls} classes; the file is damaged, save the task again")
        if name in self._tasks:
            have = self._tasks[name].num_classes
            if have != n_cls:
                raise ValueError(f"task {name!r} here has a {have}-class head, {path} has {n_cls} classes: load it "
                                 f"under another name (load_task(path, name=...)) or remove_task({name!r}) first")
            raise ValueError(f"task {name!r} already exists; load it under another name or remove_task({name!r})")
        expected = set(self.task_tensor_names())
        if set(state) != expected:
            extra = sorted(set(state) - expected)[:3]
            lacking = sorted(expected - set(state))[:3]
            raise ValueError(f"{path} does not fit this backbone's layers (unexpected {extra}, missing {lacking}); "
                             "load it into the architecture and method it was saved from")
        sd = self.state_dict()
        for k, v in state.items():
            if k.startswith("head."):
                continue
            if tuple(sd[k].shape) != tuple(v.shape):
                raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, this backbone {tuple(sd[k].shape)}")
        self._tasks[name] = TaskRecord(n_cls, meta.get("labels"), state)
        if select or self._current is None:
            if self._current == name:
                self._current = None
            self.set_task(name)
        return name

    # ---------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._current is None:
            raise RuntimeError("no task selected: call set_task(name) (or add_task(name, num_classes)) first; "
                               f"tasks: {self.tasks or 'none yet'}")
        return self.head(self.backbone(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def export_functions(self, tasks: Sequence[str] | None = None) -> dict[str, nn.Module]:
        """One inference module per task for a multi-task file: the shared weights are the same
        tensors in every module (files store them once), each task's BN is folded into its CLR
        kernel where one precedes it, and a BN after an unwrapped conv becomes a per-task
        channel affine that converters cannot fold into the shared conv."""
        from .fold import task_export_module

        names = list(tasks) if tasks is not None else self.tasks
        if not names:
            raise ValueError("the model has no tasks to export; add_task / load_task first")
        for n in names:
            if n not in self._tasks:
                raise self._unknown(n)
        previous = self._current
        out = {}
        try:
            for n in names:
                self.set_task(n)
                out[n] = task_export_module(self, n)
        finally:
            if previous is not None:
                self.set_task(previous)
        return out

    def extra_repr(self) -> str:
        return f"method={self.method.name}, tasks={self.tasks}, current={self._current!r}"


def read_task_metadata(path: str | os.PathLike) -> dict:
    """The metadata `ContinualModel.save_task` wrote (task, classes, method, backbone fingerprint)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task state {path} not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("vizoo", "{}"))
    except Exception as e:  # noqa: BLE001 - not safetensors, truncated, ...
        raise ValueError(f"{path} is not a vizoo task state ({type(e).__name__}: {e}); save one with "
                         "ContinualModel.save_task") from e
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a vizoo task state (no {STATE_FORMAT!r} metadata); save one with "
                         "ContinualModel.save_task")
    return meta


def shared_copy(module: nn.Module, shared: Iterable[torch.Tensor]) -> nn.Module:
    """A deep copy of ``module`` whose tensors in ``shared`` are the original objects (not copies)."""
    memo = {id(t): t for t in shared}
    return copy.deepcopy(module, memo)


__all__ = ["ContinualModel", "TaskRecord", "is_norm_layer", "norm_tensor_names", "read_task_metadata", "shared_copy",
           "STATE_FORMAT"]

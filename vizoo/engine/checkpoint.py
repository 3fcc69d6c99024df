"""Run files, training state, RNG capture: what makes a killed run resume bit-identically.

Two kinds of file, both written atomically (temp file + rename, `vizoo.io`):

- ``last.safetensors`` / ``best.safetensors`` (+ ``.json`` sidecars) through `vizoo.hub.save_model`:
  the weights users, `vizoo eval` and the exporter read (`vizoo.hub.load_model` rebuilds them).
- ``last_state.pt``: everything needed to continue — model, optimizer, scheduler, EMA, grad scaler,
  every process's RNG states, the position in the epoch, the metric history. Only tensors and
  plain Python values, so ``torch.load(..., weights_only=True)`` reads it. It holds its own copy
  of the weights so that one atomic file is always self-consistent: a kill between writing the
  weights and the state can never pair weights of step N with an optimizer of step N-k.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FORMAT = "vizoo-train-state-1"


@dataclass(frozen=True)
class RunPaths:
    """Where a run writes its files."""

    root: Path

    @property
    def last(self) -> Path:
        return self.root / "last.safetensors"

    @property
    def best(self) -> Path:
        return self.root / "best.safetensors"

    @property
    def last_ema(self) -> Path:
        return self.root / "last_ema.safetensors"

    @property
    def state(self) -> Path:
        return self.root / "last_state.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def curves(self) -> Path:
        return self.root / "training_curves.png"

    @property
    def confusion_json(self) -> Path:
        return self.root / "confusion_matrix.json"

    @property
    def confusion_png(self) -> Path:
        return self.root / "confusion_matrix.png"


# ----------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and CUDA) generator states as weights_only-safe values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- state files
def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    from vizoo.io import torch_save_atomic

    torch_save_atomic({"format": STATE_FORMAT, **state}, path)


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training state with ``weights_only=True``; errors say which file and why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no training state at {path}: nothing to resume (start without --resume, "
                                "or point --resume at a run's last_state.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"could not read training state {path} ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RuntimeError(f"{path} is not a vizoo training state (format {STATE_FORMAT}); "
                           "to start from weights only, use --pretrained FILE")
    return state


def plain_scheduler_state(scheduler: Any) -> dict[str, Any]:
    """A timm scheduler's state without objects torch.load(weights_only=True) would refuse."""
    if scheduler is None:
        return {}
    ok = (int, float, str, bool, type(None), list, tuple, dict, torch.Tensor)
    return {k: v for k, v in scheduler.state_dict().items() if isinstance(v, ok)}

"""Checkpoint and pretrained-weight loading.

Weights are read from safetensors, or from torch pickles with ``weights_only=True`` only (never
unpickle untrusted data). Common containers (``state_dict``, ``model``, ``model_ema``) and wrapper
prefixes (``module.``, ``_orig_mod.``) are unwrapped; a per-family filter maps official key layouts
onto ours. Every failure names the file and what is wrong with it.
"""
from __future__ import annotations

import logging
import os
import urllib.parse
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .registry import PretrainedCfg

_logger = logging.getLogger(__name__)

_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_MAX_KEYS_SHOWN = 8


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model; the message says which and why."""


def resolve_source(source: str | os.PathLike) -> Path:
    """Turn a weight source into a local file: a path, ``file://``, ``http(s)://`` (cached by
    torch.hub) or ``hf-hub:owner/repo[/file]`` (needs `huggingface_hub`)."""
    source = str(source)
    if source.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(source).path))
    if source.startswith(("http://", "https://")):
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        cache.mkdir(parents=True, exist_ok=True)
        dest = cache / os.path.basename(urllib.parse.urlparse(source).path)
        if not dest.exists():
            try:
                torch.hub.download_url_to_file(source, str(dest), progress=True)
            except Exception as e:  # network errors come in many types
                raise CheckpointError(
                    f"could not download {source}: {e}. Download it by hand and pass the local "
                    "path (pretrained='/path/to/file' or checkpoint_path=...)."
                ) from e
        return dest
    if source.startswith("hf-hub:"):
        repo, _, filename = source[len("hf-hub:"):].partition("@")
        try:
            from huggingface_hub import hf_hub_download
        except ImportError as e:
            raise CheckpointError(
                f"{source} needs `pip install huggingface_hub`; or download the file and pass its path"
            ) from e
        return Path(hf_hub_download(repo, filename or "model.safetensors"))
    return Path(source).expanduser()


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or torch file and unwrap common containers."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"could not read checkpoint {path} ({type(e).__name__}: {str(e)[:200]}). The file is "
            "truncated, corrupt, or a pickle with Python objects other than tensors (those are never "
            "unpickled: re-save it with only the state dict, as safetensors)."
        ) from e
    return unwrap_state_dict(obj, where=str(path))


def unwrap_state_dict(obj: object, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a training checkpoint and strip DDP/compile prefixes."""
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(
                f"{where} holds no state dict (top-level keys: {sorted(obj)[:10]}); expected "
                f"tensors, or one of the keys {_CONTAINER_KEYS}"
            )
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _fmt_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f" … (+{len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else "")


def load_state_dict_into(model: nn.Module, state_dict: dict[str, torch.Tensor], *, where: str,
                         strict: bool = True, classifier: str | None = None,
                         filter_fn: Callable[[dict, nn.Module], dict] | None = None) -> None:
    """Load with clear errors. A classifier whose size differs is dropped with a warning (timm's
    behaviour when ``num_classes`` changes); any other missing/unexpected/mismatched key raises."""
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    head_keys = {k for k in own if classifier and (k == classifier or k.startswith(classifier + "."))}
    dropped_head = False
    if mismatched and head_keys and set(mismatched) <= head_keys:
        warnings.warn(f"{where}: classifier {classifier!r} has another number of classes; it is "
                      "left freshly initialised (fine-tune it).", stacklevel=3)
        state_dict = {k: v for k, v in state_dict.items() if k not in head_keys}
        mismatched, dropped_head = [], True
    missing = [k for k in own if k not in state_dict and not (dropped_head and k in head_keys)]
    unexpected = [k for k in state_dict if k not in own]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + _fmt_keys(
            [f"{k} (file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)})" for k in mismatched]))
    if strict and missing:
        problems.append(f"missing {len(missing)} keys: " + _fmt_keys(missing))
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: " + _fmt_keys(unexpected))
    if problems:
        raise CheckpointError(
            f"{where} does not fit {type(model).__name__}: " + "; ".join(problems)
            + ". Is it a checkpoint of another model or variant? Pass strict=False to load what fits."
        )
    state_dict = {k: v for k, v in state_dict.items() if k in own}
    model.load_state_dict(state_dict, strict=False)


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, strict: bool = True,
                    filter_fn: Callable[[dict, nn.Module], dict] | None = None) -> nn.Module:
    """Load a checkpoint file (any container/format we accept) into ``model``."""
    sd = read_checkpoint(path)
    cfg = getattr(model, "pretrained_cfg", None)
    classifier = cfg.get("classifier") if isinstance(cfg, dict) else None
    load_state_dict_into(model, sd, where=str(path), strict=strict, classifier=classifier,
                         filter_fn=filter_fn)
    return model


def load_pretrained(model: nn.Module, cfg: PretrainedCfg, source: str | os.PathLike | None = None,
                    in_chans: int = 3) -> nn.Module:
    """Load the configured weights (or ``source``), adapting the first conv for ``in_chans``."""
    src = source or cfg.source
    if not src:
        raise CheckpointError(
            f"{cfg.architecture}{'.' + cfg.tag if cfg.tag else ''} has no published weights"
            f"{': ' + cfg.notes if cfg.notes else ''}. Train it with `vizoo train` or pass "
            "pretrained='/path/to/weights.safetensors'."
        )
    path = resolve_source(src)
    sd = read_checkpoint(path)
    if cfg.filter_fn is not None:
        sd = cfg.filter_fn(sd, model)
    if in_chans != 3 and cfg.first_conv:
        from timm.models import adapt_input_conv

        key = cfg.first_conv + ".weight"
        if key in sd:
            sd[key] = adapt_input_conv(in_chans, sd[key])
    load_state_dict_into(model, sd, where=str(path), strict=True, classifier=cfg.classifier)
    return model


# --- vizoo's own checkpoints: weights (.safetensors) + a JSON sidecar that rebuilds the model ---

def save_model(model: nn.Module, path: str | os.PathLike, *, labels: list[str] | None = None,
               extra: dict | None = None) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` atomically.

    The sidecar holds what `load_model` needs to rebuild the exact model (registered name,
    constructor kwargs such as num_classes/in_chans, pretrained_cfg) plus the class labels, so an
    exporter or an app can use the file without the training run's config.
    """
    from .io import save_safetensors_atomic, write_json_atomic

    path = Path(path)
    weights = path.with_suffix(".safetensors")
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    meta = {
        "format": "vizoo-checkpoint-1",
        "model": getattr(model, "vizoo_name", cfg.get("architecture", "")),
        "model_kwargs": dict(getattr(model, "vizoo_kwargs", {}) or {}),
        "num_classes": getattr(model, "num_classes", cfg.get("num_classes")),
        "in_chans": cfg.get("input_size", [3])[0],
        "pretrained_cfg": cfg,
        "labels": list(labels) if labels is not None else None,
    }
    meta.update(extra or {})
    save_safetensors_atomic(model.state_dict(), weights, metadata={"vizoo": "1"})
    write_json_atomic(weights.with_suffix(".json"), meta)
    return weights


def read_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a vizoo checkpoint (``{}`` if there is none)."""
    import json

    side = Path(path).with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"sidecar {side} is not valid JSON: {e}") from e


def load_model(path: str | os.PathLike, name: str | None = None, **kwargs) -> nn.Module:
    """Rebuild a model from a vizoo checkpoint (weights + sidecar); ``name`` overrides the sidecar.

    Raises a clear error when neither the sidecar nor ``name`` says which model it is.
    """
    from .factory import create_model

    path = Path(path)
    meta = read_sidecar(path)
    name = name or meta.get("model")
    if not name:
        raise CheckpointError(f"{path} has no sidecar {path.with_suffix('.json').name} naming its "
                              "model; pass the model name (e.g. `vizoo export NAME --checkpoint FILE`)")
    build = dict(meta.get("model_kwargs") or {})
    if meta.get("num_classes") is not None:
        build["num_classes"] = meta["num_classes"]
    if meta.get("in_chans", 3) != 3:
        build["in_chans"] = meta["in_chans"]
    build.update(kwargs)
    model = create_model(name, checkpoint_path=path, **build)
    cfg = meta.get("pretrained_cfg") or {}
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        if key in cfg:
            model.pretrained_cfg[key] = cfg[key]
    model.labels = meta.get("labels")
    return model

"""`create_model`: build a registered model by name, as `timm.create_model` does."""
from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from . import hub
from .registry import get_pretrained_cfg, model_entrypoint


def create_model(name: str, pretrained: bool | str | os.PathLike = False, num_classes: int | None = None,
                 in_chans: int = 3, checkpoint_path: str | os.PathLike | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build ``name`` (``arch`` or ``arch.tag``).

    ``pretrained`` is True (the config's source), or a local path / URL to load instead.
    ``checkpoint_path`` loads a full checkpoint of this exact model after construction (strict).
    Extra keyword arguments go to the model's constructor and override the tag's ``model_kwargs``.
    """
    entry = model_entrypoint(name)
    cfg = get_pretrained_cfg(name)
    model_kwargs = dict(cfg.model_kwargs)
    model_kwargs.update(kwargs)
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    if in_chans != 3:
        model_kwargs["in_chans"] = in_chans
    model = entry(**model_kwargs)
    cfg_dict = cfg.to_dict()
    n_cls = getattr(model, "num_classes", None)
    if isinstance(n_cls, int):
        cfg_dict["num_classes"] = n_cls
    if in_chans != 3:
        cfg_dict["input_size"] = [in_chans] + list(cfg.input_size[1:])
        cfg_dict["mean"] = cfg_dict["mean"][:1] * in_chans if in_chans == 1 else cfg_dict["mean"]
        cfg_dict["std"] = cfg_dict["std"][:1] * in_chans if in_chans == 1 else cfg_dict["std"]
    model.pretrained_cfg = cfg_dict
    model.default_cfg = cfg_dict
    model.vizoo_name = name
    model.vizoo_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
    if pretrained:
        source = None if pretrained is True else pretrained
        hub.load_pretrained(model, cfg, source=source, in_chans=in_chans)
    if checkpoint_path:
        hub.load_checkpoint(model, checkpoint_path, strict=True, filter_fn=cfg.filter_fn)
    return model

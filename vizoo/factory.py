"""`create_model`: build a registered model by name, as `timm.create_model` does."""
from __future__ import annotations

import os
from typing import Any

import torch.nn as nn
from timm.models._builder import pretrained_cfg_for_features

from . import hub
from .features import wrap_features
from .registry import get_feature_cfg, get_pretrained_cfg, model_entrypoint, no_features_reason

#: create_model keywords that shape the ``features_only`` wrapper, not the model (as timm pops them).
_FEATURE_KWARGS = ("out_indices", "feature_cls")


def create_model(name: str, pretrained: bool | str | os.PathLike = False, num_classes: int | None = None,
                 in_chans: int = 3, checkpoint_path: str | os.PathLike | None = None,
                 **kwargs: Any) -> nn.Module:
    """Build ``name`` (``arch`` or ``arch.tag``).

    ``pretrained`` is True (the config's source), or a local path / URL to load instead.
    ``checkpoint_path`` loads a full checkpoint of this exact model after construction (strict).
    Extra keyword arguments go to the model's constructor and override the tag's ``model_kwargs``.

    ``features_only=True`` (with optional ``out_indices``, ``feature_cls``) returns a backbone whose
    ``forward(x)`` gives a list of NCHW feature maps and whose ``feature_info`` has ``.channels()``
    and ``.reduction()``, as timm's (see :mod:`vizoo.features`; ``vizoo list --features-only``
    lists the models that can). Weights (``pretrained``, ``checkpoint_path``) are loaded into the
    full model first; ``checkpoint_path`` may also be a checkpoint of the features model itself.
    """
    entry = model_entrypoint(name)
    cfg = get_pretrained_cfg(name)
    user_kwargs = dict(kwargs)
    features_only = bool(kwargs.pop("features_only", False))
    feature_kwargs = {k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs}
    feature_cfg = None
    if features_only:
        feature_cfg = get_feature_cfg(name)
        if feature_cfg is None:
            raise ValueError(f"{name} cannot return feature maps (features_only): "
                             f"{no_features_reason(name)}; `vizoo list --features-only` lists models that can")
    elif feature_kwargs:
        raise ValueError(f"{name}: {', '.join(feature_kwargs)} only apply with features_only=True")
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
    vizoo_kwargs = {k: v for k, v in user_kwargs.items()
                    if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
    model.vizoo_name, model.vizoo_kwargs = name, vizoo_kwargs
    if pretrained:
        source = None if pretrained is True else pretrained
        hub.load_pretrained(model, cfg, source=source, in_chans=in_chans)
    features_ckpt = None
    if checkpoint_path and not features_only:
        hub.load_checkpoint(model, checkpoint_path, strict=True, filter_fn=cfg.filter_fn)
    elif checkpoint_path:
        # A checkpoint of the full (classifier) model, as usual; failing that, of the features model.
        sd = hub.read_checkpoint(checkpoint_path)
        try:
            hub.load_state_dict_into(model, sd, where=str(checkpoint_path), strict=True,
                                     classifier=cfg.classifier, filter_fn=cfg.filter_fn)
        except hub.CheckpointError as e:
            features_ckpt = (sd, e)
    if features_only:
        model = wrap_features(model, feature_cfg, out_indices=feature_kwargs.get("out_indices"),
                              feature_cls=feature_kwargs.get("feature_cls"), name=name)
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(cfg_dict)
        if features_ckpt is not None:
            sd, full_error = features_ckpt
            try:
                hub.load_state_dict_into(model, sd, where=str(checkpoint_path), strict=True)
            except hub.CheckpointError as e:
                raise hub.CheckpointError(
                    f"{full_error} (It does not fit the features_only model with out_indices="
                    f"{tuple(model.feature_info.out_indices)} either: {e})") from e
        model.vizoo_name, model.vizoo_kwargs = name, vizoo_kwargs
    return model

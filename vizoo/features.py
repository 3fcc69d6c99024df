"""``features_only=True``: wrap a built model in timm's feature extractors, as timm does.

This is the feature branch of timm's ``build_model_with_cfg`` applied to a model that
:func:`vizoo.create_model` has already built (and loaded weights into): the registry's
``feature_cfg`` for the architecture picks timm's wrapper class and its options, and
``out_indices`` selects levels of the model's ``feature_info`` (timm semantics: a tuple of level
indices, negative counting from the deepest; an int ``n`` means the last ``n`` levels; default all
levels, typically five at strides 2, 4, 8, 16, 32).

The wrapper returns a list of NCHW maps, one per index, and carries ``feature_info``
(:class:`timm.models._features.FeatureInfo`: ``.channels()``, ``.reduction()``, ``.module_name()``).
Its parameter names are the wrapper's (``FeatureListNet`` flattens ``stages.0`` to ``stages_0``,
``FeatureGetterNet`` prefixes ``model.``), so weights are loaded into the full model first.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

import torch.nn as nn
from timm.models._features import (FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureInfo,
                                   FeatureListNet, feature_take_indices)

__all__ = ["OutIndices", "FEATURE_CLASSES", "resolve_out_indices", "wrap_features"]

OutIndices = Union[int, Sequence[int], None]

#: ``feature_cls`` names, as timm's ``build_model_with_cfg`` accepts them.
FEATURE_CLASSES: dict[str, type[nn.Module]] = {
    "list": FeatureListNet,
    "dict": FeatureDictNet,
    "hook": FeatureHookNet,
    "getter": FeatureGetterNet,
}


def _feature_info_list(model: nn.Module) -> list[dict[str, Any]]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, FeatureInfo):
        return list(info.info)
    if isinstance(info, (list, tuple)) and info:
        return list(info)
    raise ValueError(f"{type(model).__name__} has no feature_info (list of dicts with num_chs, "
                     "reduction, module), so it cannot return feature maps")


def resolve_out_indices(model: nn.Module, out_indices: OutIndices = None, name: str = "") -> tuple[int, ...]:
    """Absolute level indices for ``out_indices`` (None: all levels), or a clear ValueError."""
    info = _feature_info_list(model)
    n = len(info)
    if out_indices is not None and not isinstance(out_indices, int):
        out_indices = [int(i) for i in out_indices]
        if not out_indices:
            raise ValueError(f"{name or type(model).__name__}: out_indices is empty")
    try:
        take, _ = feature_take_indices(n, out_indices)
    except (AssertionError, TypeError) as e:
        levels = ", ".join(f"{i}: {f['num_chs']}ch/{f['reduction']}" for i, f in enumerate(info))
        raise ValueError(f"{name or type(model).__name__}: out_indices={out_indices!r} does not fit its "
                         f"{n} feature levels ({levels}); negative indices count from the deepest") from e
    if len(set(take)) != len(take) or take != sorted(take):
        raise ValueError(f"{name or type(model).__name__}: out_indices={out_indices!r} must be "
                         "increasing and without repeats (shallow to deep, as timm returns them)")
    return tuple(take)


def wrap_features(model: nn.Module, feature_cfg: dict[str, Any] | None = None,
                  out_indices: OutIndices = None, feature_cls: str | type | None = None,
                  name: str = "") -> nn.Module:
    """Wrap a full ``model`` so that ``forward(x)`` returns its feature maps at ``out_indices``.

    ``feature_cfg`` is the registry's (timm ``feature_cfg`` keys); ``feature_cls`` overrides its
    wrapper class ('list', 'dict', 'hook', 'getter' or a class), as timm's ``feature_cls`` kwarg.
    """
    cfg = dict(feature_cfg or {})
    cfg["out_indices"] = resolve_out_indices(model, out_indices, name)
    cls = feature_cls if feature_cls is not None else cfg.pop("feature_cls", FeatureListNet)
    cfg.pop("feature_cls", None)
    if isinstance(cls, str):
        key = cls.lower()
        key = "hook" if "hook" in key else key
        if key not in FEATURE_CLASSES:
            raise ValueError(f"unknown feature_cls {cls!r}; use one of {sorted(FEATURE_CLASSES)}")
        cls = FEATURE_CLASSES[key]
    use_getter = issubclass(cls, FeatureGetterNet)
    if use_getter and not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{name or type(model).__name__} has no forward_intermediates; "
                         "feature_cls='getter' needs it (use 'list')")
    # As timm: flatten_sequential only for the dict/list/hook wrappers, no_rewrite only for hooks.
    # Those wrappers find levels among top-level children, so nested names ('blocks.1') need it.
    if issubclass(cls, (FeatureDictNet, FeatureHookNet)):
        cfg.setdefault("flatten_sequential", True)
    else:
        cfg.pop("flatten_sequential", None)
    if not issubclass(cls, FeatureHookNet):
        cfg.pop("no_rewrite", None)
    output_fmt = getattr(model, "output_fmt", None)
    if output_fmt is not None and not use_getter:
        cfg.setdefault("output_fmt", output_fmt)
    return cls(model, **cfg)

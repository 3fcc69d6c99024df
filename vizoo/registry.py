"""Model registry: names -> entry points, pretrained configs and tags, as `timm` users expect.

A model name may carry a tag (``evit_deit_small_patch16_224.r0p7_fuse``). The tag selects a
:class:`PretrainedCfg`, which says where weights come from, how inputs are preprocessed, what the
paper reported, and which constructor keyword arguments the tag implies.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch.nn as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PretrainedCfg:
    """Everything known about one (model, tag) pair besides its architecture.

    ``source`` is where ``pretrained=True`` loads from: an ``https://`` or ``file://`` URL, a
    local path, or ``hf-hub:owner/repo`` (resolved to the hub's ``model.safetensors``). Empty
    means no published weights; ``pretrained=True`` then raises with that explanation.
    """

    source: str = ""
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    num_classes: int = 1000
    classifier: str = "head"
    first_conv: str = ""
    license: str = "apache-2.0"
    paper: str = ""
    paper_url: str = ""
    #: The paper's reported figures: e.g. {"params_m": 22.1, "macs_g": 3.0, "top1": 79.5}.
    paper_metrics: dict[str, Any] = field(default_factory=dict)
    #: Keyword arguments the tag implies (e.g. keep_rate for an EViT tag).
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Maps a foreign state dict (official code, older timm) onto this model's keys.
    filter_fn: Callable[[dict, nn.Module], dict] | None = None
    #: Text shown when weights are absent or special (e.g. "no official checkpoint published").
    notes: str = ""
    #: Where a MAC count excludes work (e.g. FFTs), say so here.
    macs_note: str = ""
    #: Export formats known to work; the exporter still verifies every file it writes.
    export_formats: tuple[str, ...] = ("coreml", "tflite")
    #: A smaller input size the test suite may use for forward/backward (None: the default size).
    test_input_size: tuple[int, int, int] | None = None
    #: What the model predicts; `vizoo train` picks its task adapter from it unless --task is
    #: given ("classification", or "detection" for box detectors such as StageInteractor).
    task: str = "classification"
    #: Name of the model the weights belong to, filled in at registration.
    architecture: str = ""
    tag: str = ""

    @property
    def has_weights(self) -> bool:
        return bool(self.source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (callables dropped) for checkpoints, reports and `vizoo info`."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if callable(value):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


class UnknownModelError(ValueError):
    """Raised for a name that is not registered; the message lists the closest names."""


_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_families: dict[str, str] = {}
_cfgs: dict[str, dict[str, PretrainedCfg]] = {}  # architecture -> tag -> cfg (first tag = default)
#: architecture -> timm-style feature_cfg (``feature_cls``: 'list' (default), 'getter', 'dict',
#: 'hook'; ``flatten_sequential``...), for architectures that can return feature maps.
_feature_cfgs: dict[str, dict[str, Any]] = {}
#: architecture -> why it cannot return feature maps (shown by ``features_only=True``).
_no_features: dict[str, str] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *,
                   feature_cfg: dict[str, Any] | None = None) -> Any:
    """Decorator: register a model entry point under its function name.

    The family is the defining module's last name (``vizoo.models.evit`` -> ``evit``).
    Used bare (``@register_model``) or with ``feature_cfg`` (``@register_model(feature_cfg={...})``):
    a model with a ``feature_cfg`` can be built with ``features_only=True`` (see
    :func:`register_features`).
    """
    if fn is None:
        def decorator(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
            register_model(f)
            if feature_cfg is not None:
                register_features(f.__name__, feature_cfg)
            return f
        return decorator
    if feature_cfg is not None:
        raise TypeError("register_model(fn, feature_cfg=...): use @register_model(feature_cfg=...)")
    name = fn.__name__
    if name in _entrypoints and _entrypoints[name] is not fn:
        raise RuntimeError(f"model name {name!r} is registered twice")
    _entrypoints[name] = fn
    _families[name] = fn.__module__.rsplit(".", 1)[-1]
    _cfgs.setdefault(name, {})
    mod = sys.modules.get(fn.__module__)
    if mod is not None:
        mod.__all__ = list(getattr(mod, "__all__", [])) + [name]
    return fn


def register_pretrained_cfgs(cfgs: dict[str, PretrainedCfg]) -> None:
    """Attach configs, keyed ``arch`` or ``arch.tag``; the first one given per arch is the default."""
    for key, cfg in cfgs.items():
        arch, _, tag = key.partition(".")
        cfg = dataclasses.replace(cfg, architecture=arch, tag=tag)
        _cfgs.setdefault(arch, {})[tag] = cfg


def register_features(names: str | Iterable[str], feature_cfg: dict[str, Any] | None = None, *,
                      reason: str = "") -> None:
    """Declare whether registered architectures can return feature maps (``features_only=True``).

    ``feature_cfg`` (timm's ``build_model_with_cfg(feature_cfg=...)`` keys) says how: the model's
    ``feature_info`` (list of dicts: num_chs, reduction, module) is served by timm's
    ``FeatureListNet`` (default; ``flatten_sequential=True`` for nested stages) or, with
    ``feature_cls='getter'``, by ``FeatureGetterNet`` over the model's ``forward_intermediates``.
    ``feature_cfg=None`` with ``reason`` marks them as unable, and why.
    """
    if (feature_cfg is None) == (not reason):
        raise ValueError("register_features: pass either a feature_cfg or (for no features) a reason")
    for name in [names] if isinstance(names, str) else list(names):
        if name not in _entrypoints:
            raise KeyError(f"register_features: {name!r} is not a registered model")
        if feature_cfg is not None:
            _feature_cfgs[name] = dict(feature_cfg)
            _no_features.pop(name, None)
        else:
            _no_features[name] = reason
            _feature_cfgs.pop(name, None)


def get_feature_cfg(name: str) -> dict[str, Any] | None:
    """The ``feature_cfg`` of ``name`` (``arch`` or ``arch.tag``), or None if it gives no feature maps."""
    _import_models()
    arch, _ = split_model_name_tag(name)
    if arch not in _entrypoints:
        raise _unknown(name)
    cfg = _feature_cfgs.get(arch)
    return dict(cfg) if cfg is not None else None


def no_features_reason(name: str) -> str:
    """Why ``name`` cannot return feature maps ("" if it can)."""
    if get_feature_cfg(name) is not None:
        return ""
    return _no_features.get(split_model_name_tag(name)[0], "its family declares no feature levels "
                            "(no feature_info / feature_cfg registered)")


def split_model_name_tag(name: str) -> tuple[str, str]:
    arch, _, tag = name.partition(".")
    return arch, tag


def _all_names(with_tags: bool) -> list[str]:
    names = list(_entrypoints)
    if with_tags:
        for arch, tags in _cfgs.items():
            names += [f"{arch}.{t}" for t in tags if t]
    return names


def _unknown(name: str) -> UnknownModelError:
    choices = _all_names(with_tags=True)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.0)
    return UnknownModelError(
        f"unknown model {name!r}. Closest registered names: {', '.join(close)}. "
        "See `vizoo list` for all."
    )


def is_model(name: str) -> bool:
    arch, tag = split_model_name_tag(name)
    _import_models()
    return arch in _entrypoints and (not tag or tag in _cfgs.get(arch, {}))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    arch, _ = split_model_name_tag(name)
    _import_models()
    if arch not in _entrypoints:
        raise _unknown(name)
    return _entrypoints[arch]


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    """Config for ``arch`` (its default tag) or ``arch.tag``; unknown tags raise."""
    _import_models()
    arch, tag = split_model_name_tag(name)
    if arch not in _entrypoints:
        raise _unknown(name)
    tags = _cfgs.get(arch, {})
    if tag:
        if tag not in tags:
            raise _unknown(name)
        return tags[tag]
    if tags:
        return next(iter(tags.values()))
    return PretrainedCfg(architecture=arch)


def get_family(name: str) -> str:
    _import_models()
    return _families[split_model_name_tag(name)[0]]


def list_models(pattern: str | Iterable[str] = "*", pretrained: bool = False,
                family: str | None = None, exclude: str | Iterable[str] = (),
                features_only: bool = False) -> list[str]:
    """Registered names matching shell-style wildcard(s), sorted.

    With ``pretrained=True`` only ``arch.tag`` names whose config has a weight source are listed
    (as in timm); otherwise architectures are listed, plus tags when the pattern has a dot.
    With ``features_only=True`` only models that ``create_model(..., features_only=True)`` can build.
    """
    _import_models()
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    excludes = [exclude] if isinstance(exclude, str) else list(exclude)
    if pretrained:
        names = [f"{a}.{t}" if t else a for a, tags in _cfgs.items()
                 for t, c in tags.items() if c.has_weights]
    else:
        names = _all_names(with_tags=any("." in p for p in patterns))
    out = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    out = {n for n in out if not any(fnmatch.fnmatchcase(n, p) for p in excludes)}
    if family:
        out = {n for n in out if _families[split_model_name_tag(n)[0]] == family}
    if features_only:
        out = {n for n in out if split_model_name_tag(n)[0] in _feature_cfgs}
    return sorted(out)


def list_families() -> list[str]:
    _import_models()
    return sorted(set(_families.values()))


_models_imported = False


def _import_models() -> None:
    """Import `vizoo.models` once so every family's decorators have run."""
    global _models_imported
    if not _models_imported:
        _models_imported = True
        import vizoo.models  # noqa: F401

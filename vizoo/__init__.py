"""vizoo: vision-efficiency methods by name, one engine to train them, one exporter to ship them.

>>> import vizoo
>>> model = vizoo.create_model("mobilenetv2_100_evos0", num_classes=10)
>>> vizoo.list_models("*evo*")[:2]
"""
from .factory import create_model
from .hub import CheckpointError, load_checkpoint
from .info import ModelInfo, model_info
from .registry import (PretrainedCfg, UnknownModelError, get_pretrained_cfg, list_families,
                       list_models, register_model, register_pretrained_cfgs)
from .version import __version__


from . import export as _export_package  # noqa: E402  (bind the subpackage before the function)


def export(*args, **kwargs):
    """Export a model to CoreML / TFLite with verification; see :func:`vizoo.export.export_model`."""
    return _export_package.export_model(*args, **kwargs)


__all__ = [
    "create_model", "list_models", "list_families", "model_info", "ModelInfo", "register_model",
    "register_pretrained_cfgs", "PretrainedCfg", "UnknownModelError", "get_pretrained_cfg",
    "load_checkpoint", "CheckpointError", "export", "__version__",
]

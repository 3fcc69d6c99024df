"""Exporter: CoreML and TFLite files, each verified against the PyTorch model.

Heavy converters (coremltools, litert-torch) are imported only when a format is used.
"""
from __future__ import annotations

from typing import Any


def export_model(*args: Any, **kwargs: Any) -> Any:
    """See :func:`vizoo.export.api.export_model`."""
    from .api import export_model as _export_model

    return _export_model(*args, **kwargs)

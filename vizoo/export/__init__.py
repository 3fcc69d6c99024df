"""Exporter: CoreML and TFLite files, each verified against the PyTorch model.

Heavy converters (coremltools, litert-torch) are imported only when a format is used.
"""
from __future__ import annotations

from typing import Any


def export_model(*args: Any, **kwargs: Any) -> Any:
    """See :func:`vizoo.export.api.export_model`."""
    from .api import export_model as _export_model

    return _export_model(*args, **kwargs)


def verify_file(*args: Any, **kwargs: Any) -> Any:
    """See :func:`vizoo.export.api.verify_file`: re-check any exported file against PyTorch."""
    from .api import verify_file as _verify_file

    return _verify_file(*args, **kwargs)

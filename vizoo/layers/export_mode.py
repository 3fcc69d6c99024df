"""Export mode: layers with an op a converter cannot take switch to an equal, exportable form.

A layer that has such a form subclasses :class:`ExportAware` and branches on ``self.exporting``
(e.g. AFFNet's FFT -> DFT-as-matmuls, EViT's token selection -> one-hot matmuls). The exporter
wraps conversion in :func:`export_mode`; tests assert both forms compute the same numbers.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn


class ExportAware:
    """Mixin: ``exporting`` is False in normal use and True inside :func:`export_mode`."""

    exporting: bool = False


@contextlib.contextmanager
def export_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Switch every :class:`ExportAware` submodule to its export form for the duration.

    Enabled, it also swaps in the exact export forms of standard layers that would leave XNNPACK's
    fast path (padded ``nn.MaxPool2d``, ``nn.GroupNorm``; see :mod:`vizoo.layers.export_swaps`)
    and puts the originals back on exit.
    """
    restore = None
    if enabled:
        from .export_swaps import swap_in_export_forms

        restore = swap_in_export_forms(model)
    saved = [(m, m.__dict__.get("exporting")) for m in model.modules() if isinstance(m, ExportAware)]
    try:
        for m, _ in saved:
            m.exporting = enabled
        yield model
    finally:
        for m, old in saved:
            if old is None:
                m.__dict__.pop("exporting", None)
            else:
                m.exporting = old
        if restore is not None:
            restore()


def has_export_form(model: nn.Module) -> bool:
    return any(isinstance(m, ExportAware) for m in model.modules())

"""The ``classify`` op that ``ct.ClassifierConfig`` appends: top label plus a label->prob dict."""
from __future__ import annotations

import numpy as np

from .registry import OpContext, register


@register("classify")
def _classify(ctx: OpContext):
    probs = ctx.tensor("probabilities").reshape(-1)
    classes = ctx.raw("classes")
    classes = [c.item() if isinstance(c, np.generic) else c for c in np.asarray(classes).tolist()]
    if len(classes) != probs.size:
        raise ctx.fail(f"{len(classes)} class labels for {probs.size} probabilities")
    best = int(np.argmax(probs))  # first maximum on ties
    return classes[best], {c: float(p) for c, p in zip(classes, probs)}

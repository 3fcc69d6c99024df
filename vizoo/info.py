"""`model_info`: what a user needs to pick a model — paper, sizes, our counts beside the paper's."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .counting import COUNTER_NAME, count_macs, count_params
from .factory import create_model
from .registry import get_family, get_pretrained_cfg


@dataclass
class ModelInfo:
    name: str
    family: str
    paper: str
    paper_url: str
    input_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    params: int
    macs: int
    mac_counter: str
    macs_note: str
    paper_metrics: dict[str, Any] = field(default_factory=dict)
    weights: str = ""
    notes: str = ""
    license: str = ""
    export_formats: tuple[str, ...] = ()
    #: continual models (CLR): parameters one more task adds, head excluded, and the backbone's
    params_per_task: int | None = None
    backbone_params: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_info(name: str, **kwargs: Any) -> ModelInfo:
    """Build ``name`` (without weights) and count its params and MACs at the default input size."""
    cfg = get_pretrained_cfg(name)
    model = create_model(name, **kwargs)
    input_size = tuple(model.pretrained_cfg["input_size"])
    return ModelInfo(
        name=name, family=get_family(name), paper=cfg.paper, paper_url=cfg.paper_url,
        input_size=input_size, mean=tuple(cfg.mean), std=tuple(cfg.std),
        params=count_params(model), macs=count_macs(model, input_size), mac_counter=COUNTER_NAME,
        macs_note=cfg.macs_note, paper_metrics=dict(cfg.paper_metrics),
        weights=cfg.source or "none published", notes=cfg.notes, license=cfg.license,
        export_formats=tuple(cfg.export_formats),
        params_per_task=model.parameters_per_task() if hasattr(model, "parameters_per_task") else None,
        backbone_params=model.backbone_parameters() if hasattr(model, "backbone_parameters") else None,
    )


def format_info(info: ModelInfo) -> str:
    """A readable two-column table; our counts next to the paper's where it reports them."""
    pm = info.paper_metrics
    rows = [
        ("model", info.name), ("family", info.family),
        ("paper", info.paper + (f" ({info.paper_url})" if info.paper_url else "")),
        ("input size", "x".join(map(str, info.input_size))),
        ("mean / std", f"{_fmt_seq(info.mean)} / {_fmt_seq(info.std)}"),
        ("params", f"{info.params:,} ({info.params / 1e6:.3f} M)"
                   + (f"   paper: {pm['params_m']} M" if "params_m" in pm else "")),
        ("MACs", f"{info.macs / 1e9:.3f} G" + (f"   paper: {pm['macs_g']} G" if "macs_g" in pm else "")),
        ("MAC counter", info.mac_counter + (f"; {info.macs_note}" if info.macs_note else "")),
    ]
    if info.params_per_task is not None and info.backbone_params:
        rows.append(("params per task", f"{info.params_per_task:,} ({100.0 * info.params_per_task / info.backbone_params:.2f} % "
                     f"of the {info.backbone_params:,}-parameter backbone; reprogramming kernels + norm affines, "
                     "head excluded)"))
    for k, v in pm.items():
        if k not in ("params_m", "macs_g"):
            rows.append((f"paper {k}", str(v)))
    rows += [("weights", info.weights), ("license", info.license),
             ("export", ", ".join(info.export_formats))]
    if info.notes:
        rows.append(("notes", info.notes))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _fmt_seq(seq: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{x:g}" for x in seq) + ")"

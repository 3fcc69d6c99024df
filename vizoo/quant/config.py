"""What a QuEST-quantized UNet quantizes and how (bits, granularity, initialisation)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

__all__ = ["QuantConfig", "WEIGHT_INITS", "ACT_INITS", "TE_LAYER_SETS"]

WEIGHT_INITS = ("mse", "minmax")
ACT_INITS = ("minmax", "percentile")
#: C_TE choices (specs §3.9): ResBlock projections only (the official code) or also the time MLP
TE_LAYER_SETS = ("proj", "mlp+proj")


@dataclass
class QuantConfig:
    """Bits and policies of one quantized model (specs §3.3).

    ``a_per_channel=None`` follows QuEST: per-channel activations below 8 bits (A4), per-tensor
    otherwise. The first and last convs' inputs stay at ``first_last_a_bits`` (per tensor) even in
    W4A4; the softmax output uses ``sm_abits`` (unsigned). ``per_step`` keeps one activation
    parameter set per calibrated timestep.
    """

    w_bits: int = 4
    a_bits: int = 8
    sm_abits: int = 8
    a_per_channel: bool | None = None
    first_last_a_bits: int = 8
    weight_init: str = "mse"
    act_init: str = "minmax"
    per_step: bool = True
    te_layers: str = "proj"

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits", "sm_abits", "first_last_a_bits"):
            value = getattr(self, name)
            if not 2 <= int(value) <= 16:
                raise ValueError(f"QuantConfig.{name}={value} is outside 2..16")
        if self.weight_init not in WEIGHT_INITS:
            raise ValueError(f"QuantConfig.weight_init must be one of {WEIGHT_INITS}, got {self.weight_init!r}")
        if self.act_init not in ACT_INITS:
            raise ValueError(f"QuantConfig.act_init must be one of {ACT_INITS}, got {self.act_init!r}")
        if self.te_layers not in TE_LAYER_SETS:
            raise ValueError(f"QuantConfig.te_layers must be one of {TE_LAYER_SETS}, got {self.te_layers!r}")

    @property
    def act_per_channel(self) -> bool:
        """Resolved activation granularity (per channel below 8 bits unless set explicitly)."""
        return self.a_bits < 8 if self.a_per_channel is None else bool(self.a_per_channel)

    @property
    def tag(self) -> str:
        """Short name such as ``W4A8``."""
        return f"W{self.w_bits}A{self.a_bits}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

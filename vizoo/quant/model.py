"""QuantUNet: a fake-quantized copy of a diffusion UNet with per-timestep activation parameters.

Every Conv2d/Linear (and the class Embedding) becomes a :class:`QuantModule` under its own name,
every diffusers ``Attention`` gets operand quantizers, and the forward picks the activation
parameter set of the nearest calibrated timestep ≥ t (the sampler's schedule decides which
timesteps were calibrated; nothing is hard-coded, unlike the official ``i % 10`` switch).
"""
from __future__ import annotations

import bisect
import copy
import fnmatch
import json
import os
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from vizoo.layers.quantizers import WEIGHT_MODES, UniformQuantizer
from vizoo.quant.attention import QuantAttnProcessor, add_attention_quantizers
from vizoo.quant.config import QuantConfig
from vizoo.quant.modules import QUANTIZABLE, QuantModule

__all__ = ["QuantUNet", "TE_PROJ_PATTERNS", "TE_MLP_PATTERNS", "ATTN_LAYER_PATTERNS"]

#: C_TE (specs §3.9): ResBlock time-embedding projections ...
TE_PROJ_PATTERNS = ("*.resnets.*.time_emb_proj",)
#: ... plus, for ``te_layers="mlp+proj"``, the global time-embedding MLP
TE_MLP_PATTERNS = ("*time_embedding.linear_1", "*time_embedding.linear_2")
#: C_A: the attention projections (UNet2DModel attention blocks have no FeedForward)
ATTN_LAYER_PATTERNS = ("*.attentions.*.to_q", "*.attentions.*.to_k", "*.attentions.*.to_v", "*.attentions.*.to_out.0")


def _attention_class() -> type:
    from diffusers.models.attention_processor import Attention
    return Attention


def _first_last_convs(model: nn.Module) -> set[str]:
    """Names of the UNets' ``conv_in``/``conv_out`` (their inputs stay 8-bit, specs §3.3)."""
    from diffusers import UNet2DModel
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, UNet2DModel):
            dot = f"{prefix}." if prefix else ""
            names.update({f"{dot}conv_in", f"{dot}conv_out"})
    return names


class QuantUNet(nn.Module):
    """Fake-quantized wrapper of a DiffusionUNet (``forward(sample, timestep, class_labels=None)``).

    ``fp_model`` is deep-copied (``self.model``), so module names read ``model.unet.<diffusers
    path>``. ``calib_timesteps`` are the timesteps that get an activation parameter set (all of
    them share one set when ``cfg.per_step`` is False). Quantization starts off (FP mode, equal to
    the float model bit for bit); turn it on with :meth:`set_quant_state` after initialising the
    quantizers (``vizoo.quant.init``).
    """

    def __init__(self, fp_model: nn.Module, cfg: QuantConfig | None = None, calib_timesteps: Sequence[int] = (0,)):
        super().__init__()
        self.cfg = cfg or QuantConfig()
        table = sorted({int(t) for t in calib_timesteps})
        if not table:
            raise ValueError("QuantUNet needs at least one calibration timestep")
        self.model = copy.deepcopy(fp_model)
        self.register_buffer("calib_timesteps", torch.tensor(table, dtype=torch.long))
        self._fixed_set: int | None = None
        self._act_on = False
        self._wrap_layers()
        self._act_list = [q for _, q in self.act_quantizers()]
        self.set_quant_state(False, False)

    # ------------------------------------------------------------------ construction
    @property
    def num_sets(self) -> int:
        """Number of activation parameter sets (one per calibrated timestep, or 1)."""
        return len(self.calib_timesteps) if self.cfg.per_step else 1

    def _wrap_layers(self) -> None:
        cfg, num_sets = self.cfg, self.num_sets
        first_last = _first_last_convs(self.model)
        targets = [(name, m) for name, m in self.model.named_modules() if isinstance(m, QUANTIZABLE) and name]
        for name, module in targets:
            a_bits, per_channel = cfg.a_bits, cfg.act_per_channel
            if name in first_last:
                a_bits, per_channel = cfg.first_last_a_bits, False
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, QuantModule(module, cfg.w_bits, a_bits, per_channel, num_sets))
        attention = _attention_class()
        for _, module in self.model.named_modules():
            if isinstance(module, attention):
                add_attention_quantizers(module, cfg.a_bits, cfg.sm_abits, cfg.act_per_channel, num_sets)
        for name, quantizer in self.act_quantizers():
            quantizer.name = name

    # ------------------------------------------------------------------ iteration
    def quant_modules(self) -> Iterator[tuple[str, QuantModule]]:
        """(name, QuantModule) in module order, names as in ``named_modules`` (``model.unet....``)."""
        for name, module in self.named_modules():
            if isinstance(module, QuantModule):
                yield name, module

    def act_quantizers(self) -> Iterator[tuple[str, UniformQuantizer]]:
        """(name, quantizer) of every activation quantizer, layer inputs and attention operands."""
        for name, module in self.named_modules():
            if isinstance(module, UniformQuantizer):
                yield name, module

    def attention_modules(self) -> Iterator[tuple[str, nn.Module]]:
        attention = _attention_class()
        for name, module in self.named_modules():
            if isinstance(module, attention):
                yield name, module

    def _names_matching(self, patterns: Sequence[str]) -> list[str]:
        return [name for name, _ in self.quant_modules() if any(fnmatch.fnmatchcase(name, p) for p in patterns)]

    def te_layer_names(self) -> list[str]:
        """C_TE: the time-embedding layers QuEST finetunes first (``cfg.te_layers``)."""
        patterns = TE_PROJ_PATTERNS + (TE_MLP_PATTERNS if self.cfg.te_layers == "mlp+proj" else ())
        return self._names_matching(patterns)

    def attn_layer_names(self) -> list[str]:
        """C_A: the attention projections QuEST finetunes second."""
        return self._names_matching(ATTN_LAYER_PATTERNS)

    # ------------------------------------------------------------------ state
    def set_quant_state(self, weight: bool = False, act: bool = False) -> None:
        """Turn weight / activation fake-quantization on or off everywhere (both off: the float model)."""
        for _, module in self.quant_modules():
            module.use_weight_quant = bool(weight)
        for quantizer in self._act_list:
            quantizer.enabled = bool(act)
        self._act_on = bool(act)

    def set_weight_mode(self, mode: str) -> None:
        """AdaRound mode of every weight quantizer: "soft", "hard" (frozen decision) or "nearest" (RTN)."""
        if mode not in WEIGHT_MODES:
            raise ValueError(f"weight mode must be one of {WEIGHT_MODES}, got {mode!r}")
        for _, module in self.quant_modules():
            module.weight_quantizer.mode = mode

    def weight_mode(self) -> str:
        """The AdaRound mode shared by the weight quantizers ("mixed" if they differ)."""
        modes = {m.weight_quantizer.mode for _, m in self.quant_modules()}
        return modes.pop() if len(modes) == 1 else "mixed"

    def set_attention_explicit(self, explicit: bool | None) -> None:
        """Force the explicit matmul/softmax attention (True, for export), never (False) or auto (None)."""
        for _, attn in self.attention_modules():
            if isinstance(attn.processor, QuantAttnProcessor):
                attn.processor.explicit = explicit

    def set_act_set(self, index: int | None) -> None:
        """Pin every activation quantizer to set ``index`` (None: choose from the timestep again)."""
        if index is not None and not 0 <= index < self.num_sets:
            raise IndexError(f"activation set {index} out of range 0..{self.num_sets - 1}")
        self._fixed_set = index
        if index is not None:
            self._apply_set(index)

    def _apply_set(self, index: int) -> None:
        for quantizer in self._act_list:
            quantizer.set_index = index

    def set_index_for(self, timestep: int | float) -> int:
        """Set of the nearest calibrated timestep ≥ ``timestep`` (the largest one above the table)."""
        if self.num_sets == 1:
            return 0
        table = self.calib_timesteps.tolist()
        return min(bisect.bisect_left(table, float(timestep)), len(table) - 1)

    def _select_set(self, timestep: torch.Tensor | int | float) -> None:
        if self._fixed_set is not None or self.num_sets == 1:
            self._apply_set(self._fixed_set or 0)
            return
        t = torch.as_tensor(timestep).reshape(-1)
        if t.numel() > 1 and not bool((t == t[0]).all()):
            raise ValueError(
                f"QuantUNet with per-step activation parameters got a batch with several timesteps "
                f"({sorted(set(t.tolist()))[:6]}...): feed one timestep per batch (CalibrationSet.batches does), "
                "pin a set with set_act_set(i), or build it with QuantConfig(per_step=False)")
        self._apply_set(self.set_index_for(t[0].item()))

    # ------------------------------------------------------------------ forward
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self._act_on:
            self._select_set(timestep)
        if class_labels is None:
            return self.model(sample, timestep)
        return self.model(sample, timestep, class_labels)

    # ------------------------------------------------------------------ files
    def save_quant_state(self, path: str | os.PathLike) -> None:
        """Write the whole state (finetuned weights, AdaRound α, per-set tables) as safetensors."""
        from vizoo.io import save_safetensors_atomic
        meta = {"format": "vizoo.quant.QuantUNet", "quant_config": self.cfg.to_json(),
                "calib_timesteps": json.dumps(self.calib_timesteps.tolist()), "weight_mode": self.weight_mode()}
        save_safetensors_atomic(self.state_dict(), path, metadata=meta)

    def load_quant_state(self, path: str | os.PathLike, strict: bool = True) -> None:
        """Load a file written by :meth:`save_quant_state` (same architecture and number of sets).

        The AdaRound mode saved with the file is restored too (it is not a tensor).
        """
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=str(self.calib_timesteps.device))
        if state["calib_timesteps"].shape != self.calib_timesteps.shape:
            raise ValueError(f"{path} has {state['calib_timesteps'].numel()} calibrated timesteps, this QuantUNet "
                             f"{self.calib_timesteps.numel()}: build it with QuantUNet.from_file(fp_model, path)")
        self.load_state_dict(state, strict=strict)
        if meta.get("weight_mode") in WEIGHT_MODES:
            self.set_weight_mode(meta["weight_mode"])

    @classmethod
    def from_file(cls, fp_model: nn.Module, path: str | os.PathLike) -> "QuantUNet":
        """Rebuild a QuantUNet (config and calibrated timesteps from the file's metadata) and load it."""
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "vizoo.quant.QuantUNet":
            raise ValueError(f"{path} was not written by QuantUNet.save_quant_state")
        qmodel = cls(fp_model, QuantConfig.from_dict(json.loads(meta["quant_config"])),
                     json.loads(meta["calib_timesteps"]))
        qmodel.load_quant_state(path)
        qmodel.set_quant_state(True, True)
        return qmodel

    def extra_repr(self) -> str:
        return f"{self.cfg.tag}, sets={self.num_sets}, calib_timesteps={self.calib_timesteps.tolist()}"

"""QuEST's selective finetuning (specs §3.5): what trains, on which data, with which loss.

Two stages, each one `vizoo.engine.Trainer` run of a task adapter (`vizoo.engine.quest`):

=====================  ==========================================  ====================================
stage                  trains (``trainable`` patterns)             loss
=====================  ==========================================  ====================================
``te`` (TLA, stage 1)  ``*.time_emb_proj.{weight,bias}`` + their   Σ_l MSE(local C_TE outputs vs FP)
                       act Δ ("mlp+proj": also                     + n_l · MSE(ε_Q, ε_FP)
                       ``time_embedding.linear_{1,2}``)
``attn`` (CMA, st. 2)  ``to_q/to_k/to_v/to_out.0`` weights+biases  MSE(ε_Q, ε_FP)
                       + every act Δ whose name has no "emb"       (+ Σ_l local C_A terms with
                                                                    ``local_loss``, then n_l · global)
=====================  ==========================================  ====================================

Weight-quantizer parameters (AdaRound alpha, Δ_w, Z_w) never match a pattern, so they stay frozen;
the finetuned float weights reach the output through the frozen rounding decision (floor-STE).

Why the global term is weighted by the number of local terms: the official code adds MSE(ε) once
per hooked layer (``Σ_hooked [local + global]``). With Adam only the ratio of the terms matters, so
this reproduces the code; without local terms the weight is 1.

Data: a `CalibrationSet` is cut into *chunks*, each one mini-batch of ONE calibrated timestep (the
quantized model picks its activation set from the timestep), labelled once with the FP model's ε
and, for the local terms, the FP outputs of the same layers on the same inputs (forward hooks).
The Trainer shuffles chunks across timesteps (the paper's E_t; the official stage 1 instead
finishes one timestep before the next, so the shared weights end tuned to the last one); Adam
skips the Δ of the sets a chunk does not use (their gradient is None). Because the Trainer builds its task from a config,
the chunks reach it through an in-process registry: ``data="quest:<key>"`` (`register_stage_data`).
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

DATA_PREFIX = "quest:"
STAGES = ("te", "attn")
TE_LAYERS = ("proj", "mlp+proj")

#: parameter-name patterns (`vizoo.engine.freeze` syntax) of what each stage trains
_DELTA = r"\.act_quantizer(_[qkvw])?\.delta(\.\d+)?$"
_TE_PROJ = r"\.time_emb_proj"
_TE_MLP = r"\.time_embedding\.linear_[12]"
_ATTN = r"\.(to_q|to_k|to_v|to_out\.0)"


@dataclass
class StageOptions:
    """How one finetuning stage runs. Defaults: the official code scaled to the bundled benchmark
    (specs §3.10: ≈50 Adam steps per calibrated t for TLA, 5-10 epochs for CMA)."""

    stage: str = "te"
    te_layers: str = "proj"            # C_TE: "proj" (code) or "mlp+proj" (adds the global time-embedding MLP)
    local_loss: bool | None = None     # None: stage default (te: on, attn: off as in the code)
    global_weight: float | None = None  # weight of MSE(ε_Q, ε_FP); None: the number of local terms (code)
    lr_weight: float = 1e-5
    lr_act: float | None = None        # None: stage default (te: 1e-5 as the code, attn: 1e-4)
    batch_size: int = 8                # samples per chunk (one timestep each)
    steps_per_t: int = 50              # te: Adam steps per calibrated timestep (sets the epochs)
    epochs: int = 5                    # attn: passes over all calibrated timesteps
    val_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, not {self.stage!r}")
        if self.te_layers not in TE_LAYERS:
            raise ValueError(f"te_layers must be one of {TE_LAYERS}, not {self.te_layers!r}")

    @property
    def use_local(self) -> bool:
        return self.stage == "te" if self.local_loss is None else bool(self.local_loss)

    @property
    def act_lr(self) -> float:
        return self.lr_act if self.lr_act is not None else (1e-5 if self.stage == "te" else 1e-4)

    def num_epochs(self, chunks_per_t: int) -> int:
        """Trainer epochs: te trains ``steps_per_t`` steps per timestep, attn ``epochs`` passes."""
        if self.stage == "te":
            return max(1, round(self.steps_per_t / max(chunks_per_t, 1)))
        return max(1, self.epochs)


# ---------------------------------------------------------------------------- what trains
def trainable_patterns(stage: str, te_layers: str = "proj") -> list[str]:
    """``TrainConfig.trainable`` patterns of a stage (regexes on parameter names).

    Stage 2 takes every activation Δ except those of modules with "emb" in their name, as the
    code does (it excludes the time-embedding MLP and class embedding too, not only C_TE).
    """
    if stage == "te":
        layers = _TE_PROJ if te_layers == "proj" else f"({_TE_PROJ}|{_TE_MLP})"
        return [f"re:{layers}\\.(weight|bias)$", f"re:{layers}{_DELTA}"]
    if stage == "attn":
        return [f"re:\\.attentions\\.\\d+{_ATTN}\\.(weight|bias)$", f"re:^(?!.*emb).*{_DELTA}"]
    raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")


def is_act_scale(name: str) -> bool:
    """Whether a parameter is an activation quantizer's Δ (its own learning rate)."""
    return re.search(_DELTA, name) is not None


def local_layer_names(model: nn.Module, stage: str, te_layers: str = "proj") -> list[str]:
    """Module names whose outputs enter the local loss: C_TE for stage 1, C_A for stage 2."""
    layer = (_TE_PROJ if te_layers == "proj" else f"({_TE_PROJ}|{_TE_MLP})") if stage == "te" \
        else f"\\.attentions\\.\\d+{_ATTN}"
    rx = re.compile(f"{layer}$")
    return [n for n, m in model.named_modules() if rx.search("." + n) and hasattr(m, "weight")]


def fp_name(quant_name: str) -> str:
    """The float model's name of a `QuantUNet` module (``model.unet.x`` -> ``unet.x``)."""
    return quant_name[len("model."):] if quant_name.startswith("model.") else quant_name


def finetuned_weight_count(model: nn.Module, stages: Sequence[str], te_layers: str = "proj") -> int:
    """Weights and biases a run of ``stages`` changes (act Δ not counted: they are quantizer state)."""
    from vizoo.engine.freeze import matches

    patterns = [p for s in stages for p in trainable_patterns(s, te_layers)]
    return sum(p.numel() for n, p in model.named_parameters()
               if not is_act_scale(n) and any(matches(n, pat) for pat in patterns))


# ---------------------------------------------------------------------------- hooks
class LayerTaps(contextlib.AbstractContextManager):
    """Forward hooks that keep the outputs of named modules (for the local loss terms)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no module named {missing[:3]} in {type(model).__name__}")
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self.outputs[name] = output
        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ---------------------------------------------------------------------------- data
@dataclass
class StageData:
    """What a stage's Trainer run reads: labelled chunks (train) and held-out chunks (val)."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    options: StageOptions
    local_names: list[str] = field(default_factory=list)   # QuantUNet module names with local terms
    timesteps: list[int] = field(default_factory=list)
    fp_pretrained_cfg: dict[str, Any] = field(default_factory=dict)

    @property
    def chunks_per_t(self) -> int:
        return max(1, len(self.train) // max(len(self.timesteps), 1))


_REGISTRY: dict[str, StageData] = {}


def register_stage_data(key: str, data: StageData) -> str:
    """Make ``data`` readable as ``TrainConfig.data = "quest:<key>"``; returns that string."""
    _REGISTRY[key] = data
    return DATA_PREFIX + key


def get_stage_data(data: str) -> StageData:
    if not str(data).startswith(DATA_PREFIX):
        raise ValueError(f"the QuEST task adapters read --data {DATA_PREFIX}<key> (registered in-process "
                         f"by vizoo.quant.finetune.register_stage_data), not {data!r}")
    key = str(data)[len(DATA_PREFIX):]
    if key not in _REGISTRY:
        raise ValueError(f"no calibration data registered as {key!r}: QuEST stages run through "
                         "vizoo.quant.pipeline.quantize_unet (or finetune.run_stage), which registers it")
    return _REGISTRY[key]


@torch.no_grad()
def label_chunks(fp_model: nn.Module, calib: Any, batch_size: int, fp_layers: Sequence[str] = (),
                 max_per_step: int | None = None) -> list[dict[str, Any]]:
    """Cut ``calib`` into one-timestep mini-batches labelled by the FP model.

    Each chunk: ``x`` [B,1,H,W], ``t`` [B] (one value), ``class_labels`` [B] or None, ``eps_fp``
    (the FP ε on the same inputs), ``local`` {fp layer name: FP output}, ``step`` (the index of the
    calibrated timestep). Labels are computed once: they do not change while the quantized model
    trains.
    """
    was = fp_model.training
    fp_model.eval()
    chunks: list[dict[str, Any]] = []
    x_all, t_all = calib.x, calib.t
    cls_all = getattr(calib, "class_labels", None)
    fp_eps = getattr(calib, "fp_eps", None)
    n = x_all.shape[1] if max_per_step is None else min(max_per_step, x_all.shape[1])
    try:
        for s in range(x_all.shape[0]):
            for i in range(0, n, batch_size):
                x = x_all[s, i:min(i + batch_size, n)].float().contiguous()
                t = torch.full((x.shape[0],), int(t_all[s]), dtype=torch.long)
                cls = cls_all[s, i:i + x.shape[0]].contiguous() if cls_all is not None else None
                if fp_layers or fp_eps is None:
                    with LayerTaps(fp_model, fp_layers) as taps:
                        eps = fp_model(x, t, cls)
                    local = {k: v.detach().float() for k, v in taps.outputs.items()}
                else:  # the set carries the FP ε already
                    eps, local = fp_eps[s, i:i + x.shape[0]], {}
                chunks.append({"x": x, "t": t, "class_labels": cls, "eps_fp": eps.detach().float(),
                               "local": local, "step": s})
    finally:
        fp_model.train(was)
    return chunks


def build_stage_data(qmodel: nn.Module, fp_model: nn.Module, calib: Any, val_calib: Any,
                     options: StageOptions) -> StageData:
    """Label the calibration set (train) and a held-out calibration-like set (val) for a stage."""
    names = local_layer_names(qmodel, options.stage, options.te_layers) if options.use_local else []
    fp_layers = [fp_name(n) for n in names]
    train = label_chunks(fp_model, calib, options.batch_size, fp_layers)
    val = label_chunks(fp_model, val_calib, options.val_batch_size)
    cfg = dict(getattr(fp_model, "pretrained_cfg", None) or {})
    return StageData(train=train, val=val, options=options, local_names=names,
                     timesteps=[int(t) for t in calib.t], fp_pretrained_cfg=cfg)


# ---------------------------------------------------------------------------- one stage = one Trainer run
#: the engine config every stage shares: constant-lr Adam, no weight decay, no EMA, no augmentation
STAGE_RECIPE: dict[str, Any] = dict(opt="adam", weight_decay=0.0, sched="none", warmup_epochs=0, ema=False,
                                    batch_size=1, eval_batch_size=1, augment=False, plots=False,
                                    deterministic=False, recipe="none")


def stage_config(options: StageOptions, data: str, out: str | os.PathLike, epochs: int, seed: int = 0,
                 device: str = "cpu", progress: str = "off", model_name: str = "quest_unet") -> dict[str, Any]:
    """The `TrainConfig` of a stage run (batch_size 1: a dataset item is already one chunk)."""
    task = "quest_te" if options.stage == "te" else "quest_attn"
    return dict(STAGE_RECIPE, model=model_name, task=task, data=data, lr=options.lr_weight, epochs=epochs,
                seed=seed, out=str(out), resume="auto", device=device, progress=progress,
                trainable=trainable_patterns(options.stage, options.te_layers))


def run_stage(qmodel: nn.Module, fp_model: nn.Module, calib: Any, val_calib: Any, options: StageOptions,
              out: str | os.PathLike, seed: int = 0, progress: str = "off", verbose: bool = False,
              overrides: dict[str, Any] | None = None) -> Any:
    """Finetune ``qmodel`` in place for one stage (resumable in ``out``); returns the `TrainResult`.

    The best epoch on the held-out ε-MSE (the Trainer's ``best``) is loaded back into ``qmodel``.
    """
    import io

    from safetensors.torch import load_file

    from vizoo.engine.trainer import Trainer

    out = Path(out)
    data = build_stage_data(qmodel, fp_model, calib, val_calib, options)
    key = register_stage_data(str(out.resolve()), data)
    device = str(next(qmodel.parameters()).device)
    cfg = stage_config(options, key, out, options.num_epochs(data.chunks_per_t), seed=seed, device=device,
                       progress=progress)
    cfg.update(overrides or {})
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    try:
        with sink:
            result = Trainer(cfg, model=qmodel).fit()
    finally:
        _REGISTRY.pop(str(out.resolve()), None)
    if result.best_path is not None:
        qmodel.load_state_dict(load_file(str(result.best_path)))
    for p in qmodel.parameters():
        p.requires_grad_(False)
    return result


def stage_options(stage: str, base: StageOptions | None = None, **changes: Any) -> StageOptions:
    """``base`` (or the defaults) for ``stage`` with ``changes``."""
    return replace(base or StageOptions(), stage=stage, **changes)

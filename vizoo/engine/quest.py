"""QuEST's two finetuning stages as task adapters: ``quest_te`` (TLA) and ``quest_attn`` (CMA).

A batch is one chunk of a calibration set (one timestep, FP labels attached; see
`vizoo.quant.finetune`), read from ``--data quest:<key>``. ``train_step`` runs the quantized UNet
(weights through the frozen AdaRound decision, activations fake-quantized with the timestep's
set) and returns Σ local MSE + n · MSE(ε_Q, ε_FP) (stage 1) or the global MSE (stage 2, optional
local term). The meter is the ε-MSE against the FP model on held-out calibration-like inputs,
overall and per timestep (``primary_metric = "eps_mse"``, lower is better). What trains is the
config's ``trainable`` patterns (`vizoo.quant.finetune.trainable_patterns`, filled in when empty);
``param_groups`` gives weights and activation scales their own learning rates.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig
from .distributed import DistEnv, all_reduce_sum, unwrap
from .tasks import StepOutput, TaskAdapter, TaskData


def _single_chunk(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate: a dataset item already is a one-timestep mini-batch; batches must not mix them."""
    if len(items) != 1:
        raise ValueError(f"QuEST stages need batch_size 1 and eval_batch_size 1 (an item is already one "
                         f"timestep's mini-batch), got {len(items)} items per batch")
    return items[0]


class EpsMseMeter:
    """Sums of the squared ε error vs FP per calibrated timestep (exact across batches/processes)."""

    def __init__(self, timesteps: list[int]):
        self.timesteps = list(timesteps)
        self.sse = torch.zeros(len(timesteps), dtype=torch.float64)   # Σ per-sample MSE
        self.count = torch.zeros(len(timesteps), dtype=torch.float64)

    @torch.no_grad()
    def update(self, step: int, per_sample_mse: torch.Tensor) -> None:
        self.sse[step] += float(per_sample_mse.double().sum())
        self.count[step] += per_sample_mse.numel()

    def reduce(self, env: DistEnv) -> "EpsMseMeter":
        if env.distributed:
            all_reduce_sum(self.sse, env)
            all_reduce_sum(self.count, env)
        return self

    def compute(self) -> dict[str, float]:
        seen = self.count > 0
        per_t = torch.where(seen, self.sse / self.count.clamp(min=1), torch.zeros_like(self.sse))
        mean = float(per_t[seen].mean()) if bool(seen.any()) else float("nan")
        out = {"loss": mean, "eps_mse": mean, "num_samples": int(self.count.sum())}
        out.update({f"eps_mse_t{t}": float(per_t[i]) for i, t in enumerate(self.timesteps) if seen[i]})
        return out


class _QuestStage(TaskAdapter):
    """Shared body of the two stages; subclasses only name the stage."""

    stage = ""
    primary_metric = "eps_mse"
    higher_is_better = False
    report_file = "eps_mse.json"

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.collate_fn = _single_chunk
        self.stage_data = None

    def load_data(self, cfg: TrainConfig, splits: tuple[str, ...] = ("train", "val"),
                  labels: list[str] | None = None) -> TaskData:
        from vizoo.quant.finetune import get_stage_data

        data = get_stage_data(cfg.data)
        if data.options.stage != self.stage:
            raise ValueError(f"--data {cfg.data} holds stage {data.options.stage!r} data, task {self.name} "
                             f"is stage {self.stage!r}")
        self.stage_data = data
        return TaskData(splits={s: getattr(data, s) for s in splits}, labels=None, source=str(cfg.data))

    def create_model(self, cfg: TrainConfig, data: TaskData) -> nn.Module:
        raise ValueError(f"task {self.name} finetunes a quantized UNet: pass it as Trainer(cfg, model=QuantUNet) "
                         "(vizoo.quant.pipeline.quantize_unet does)")

    def attach_transforms(self, cfg: TrainConfig, data: TaskData, model: nn.Module) -> None:
        """Put the model in its finetuning state (weights through the frozen AdaRound decision,
        activations quantized) and fill in the stage's trainable patterns when none are given."""
        from vizoo.quant.finetune import trainable_patterns

        if not getattr(model, "pretrained_cfg", None):
            model.pretrained_cfg = dict(self.stage_data.fp_pretrained_cfg or {"input_size": [1, 16, 16]})
        model.set_quant_state(weight=True, act=True)
        model.set_weight_mode("hard")
        if not cfg.trainable:
            cfg.trainable = trainable_patterns(self.stage, self.stage_data.options.te_layers)

    # ---------------------------------------------------------------- steps
    def train_step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        from vizoo.quant.finetune import LayerTaps, fp_name

        names = self.stage_data.local_names
        # An outer no_grad would silently train nothing (QuEST issue #14): gradients are forced on.
        with torch.enable_grad(), LayerTaps(unwrap(model), names) as taps:
            eps = model(batch["x"], batch["t"], batch["class_labels"])
            glob = F.mse_loss(eps.float(), batch["eps_fp"])
            local = [F.mse_loss(taps.outputs[n].float(), batch["local"][fp_name(n)]) for n in names]
        # The code adds the global term once per hooked layer; without local terms its weight is 1.
        weight = self.stage_data.options.global_weight
        weight = max(len(local), 1) if weight is None else weight
        loss = sum(local, torch.zeros(())) + weight * glob
        if not loss.requires_grad:
            raise RuntimeError(f"{self.name}: the loss has no gradient (nothing trainable reaches the output; "
                               "check the trainable patterns and that quantization is on)")
        logs = {"global_mse": float(glob.detach())}
        if local:
            logs["local_mse"] = float(sum(l.detach() for l in local))
        return StepOutput(loss=loss, num_samples=int(batch["x"].shape[0]), logs=logs)

    def new_meter(self) -> EpsMseMeter:
        return EpsMseMeter(self.stage_data.timesteps)

    def eval_step(self, model: nn.Module, batch: dict[str, Any], meter: EpsMseMeter) -> None:
        eps = model(batch["x"], batch["t"], batch["class_labels"]).float()
        err = (eps - batch["eps_fp"]).pow(2).flatten(1).mean(1)
        meter.update(int(batch["step"]), err)

    def final_report(self, meter: EpsMseMeter) -> dict[str, Any]:
        return meter.compute()

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Weights at ``lr_weight``, activation scales at the stage's ``act_lr``; no weight decay."""
        from vizoo.quant.finetune import is_act_scale

        opts = self.stage_data.options
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        weights = [p for n, p in named if not is_act_scale(n)]
        scales = [p for n, p in named if is_act_scale(n)]
        groups = [{"params": weights, "lr": opts.lr_weight, "weight_decay": 0.0},
                  {"params": scales, "lr": opts.act_lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]


class TimeEmbeddingTask(_QuestStage):
    """Stage 1 (TLA): ResBlock time-embedding projections and their activation scales."""

    name = "quest_te"
    stage = "te"


class AttentionTask(_QuestStage):
    """Stage 2 (CMA): attention projections and every other activation scale."""

    name = "quest_attn"
    stage = "attn"

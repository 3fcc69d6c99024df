"""DDPM UNets on 16x16 digits: the full-precision model of the bundled QuEST benchmark.

QuEST (Wang et al., "Towards Accurate Post-Training Quantization of Diffusion Models via
Efficient Selective Finetuning") quantizes a trained diffusion UNet. On a CPU the benchmark
needs a UNet small enough to train in minutes, built from the same parts as the paper's LDMs
(ResNet blocks with time-embedding projections, self-attention blocks), so diffusers'
``UNet2DModel`` is used as is and the quantizer names its layers by diffusers' module paths
(``unet.down_blocks.1.resnets.0.time_emb_proj``, ``unet.mid_block.attentions.0.to_q``, ...).

- ``ddpm_digits16``: unconditional, 1.16 M parameters, epsilon prediction, 1,000 linear-beta
  DDPM steps; data in [-1, 1] (mean 0.5, std 0.5 of [0, 1] images).
- ``ddpm_digits16_cond``: the same with a 10-class label embedding (the ImageNet analogue).

``forward(sample, timestep, class_labels=None)`` returns the predicted noise as a plain tensor
(not diffusers' output dataclass), so exporters and quantizers see one tensor. diffusers is an
optional dependency (``pip install 'vizoo[diffusion]'``) imported when a model is built, so
``vizoo list`` stays fast and works without it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..layers.export_mode import ExportAware
from ..registry import PretrainedCfg, register_features, register_model, register_pretrained_cfgs

NUM_TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "linear"


def _unet2d_class() -> type:
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise ImportError("the diffusion models need diffusers: pip install 'vizoo[diffusion]' "
                          "(or pip install diffusers==0.42.1)") from e
    return UNet2DModel


class DiffusionUNet(ExportAware, nn.Module):
    """A diffusers ``UNet2DModel`` predicting epsilon, with the schedule facts a sampler needs.

    ``num_classes`` > 0 adds a class embedding (``num_class_embeds``): the model is then
    ``conditional`` and every forward needs ``class_labels``.
    """

    num_train_timesteps = NUM_TRAIN_TIMESTEPS
    beta_schedule = BETA_SCHEDULE
    #: tells the exporter what the model's outputs are (a noise prediction, not class logits)
    export_task = "diffusion"

    def __init__(self, num_classes: int = 0, in_chans: int = 1, img_size: int = 16,
                 block_out_channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1,
                 down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                 up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups: int = 8, attention_head_dim: int = 16):
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        self.num_classes = int(num_classes)
        self.conditional = self.num_classes > 0
        self.in_chans = int(in_chans)
        self.img_size = int(img_size)
        self.unet = _unet2d_class()(
            sample_size=self.img_size, in_channels=self.in_chans, out_channels=self.in_chans,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            norm_num_groups=norm_num_groups, attention_head_dim=attention_head_dim,
            num_class_embeds=self.num_classes or None)
        # create_model replaces this with the registered config; kept for direct construction
        self.pretrained_cfg: dict[str, Any] = {"input_size": [self.in_chans, self.img_size, self.img_size],
                                               "mean": [0.5] * self.in_chans, "std": [0.5] * self.in_chans,
                                               "num_classes": self.num_classes, "task": "diffusion"}

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise ``[B, C, H, W]`` for ``sample`` at ``timestep`` (``[B]`` or a scalar,
        integer or float: the UNet embeds it as a float)."""
        if self.conditional and class_labels is None:
            raise ValueError(f"this UNet is class-conditional ({self.num_classes} classes): pass class_labels "
                             "(LongTensor[B] of class indices)")
        if not self.conditional and class_labels is not None:
            raise ValueError("this UNet is unconditional: pass class_labels=None (or build the _cond variant)")
        if self.exporting and class_labels is not None:
            # the labels' int->float CAST (outside XNNPACK) first in the graph, so that everything
            # after it is one partition; the class table's export form takes float indices
            class_labels = class_labels.to(torch.float32)
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]

    def example_inputs(self, batch_size: int = 1, input_size: Sequence[int] | None = None
                       ) -> tuple[torch.Tensor, ...]:
        """(noisy sample, timestep[, class_labels]) for tracing, counting and export checks.

        The timestep is float32: exported files then take one float input (CoreML and TFLite
        handle int64 inputs poorly), and the UNet turns it into a float embedding anyway.
        Draws come from torch's global generator, so callers seed them.
        """
        size = tuple(input_size) if input_size is not None else (self.in_chans, self.img_size, self.img_size)
        sample = torch.randn(batch_size, *size)
        timestep = torch.randint(0, self.num_train_timesteps, (batch_size,)).float()
        if self.conditional:
            return sample, timestep, torch.randint(0, self.num_classes, (batch_size,))
        return sample, timestep


_PAPER = ("Denoising Diffusion Probabilistic Models (Ho et al., NeurIPS 2020); the FP model of the "
          "QuEST benchmark (Wang et al., 2024)")
_NOTES = ("No published weights: train with `vizoo train ddpm_digits16` (DDPM on the bundled digits at 16x16, "
          "about 15 CPU-minutes) or vizoo.diffusion.train.train_fp_model. Sample with "
          "vizoo.diffusion.ddim_sample.")


def _cfg(**kwargs: Any) -> PretrainedCfg:
    return PretrainedCfg(source="", input_size=(1, 16, 16), mean=(0.5,), std=(0.5,), interpolation="bilinear",
                         crop_pct=1.0, classifier="", first_conv="unet.conv_in", license="apache-2.0",
                         paper=_PAPER, paper_url="https://arxiv.org/abs/2006.11239", notes=_NOTES,
                         task="diffusion", macs_note="one UNet call (one denoising step; a 20-step DDIM sample "
                         "makes 20)", **kwargs)


register_pretrained_cfgs({
    "ddpm_digits16": _cfg(num_classes=0),
    "ddpm_digits16_cond": _cfg(num_classes=10),
})


@register_model
def ddpm_digits16(num_classes: int = 0, in_chans: int = 1, **kwargs: Any) -> DiffusionUNet:
    """Unconditional DDPM UNet for 16x16 digits (1.16 M parameters)."""
    return DiffusionUNet(num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def ddpm_digits16_cond(num_classes: int = 10, in_chans: int = 1, **kwargs: Any) -> DiffusionUNet:
    """Class-conditional DDPM UNet for 16x16 digits (10 classes, 1.16 M parameters)."""
    return DiffusionUNet(num_classes=num_classes, in_chans=in_chans, **kwargs)


register_features(["ddpm_digits16", "ddpm_digits16_cond"],
                  reason="a diffusion UNet maps a noisy image to noise; it has no classification backbone")

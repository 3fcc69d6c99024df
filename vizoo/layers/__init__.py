"""Reusable blocks of the zoo's methods, one concept a module.

The public names are re-exported here (as ``timm.layers`` does) so a user builds their own model
with ``from vizoo.layers import EvoNorm2dS0, ULSAM`` without knowing the module layout. The
modules import only torch/timm and each other, never ``vizoo`` itself, so this package can be
imported first without a cycle.
"""
from .adaptive_mixing import CascadeAdaptiveMixing, layer_norm2
from .aff import AdaptiveFrequencyFilter
from .box_attention import BoxSelfAttention, iof_attention_bias
from .clr import CLR_MODES, CLRConv2d, apply_clr, clr_layers, identity_init_
from .box_ops import (box_iof, pow2, refine_xyzr, whole_image_xyzr, xyxy_to_xyzr, xyzr_position_embedding,
                      xyzr_size, xyzr_to_xyxy)
from .det_assign import candidate_stages, csla_targets, hungarian_match, hungarian_match_batch
from .det_loss import StageInteractorCriterion
from .dft import (hermitian_project, irfft2_ortho, irfft2_ortho_nhwc, num_rfft_cols, rfft2_ortho,
                  rfft2_ortho_nhwc)
from .evonorm import (EVONORM_LAYERS, EvoNorm2dB0, EvoNorm2dB1, EvoNorm2dS0, EvoNorm2dS0a, EvoNorm2dS1,
                      evonorm_norm_act, get_evonorm_layer, group_std, instance_std, resolve_num_groups,
                      tf_num_groups)
from .export_mode import ExportAware, export_mode, has_export_form
from .query_sampling import SubBoxSampler, level_anchor_z, level_weights, sample_multilevel
from .norm_act_convert import (ACTIVATION_FUNCTIONS, ACTIVATION_MODULES, NormActConversionError,
                               convert_norm_act)
from .token_reorg import EXPORT_FORMS as TOKEN_REORG_EXPORT_FORMS
from .token_reorg import TokenReorganizer, class_attention, keep_count
from .ulsam import OFFICIAL_BN_MOMENTUM, ULSAM, ulsam_checkpoint_filter

__all__ = [
    # EvoNorm (evonorm.py) and the BN+act -> EvoNorm converter (norm_act_convert.py)
    "EvoNorm2dB0", "EvoNorm2dB1", "EvoNorm2dS0", "EvoNorm2dS0a", "EvoNorm2dS1", "EVONORM_LAYERS",
    "get_evonorm_layer", "evonorm_norm_act", "tf_num_groups", "resolve_num_groups", "instance_std",
    "group_std", "convert_norm_act", "NormActConversionError", "ACTIVATION_MODULES",
    "ACTIVATION_FUNCTIONS",
    # ULSAM (ulsam.py)
    "ULSAM", "OFFICIAL_BN_MOMENTUM", "ulsam_checkpoint_filter",
    # AFFNet's token mixer (aff.py) and its FFT-free DFT (dft.py)
    "AdaptiveFrequencyFilter", "rfft2_ortho", "irfft2_ortho", "rfft2_ortho_nhwc", "irfft2_ortho_nhwc",
    "hermitian_project", "num_rfft_cols",
    # EViT token reorganisation (token_reorg.py)
    "TokenReorganizer", "keep_count", "class_attention", "TOKEN_REORG_EXPORT_FORMS",
    # StageInteractor: boxes (box_ops.py), IoF-biased self-attention (box_attention.py), 3-D sub-box
    # sampling (query_sampling.py), adaptive mixing with filter reuse (adaptive_mixing.py),
    # Hungarian matching and cross-stage label assignment (det_assign.py), the loss (det_loss.py)
    "xyzr_to_xyxy", "xyxy_to_xyzr", "xyzr_size", "refine_xyzr", "whole_image_xyzr", "box_iof", "pow2",
    "xyzr_position_embedding", "BoxSelfAttention", "iof_attention_bias", "SubBoxSampler",
    "sample_multilevel", "level_weights", "level_anchor_z", "CascadeAdaptiveMixing", "layer_norm2",
    "hungarian_match", "hungarian_match_batch", "csla_targets", "candidate_stages",
    "StageInteractorCriterion",
    # CLR's channel-wise reprogramming of frozen convs (clr.py)
    "CLRConv2d", "apply_clr", "clr_layers", "identity_init_", "CLR_MODES",
    # export forms (export_mode.py)
    "ExportAware", "export_mode", "has_export_form",
]
# uniform affine fake-quantizers for QuEST (quantizers.py)
from .quantizers import AdaRoundQuantizer, UniformQuantizer, affine_params, fake_quant, floor_ste, round_ste
__all__ += ["UniformQuantizer", "AdaRoundQuantizer", "fake_quant", "round_ste", "floor_ste", "affine_params"]

"""QuEST toolkit: fake-quantized diffusion UNets, calibration, weight/activation initialisation, AdaRound.

Build a :class:`QuantUNet` from an FP model, collect a data-free :class:`CalibrationSet`, then
``init_weight_quantizers`` → ``reconstruct`` (AdaRound) → ``init_act_quantizers``. The selective
finetuning stages, the pipeline and the benchmark build on these (``vizoo.quant.pipeline``).
"""
from vizoo.layers.quantizers import AdaRoundQuantizer, UniformQuantizer, fake_quant, floor_ste, round_ste
from vizoo.quant.adaround import reconstruct, reconstruct_unit, reconstruction_units
from vizoo.quant.attention import QuantAttnProcessor
from vizoo.quant.calibrate import CalibrationSet, collect_calibration, fp_eps_of
from vizoo.quant.config import QuantConfig
from vizoo.quant.init import init_act_quantizers, init_weight_quantizers, weight_range_search
from vizoo.quant.model import QuantUNet
from vizoo.quant.modules import QuantModule

__all__ = [
    "QuantConfig", "QuantUNet", "QuantModule", "QuantAttnProcessor", "UniformQuantizer", "AdaRoundQuantizer",
    "round_ste", "floor_ste", "fake_quant", "CalibrationSet", "collect_calibration", "fp_eps_of",
    "init_weight_quantizers", "init_act_quantizers", "weight_range_search", "reconstruct", "reconstruct_unit",
    "reconstruction_units",
]

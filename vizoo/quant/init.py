"""Initial quantization parameters: weight ranges (MSE search) and activation ranges (per calibrated step).

The official code searches weight ranges channel by channel in Python and spends up to an hour
there (QuEST issue #5); here every search runs over all channels and all candidates at once.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch

from vizoo.layers.quantizers import affine_params, fake_quant, lp_error

if TYPE_CHECKING:
    from vizoo.quant.calibrate import CalibrationSet
    from vizoo.quant.model import QuantUNet

__all__ = ["weight_range_search", "init_weight_quantizers", "init_act_quantizers", "progress_bar"]

#: Q-Diffusion's MSE search: shrink (min, max) by 1 − 0.01·i for i < 80, keep the least L_2.4 error
NUM_SHRINK_STEPS, SHRINK_STEP, WEIGHT_LP = 80, 0.01, 2.4


def progress_bar(iterable, progress: bool | str, desc: str, total: int | None = None, unit: str = "it"):
    """tqdm over ``iterable`` when ``progress`` is truthy (a string names the bar)."""
    from tqdm.auto import tqdm
    label = progress if isinstance(progress, str) else desc
    return tqdm(iterable, desc=label, total=total, unit=unit, disable=not progress, leave=False)


@torch.no_grad()
def weight_range_search(weight: torch.Tensor, bits: int, method: str = "mse", channel_axis: int = 0,
                        max_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (Δ, Z) [C] of ``weight``: min–max, or the shrunk range with the least L_2.4 error.

    All channels and up to ``max_elements`` / numel candidates are evaluated in one tensor op.
    """
    flat = weight.detach().float().movedim(channel_axis, 0).reshape(weight.shape[channel_axis], -1)
    lo, hi = flat.amin(1), flat.amax(1)
    if method == "minmax":
        return affine_params(lo, hi, bits)
    if method != "mse":
        raise ValueError(f"unknown weight init {method!r}; use 'mse' or 'minmax'")
    qmax = 2 ** bits - 1
    shrink = 1.0 - SHRINK_STEP * torch.arange(NUM_SHRINK_STEPS, dtype=flat.dtype, device=flat.device)
    chunk = max(1, max_elements // max(flat.numel(), 1))
    best_err = torch.full_like(lo, float("inf"))
    best_delta, best_zero = torch.ones_like(lo), torch.zeros_like(lo)
    for start in range(0, NUM_SHRINK_STEPS, chunk):
        s = shrink[start:start + chunk, None]                             # [P, 1]
        delta, zero = affine_params(lo * s, hi * s, bits)                 # [P, C]
        xq = fake_quant(flat.unsqueeze(0), delta.unsqueeze(-1), zero.unsqueeze(-1), 0, qmax)
        err, idx = lp_error(flat.unsqueeze(0), xq, WEIGHT_LP, dims=(2,)).min(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_delta = torch.where(better, delta.gather(0, idx[None])[0], best_delta)
        best_zero = torch.where(better, zero.gather(0, idx[None])[0], best_zero)
    return best_delta, best_zero


def init_weight_quantizers(qmodel: "QuantUNet", method: str | None = None, progress: bool | str = False) -> None:
    """Per-output-channel (Δ, Z) of every weight quantizer; α reset to round-to-nearest, mode "nearest"."""
    method = method or qmodel.cfg.weight_init
    modules = list(qmodel.quant_modules())
    for _, module in progress_bar(modules, progress, "weight init", unit="layer"):
        quantizer = module.weight_quantizer
        delta, zero = weight_range_search(module.weight, quantizer.bits, method, quantizer.channel_axis)
        quantizer.set_params(delta, zero, module.weight.detach())
        quantizer.mode = "nearest"


@contextlib.contextmanager
def _calibrating(qmodel: "QuantUNet", method: str) -> Iterator[None]:
    """Activation quantizers initialise the current set from the data they see, then quantize."""
    quantizers = [q for _, q in qmodel.act_quantizers()]
    fixed, training = qmodel._fixed_set, qmodel.training
    for q in quantizers:
        q.initialized_sets.zero_()
        q.calibrate = method
    qmodel.eval()
    try:
        yield
    finally:
        for q in quantizers:
            q.calibrate = None
        qmodel.set_act_set(fixed)
        qmodel.train(training)


def _check_steps(qmodel: "QuantUNet", calib: "CalibrationSet") -> list[tuple[int, int]]:
    """(calibration step, activation set) pairs; every calibrated timestep must own a set."""
    table = qmodel.calib_timesteps.tolist()
    pairs = []
    for step, t in enumerate(calib.t.tolist()):
        index = qmodel.set_index_for(t)
        if table[index] != t:
            raise ValueError(f"calibration timestep {t} is not in the QuantUNet's calib_timesteps {table}: build "
                             "the QuantUNet with calib_timesteps=calib.t.tolist()")
        pairs.append((step, index))
    return pairs


def init_act_quantizers(qmodel: "QuantUNet", calib: "CalibrationSet", method: str | None = None,
                        max_samples: int = 64, progress: bool | str = False) -> None:
    """Initialise every activation quantizer's sets from calibration data (specs §3.4 step 3).

    Per calibrated step: pin that step's set and forward ≤ ``max_samples`` samples of the step with
    weights and activations quantized, so each quantizer sees the data the quantized model feeds it.
    With one set (``per_step=False``) the samples of all steps go through in one batch. Leaves the
    model with weight and activation quantization on.
    """
    method = method or qmodel.cfg.act_init
    device = qmodel.calib_timesteps.device

    def run(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> None:
        qmodel(x.to(device), t.to(device), None if y is None else y.to(device))

    qmodel.set_quant_state(True, True)
    with _calibrating(qmodel, method), torch.no_grad():
        if qmodel.num_sets == 1:
            qmodel.set_act_set(0)
            run(*calib.flat(max_per_step=max_samples))
        else:
            for step, index in progress_bar(_check_steps(qmodel, calib), progress, "act init", unit="step"):
                qmodel.set_act_set(index)
                run(*calib.step(step, max_samples))
    missing = [name for name, q in qmodel.act_quantizers() if not q.initialized]
    if missing:
        raise RuntimeError(f"{len(missing)} activation quantizers got no data for some sets (first: {missing[:3]}); "
                           "the calibration set must cover every calibrated timestep and reach every layer")

"""AdaRound block reconstruction (BRECQ / Q-Diffusion style) of a QuantUNet's weight rounding.

Units are the diffusers ``ResnetBlock2D`` and ``Attention`` blocks plus every quantized layer
outside them (conv_in/out, time MLP, down/up-sampling convs). For each unit, in execution order,
the rounding variables α of its layers are optimised so the unit's output on the inputs the
*quantized* model feeds it matches the FP model's output of that unit (BRECQ's asymmetric
reconstruction), with AdaRound's annealed rounding regulariser; the decision is then frozen.

The quantized model is run ONCE over the calibration inputs: a pre-hook on each unit
reconstructs it from the inputs it is about to receive, and the forward continues with the
frozen rounding, so every later unit sees the quantized model's real inputs without re-running
the model from the start per unit.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn as nn

from vizoo.quant.init import progress_bar
from vizoo.quant.modules import QuantModule

if TYPE_CHECKING:
    from vizoo.quant.calibrate import CalibrationSet
    from vizoo.quant.model import QuantUNet

__all__ = ["reconstruct", "reconstruct_unit", "reconstruction_units", "temperature", "recon_loss"]


def _block_types() -> tuple[type, ...]:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D
    return (ResnetBlock2D, Attention)


def reconstruction_units(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the reconstruction units: ResNet blocks, attention blocks, other quantized layers."""
    blocks = _block_types()
    units: list[tuple[str, nn.Module]] = []
    for name, module in qmodel.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in units):
            continue
        if isinstance(module, blocks) or isinstance(module, QuantModule):
            if any(isinstance(m, QuantModule) for m in module.modules()):
                units.append((name, module))
    return units


def temperature(it: int, iters: int, b_range: Sequence[float] = (20, 2), warmup: float = 0.2) -> float | None:
    """AdaRound's β at iteration ``it``: None during warm-up (no regulariser), then linear from b_range[0] to [1]."""
    start = warmup * iters
    if it < start:
        return None
    rel = (it - start) / max(iters - start, 1)
    return b_range[1] + (b_range[0] - b_range[1]) * max(0.0, 1.0 - rel)


def recon_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over the rest (Q-Diffusion's ``lp_loss``)."""
    return (pred - target).pow(2).sum(1).mean()


def _take(value: Any, index: torch.Tensor, n: int) -> Any:
    """Rows ``index`` of every tensor with ``n`` rows in a (nested) argument structure."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return value[index]
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, index, n) for v in value)
    if isinstance(value, dict):
        return {k: _take(v, index, n) for k, v in value.items()}
    return value


@torch.no_grad()
def _unit_mse(unit: nn.Module, args: tuple, kwargs: dict, target: torch.Tensor, chunk: int = 256) -> float:
    n, total = target.shape[0], 0.0
    for i in range(0, n, chunk):
        index = torch.arange(i, min(i + chunk, n), device=target.device)
        out = unit(*_take(args, index, n), **_take(kwargs, index, n))
        total += recon_loss(out, target[index]).item() * len(index)
    return total / n


def reconstruct_unit(unit: nn.Module, args: tuple, kwargs: dict, target: torch.Tensor, iters: int,
                     batch_size: int = 16, reg_weight: float = 0.01, b_range: Sequence[float] = (20, 2),
                     warmup: float = 0.2, lr: float = 1e-3, generator: torch.Generator | None = None,
                     measure: bool = True) -> dict[str, float]:
    """Optimise the α of every QuantModule in ``unit`` so ``unit(*args, **kwargs)`` matches ``target``.

    ``args``/``kwargs`` hold the unit's inputs for all N calibration samples (tensors with N rows
    are sliced per mini-batch). Only α trains (Adam); afterwards the layers are in "hard" mode.
    Returns the reconstruction loss on all N samples before (current mode) and after.
    """
    layers = [m for m in unit.modules() if isinstance(m, QuantModule)]
    n = target.shape[0]
    saved = {p: p.requires_grad for p in unit.parameters()}
    for p in unit.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.use_weight_quant = True
    before = _unit_mse(unit, args, kwargs, target) if measure else float("nan")
    alphas = [layer.weight_quantizer.alpha for layer in layers]
    for layer, alpha in zip(layers, alphas):
        layer.weight_quantizer.mode = "soft"
        alpha.requires_grad_(True)
    optimizer = torch.optim.Adam(alphas, lr=lr, foreach=True)
    try:
        with torch.enable_grad():
            for it in range(iters):
                index = torch.randperm(n, generator=generator)[:batch_size].to(target.device)
                out = unit(*_take(args, index, n), **_take(kwargs, index, n))
                loss = recon_loss(out, target[index])
                b = temperature(it, iters, b_range, warmup)
                if b is not None and reg_weight > 0:
                    loss = loss + reg_weight * sum(layer.weight_quantizer.rounding_regularizer(b) for layer in layers)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for layer in layers:
            layer.weight_quantizer.mode = "hard"
            layer.weight_quantizer._soft_cache = None
        for p, flag in saved.items():
            p.requires_grad_(flag)
        for alpha in alphas:
            alpha.grad = None
    after = _unit_mse(unit, args, kwargs, target) if measure else float("nan")
    return {"mse_before": before, "mse_after": after}


def _fp_unit(fp_model: nn.Module, name: str) -> nn.Module:
    """The FP model's module for a QuantUNet unit name (``model.<path>`` → ``<path>``)."""
    path = name[len("model."):] if name.startswith("model.") else name
    return fp_model.get_submodule(path)


@torch.no_grad()
def _fp_targets(fp_model: nn.Module, units: list[tuple[str, nn.Module]], x: torch.Tensor, t: torch.Tensor,
                y: torch.Tensor | None, chunk: int) -> dict[str, torch.Tensor]:
    """Every unit's FP output on the FP model's own inputs (the reconstruction targets)."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name, _ in units}
    handles = []
    for name, _ in units:
        module = _fp_unit(fp_model, name)
        handles.append(module.register_forward_hook(lambda m, a, out, name=name: outputs[name].append(out.detach())))
    training = fp_model.training
    fp_model.eval()
    try:
        for i in range(0, x.shape[0], chunk):
            fp_model(x[i:i + chunk], t[i:i + chunk], None if y is None else y[i:i + chunk])
    finally:
        for handle in handles:
            handle.remove()
        fp_model.train(training)
    for name, parts in outputs.items():
        if not parts:
            raise RuntimeError(f"FP unit {name} never ran; does fp_model have the QuantUNet's architecture?")
    return {name: torch.cat(parts) for name, parts in outputs.items()}


def reconstruct(qmodel: "QuantUNet", fp_model: nn.Module | None, calib: "CalibrationSet", iters: int,
                batch_size: int = 16, reg_weight: float = 0.01, b_range: Sequence[float] = (20, 2),
                warmup: float = 0.2, progress: bool | str = False, lr: float = 1e-3,
                max_per_step: int | None = None, seed: int = 0, chunk: int = 256,
                measure: bool = False) -> list[dict[str, Any]]:
    """AdaRound every unit of ``qmodel`` in execution order (specs §3.4 step 2).

    Uses ≤ ``max_per_step`` samples of every calibrated step (timesteps mixed: activations are not
    quantized here). ``fp_model`` gives the targets (None: ``qmodel`` in FP mode, which is equal).
    Leaves ``qmodel`` with hard rounding, weight quantization on and activation quantization off.
    Returns one record per unit: name and, with ``measure``, the reconstruction loss on all samples
    before (round-to-nearest) and after (two extra passes over the data).
    """
    units = reconstruction_units(qmodel)
    x, t, y = calib.flat(max_per_step)
    device = qmodel.calib_timesteps.device
    x, t, y = x.to(device), t.to(device), None if y is None else y.to(device)
    if fp_model is None:
        qmodel.set_quant_state(False, False)  # FP mode is the float model, bit for bit
        fp_model = qmodel.model
    targets = _fp_targets(fp_model, units, x, t, y, chunk)
    generator = torch.Generator().manual_seed(seed)
    records: list[dict[str, Any]] = []
    bar = progress_bar(None, progress, "AdaRound", total=len(units), unit="block")
    handles = []

    def make_hook(name: str, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            handles[index].remove()  # the reconstruction calls the unit again
            target = targets.pop(name)
            stats = reconstruct_unit(module, args, kwargs, target, iters, batch_size, reg_weight, b_range, warmup,
                                     lr, generator, measure)
            records.append({"name": name, **stats})
            bar.set_postfix_str(name.removeprefix("model."), refresh=False)
            bar.update(1)
        return hook

    qmodel.set_quant_state(True, False)
    training = qmodel.training
    qmodel.eval()
    for index, (name, module) in enumerate(units):
        handles.append(module.register_forward_pre_hook(make_hook(name, index), with_kwargs=True))
    try:
        with torch.no_grad():
            qmodel(x, t, y)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
        qmodel.train(training)
    if targets:
        raise RuntimeError(f"units never ran in the forward, not reconstructed: {sorted(targets)[:5]}")
    qmodel.set_weight_mode("hard")
    return records

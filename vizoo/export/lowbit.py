"""Low-bit files of a QuEST-quantized UNet (``vizoo.quant.QuantUNet``): W4A8, W8A8, W4A4.

A QuantUNet is a fake-quant float model: every conv/linear rounds its input onto an 8- or 4-bit
grid (Δ, Z per set of timesteps) and its weight onto a per-output-channel grid (Δ, Z, AdaRound
codes). What a phone can run natively, and so what each precision becomes (specs §3.8):

- ``w4a8`` (CoreML, iOS 18): the 4-bit weight codes from ``AdaRoundQuantizer.int_weight`` stored
  as they are, as uint4 data of ``constexpr_blockwise_shift_scale`` with QuEST's per-channel Δ as
  scale and Z as offset (lossless: Core ML expands exactly QuEST's dequantized weights), and every
  quantized activation as a MIL ``quantize``/``dequantize`` pair with QuEST's calibrated (Δ, Z),
  not re-calibrated (coremltools' activation calibration needs Core ML, i.e. macOS). Computed in
  fp32, so the file reproduces the fake-quant model (up to float rounding at grid boundaries).
- ``w8a8`` (TFLite full integer; also CoreML like w4a8 with 8-bit codes): TFLite's int8 kernels
  take symmetric per-channel int8 weights and per-tensor int8 activations calibrated on each
  tensor, so the float graph carrying QuEST's dequantized 8-bit weights is quantized by
  ai-edge-quantizer (static, calibrated on the calibration inputs); QuEST's asymmetric weight grid
  does not map onto TFLite's symmetric one, so its scales are not carried (the report says so).
  The timestep's sinusoidal embedding stays float (int8 would round the timestep by ~4 steps).
- ``w4a4``: no runtime has 4-bit activation kernels, so it is a fake-quant float graph (round,
  clamp, mul: no speed-up, for accuracy studies), with per-channel A4 as the model has it.

Native formats hold ONE activation set: the model's only set (``QuantConfig(per_step=False)``),
else the set of one calibrated timestep (``act_set``; default the middle one) applied at every
timestep. Each file is verified against the QuantUNet configured identically (that set pinned).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .inputs import model_attr

#: precision -> (weight bits, activation bits)
LOWBIT_BITS = {"w4a8": (4, 8), "w8a8": (8, 8), "w4a4": (4, 4)}


@dataclass(frozen=True)
class LowBitPlan:
    """How one low-bit precision becomes a file in one format."""

    precision: str
    format: str
    #: "native": integer weights + quantize/dequantize (CoreML) or full-integer (TFLite) file;
    #: "fakequant": a float graph that rounds like the model
    kind: str
    #: activations in the converted graph: "qdq" (MIL quantize/dequantize), "float" (left to the
    #: TFLite quantizer) or "fakequant" (float round/clamp ops)
    acts: str
    #: weights in the converted graph: "codes" (integer codes + scale/offset) or "float" (QuEST's
    #: dequantized weights as float constants)
    weights: str
    #: the bounds it is judged with: "int8" of :data:`vizoo.export.verify.BOUNDS`, or "quant" /
    #: "fakequant": the fp32 bounds widened to the model's own float32 noise (``verify.quant_bounds``)
    judged_as: str


#: (precision, format) -> plan. w4a8 has no TFLite plan: TFLite has int4 weights only in a few
#: kernels [specs §3.8, unverified] and no int4 x int8 path XNNPACK runs.
PLANS: dict[tuple[str, str], LowBitPlan] = {
    ("w4a8", "coreml"): LowBitPlan("w4a8", "coreml", "native", "qdq", "codes", "quant"),
    ("w8a8", "coreml"): LowBitPlan("w8a8", "coreml", "native", "qdq", "codes", "quant"),
    ("w8a8", "tflite"): LowBitPlan("w8a8", "tflite", "native", "float", "float", "int8"),
    ("w4a4", "coreml"): LowBitPlan("w4a4", "coreml", "fakequant", "fakequant", "float", "fakequant"),
    ("w4a4", "tflite"): LowBitPlan("w4a4", "tflite", "fakequant", "fakequant", "float", "fakequant"),
}


def is_quant_unet(model: Any) -> bool:
    """A QuEST-quantized UNet (duck-typed: no import of vizoo.quant unless it is one)."""
    return type(model).__name__ == "QuantUNet" and hasattr(model, "quant_modules") and hasattr(model, "cfg")


def plan_for(precision: str, fmt: str) -> LowBitPlan:
    try:
        return PLANS[(precision, fmt)]
    except KeyError:
        fmts = sorted(f for p, f in PLANS if p == precision)
        raise ValueError(f"{fmt} has no {precision} file; {precision} exports to {', '.join(fmts)}") from None


def check_request(model: Any, precisions: Sequence[str], formats: Sequence[str], act_set: int | None = None) -> None:
    """One-line ValueError for a low-bit request that cannot be met, before any conversion."""
    low = [p for p in precisions if p in LOWBIT_BITS]
    if not low:
        return
    if not is_quant_unet(model):
        raise ValueError(
            f"precision {low[0]!r} exports a QuEST-quantized UNet (vizoo.quant.QuantUNet), not a "
            f"{type(model).__name__}: quantize it first (vizoo.quant.pipeline.quantize_unet) or ask for fp32/fp16/int8")
    cfg = model.cfg
    for p in low:
        w, a = LOWBIT_BITS[p]
        if (cfg.w_bits, cfg.a_bits) != (w, a):
            raise ValueError(f"precision {p!r} needs a QuantUNet quantized at W{w}A{a}; this one is {cfg.tag}")
        for f in formats:
            plan_for(p, f)
        if LOWBIT_BITS[p][1] == 8 and any(PLANS[(p, f)].acts == "qdq" for f in formats):
            if cfg.sm_abits != 8 or cfg.first_last_a_bits != 8 or cfg.act_per_channel:
                raise ValueError(f"a native {p} file holds per-tensor 8-bit activations; this QuantUNet has "
                                 f"sm_abits={cfg.sm_abits}, first_last_a_bits={cfg.first_last_a_bits}, "
                                 f"per-channel={cfg.act_per_channel}")
    uninit = [n for n, q in model.act_quantizers() if not q.initialized]
    if uninit:
        raise ValueError(f"the QuantUNet's activation quantizers are not calibrated ({uninit[0]} and "
                         f"{len(uninit) - 1} more): run vizoo.quant.init_act_quantizers first")
    if act_set is not None and not 0 <= int(act_set) < model.num_sets:
        raise ValueError(f"act_set={act_set} but the QuantUNet has {model.num_sets} activation set(s)")


def default_act_set(qunet: nn.Module, plan: LowBitPlan | None = None) -> int | None:
    """The activation set a file carries: the only one; else, for a native file, the middle
    calibrated timestep's; a fake-quant graph carries them all (None)."""
    if qunet.num_sets == 1:
        return 0
    return None if plan is not None and plan.acts == "fakequant" else qunet.num_sets // 2


def act_set_description(qunet: nn.Module, index: int | None) -> dict[str, Any]:
    """What the report says about the activation set(s) a file carries."""
    if qunet.num_sets == 1:
        return {"index": 0, "num_sets": 1, "choice": "the model's single activation set (per_step=False)"}
    if index is None:
        return {"index": None, "num_sets": qunet.num_sets, "timesteps": qunet.calib_timesteps.tolist(),
                "choice": f"all {qunet.num_sets} activation sets, chosen in the graph from the timestep (the "
                          "nearest calibrated timestep >= t, as the QuantUNet does)"}
    t = int(qunet.calib_timesteps[index])
    return {"index": index, "num_sets": qunet.num_sets, "timestep": t,
            "choice": f"the set calibrated at timestep {t} (of {qunet.calib_timesteps.tolist()}), applied at "
                      "every timestep: a native file has one set; verified against the QuantUNet with "
                      "that set pinned (set_act_set)"}


# --- the modules a deploy graph is made of ------------------------------------------------------
def _channel_shape(param: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """A [C] row shaped to broadcast along ``axis`` of an ``ndim`` tensor (as the quantizer does)."""
    if axis is None or param.numel() == 1:
        return param.reshape(())
    axis = axis % ndim
    return param.reshape((-1,) + (1,) * (ndim - axis - 1))


class QuantizeDequantize(nn.Module):
    """A per-tensor 8-bit activation grid as quantize -> dequantize ops (``quantized_decomposed``),
    which coremltools turns into MIL ``quantize``/``dequantize`` with this very scale and zero
    point."""

    enabled = True  # QuantModule reads its input quantizer's flag

    def __init__(self, delta: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int):
        super().__init__()
        self.scale = float(delta.reshape(-1)[0])
        self.zero_point = int(zero_point.reshape(-1)[0])
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.dtype = torch.uint8 if self.qmin >= 0 else torch.int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = _decomposed()
        q = qd.quantize_per_tensor(x, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)
        return qd.dequantize_per_tensor(q, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)


class SetIndex:
    """The activation set of the current call, shared by a graph's :class:`FakeQuant` modules: set
    by :class:`PerStepGraph` from the timestep before the UNet runs (a traced tensor, so it is part
    of the exported graph)."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None


class FakeQuant(nn.Module):
    """An activation grid as float ops, the same ops in the same order as the model's quantizer
    (x / Δ, round, + Z, clamp, − Z, · Δ): a fake-quant graph any converter takes.

    With one set (``delta``: [1, C]) the grid is constant; with several (``[S, C]``) the row is
    gathered at ``selector.index``, the set the timestep chose.
    """

    enabled = True

    def __init__(self, delta: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, axis: int | None,
                 selector: SetIndex | None = None):
        super().__init__()
        self.register_buffer("delta", delta.detach().clone().float().reshape(-1 if selector else 1, delta.shape[-1]))
        self.register_buffer("zero_point", zero_point.detach().clone().float().reshape(self.delta.shape))
        self.qmin, self.qmax, self.axis = float(qmin), float(qmax), axis
        self.selector = selector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.selector is None:
            delta, zero = self.delta[0], self.zero_point[0]
        else:  # a gather of one row (an index tensor, not .item(): it must stay in the graph)
            delta = torch.index_select(self.delta, 0, self.selector.index).reshape(-1)
            zero = torch.index_select(self.zero_point, 0, self.selector.index).reshape(-1)
        d = _channel_shape(delta, self.axis, x.ndim)
        z = _channel_shape(zero, self.axis, x.ndim)
        q = torch.clamp(torch.round(x / d) + z, self.qmin, self.qmax)
        return (q - z) * d


class PerStepGraph(nn.Module):
    """A fake-quant UNet with every calibrated activation set: the set of the nearest calibrated
    timestep >= t (the QuantUNet's rule, ``bisect_left`` on the sorted table, the last set above
    it) is chosen in the graph, by a comparison, a sum and a gather (specs §3.8)."""

    def __init__(self, net: nn.Module, calib_timesteps: torch.Tensor, selector: SetIndex):
        super().__init__()
        self.net = net
        self.register_buffer("table", calib_timesteps.detach().float().sort().values.clone())
        self.selector = selector
        for attr in ("pretrained_cfg", "export_task", "num_train_timesteps"):
            if hasattr(net, attr):
                setattr(self, attr, getattr(net, attr))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        t = timestep.reshape(-1)[:1].float()
        below = (self.table < t).sum().reshape(1)
        self.selector.index = torch.clamp(below, max=self.table.numel() - 1).to(torch.int32)  # Core ML: int32
        if class_labels is None:
            return self.net(sample, timestep)
        return self.net(sample, timestep, class_labels)


class PackedWeight(nn.Module):
    """A weight kept as integer codes + per-channel (Δ, Z): ``dequantize_per_channel`` of a
    constant, which coremltools stores as ``constexpr_blockwise_shift_scale`` (uint4 data for
    4-bit codes at iOS 18) instead of float weights."""

    def __init__(self, codes: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, bits: int):
        super().__init__()
        out = codes.shape[0]
        self.register_buffer("codes", codes.to(torch.uint8).contiguous())
        self.register_buffer("scale", delta.detach().reshape(out).float().clone())
        self.register_buffer("offset", zero_point.detach().reshape(out).round().to(torch.int32))
        self.qmax = 2 ** bits - 1

    def forward(self, weight: Any = None) -> torch.Tensor:
        return _decomposed().dequantize_per_channel(self.codes, self.scale, self.offset, 0, 0, self.qmax,
                                                    torch.uint8)


class FloatWeight(nn.Module):
    """A weight as a float constant (QuEST's dequantized weight, or the float weight for fp32)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().float())

    def forward(self, weight: Any = None) -> torch.Tensor:
        return self.weight


class DeployLayer(nn.Module):
    """A QuantModule as an export graph: input grid, then the layer's op with the weight module's
    weight. Built from the QuantModule's attributes only, so it does not depend on how the
    QuantModule caches or computes its fake-quant weight."""

    def __init__(self, layer: nn.Module, act: nn.Module, weight: nn.Module):
        super().__init__()
        self.kind = layer.kind
        self.act = act
        self.weight_source = weight
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        names = {"conv": ("stride", "padding", "dilation", "groups"), "linear": (),
                 "embedding": ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")}[self.kind]
        self.args = {n: getattr(layer, n) for n in names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_source()
        if self.kind == "conv":
            return F.conv2d(self.act(x), w, self.bias, **self.args)
        if self.kind == "linear":
            return F.linear(self.act(x), w, self.bias)
        return F.embedding(x, w, **self.args)


class _Off(nn.Module):
    """A disabled input quantizer (QuantModule skips it)."""

    enabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _decomposed() -> Any:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed ops)

    return torch.ops.quantized_decomposed


# --- building deploy graphs -----------------------------------------------------------------------
def weight_codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, Δ, Z) of a QuantModule's weight: the integers the file stores and their grid."""
    wq = module.weight_quantizer
    codes = wq.int_weight(module.weight.detach())
    return codes, wq.delta.detach(), wq.zero_point.detach()


def _check_offsets(name: str, zero_point: torch.Tensor, bits: int) -> None:
    z = zero_point.reshape(-1)
    if not (torch.equal(z, z.round()) and bool((z >= 0).all()) and bool((z <= 2 ** bits - 1).all())):
        raise ValueError(f"{name}: weight zero points {z.min().item():g}..{z.max().item():g} are not integers in "
                         f"[0, {2 ** bits - 1}]: they cannot be stored as uint{bits} offsets")


def _act_module(quantizer: nn.Module, mode: str, index: int | None, selector: SetIndex | None = None) -> nn.Module:
    """The export op of one activation quantizer: set ``index``, or every set (``index`` None,
    fake-quant only) chosen at run time through ``selector``."""
    if quantizer is None or mode == "off":  # quantized whether or not the model has it on now
        return _Off()
    if index is None:
        return FakeQuant(quantizer.delta_table(), quantizer.zero_point_table(), quantizer.qmin, quantizer.qmax,
                         quantizer.channel_axis, selector)
    delta, zero = quantizer.delta_table()[index], quantizer.zero_point_table()[index]
    if mode == "qdq":
        if quantizer.channel_axis is not None and delta.numel() > 1:
            raise ValueError(f"{quantizer.name}: per-channel activations have no native quantize op here")
        if quantizer.bits != 8:
            raise ValueError(f"{quantizer.name}: {quantizer.bits}-bit activations have no native Core ML op "
                             "(quantize is 8-bit)")
        return QuantizeDequantize(delta, zero, quantizer.qmin, quantizer.qmax)
    if mode == "fakequant":
        return FakeQuant(delta, zero, quantizer.qmin, quantizer.qmax, quantizer.channel_axis)
    return _Off()


def deploy_module(qunet: nn.Module, acts: str = "none", weights: str = "float", act_set: int | None = 0) -> nn.Module:
    """A copy of ``qunet``'s float UNet whose quantizers are replaced by plain export ops.

    ``acts``: "qdq", "fakequant" or "none" (float activations); ``weights``: "codes" (integer
    codes, :class:`PackedWeight`), "float" (QuEST's dequantized weights) or "fp" (the float
    weights the QuantUNet holds: its FP model). ``act_set``: the activation set the graph carries;
    None (fake-quant only): all of them, chosen from the timestep in the graph (:class:`PerStepGraph`).
    The copy is eval-mode and leaves ``qunet`` untouched.
    """
    from vizoo.quant.attention import ATTN_QUANTIZERS
    from vizoo.quant.modules import QuantModule

    if acts not in ("qdq", "fakequant", "none") or weights not in ("codes", "float", "fp"):
        raise ValueError(f"deploy_module: acts={acts!r}, weights={weights!r}")
    if act_set is None and acts != "fakequant":
        raise ValueError("only a fake-quant graph carries every activation set; a native file holds one (act_set)")
    net = copy.deepcopy(qunet.model).eval()
    mode = acts if acts != "none" else "off"
    selector = SetIndex() if act_set is None else None
    for name, module in list(net.named_modules()):
        if isinstance(module, QuantModule):
            if weights == "fp":
                wmod: nn.Module = FloatWeight(module.weight)
            elif weights == "float":
                wmod = FloatWeight(module.quantized_weight())
            else:
                codes, delta, zero = weight_codes(module)
                _check_offsets(name, zero, module.weight_quantizer.bits)
                wmod = PackedWeight(codes, delta, zero, module.weight_quantizer.bits)
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, DeployLayer(module, _act_module(module.act_quantizer, mode, act_set, selector),
                                              wmod))
            continue
        for attr in ATTN_QUANTIZERS:
            q = getattr(module, attr, None)
            if q is not None and not isinstance(q, (QuantizeDequantize, FakeQuant, _Off)):
                setattr(module, attr, _act_module(q, mode, act_set, selector))
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "explicit"):
            processor.explicit = acts != "none"  # the quantized operands need the explicit matmuls
    for attr in ("pretrained_cfg", "export_task", "num_train_timesteps"):
        value = model_attr(qunet, attr)
        if value is not None:
            setattr(net, attr, copy.deepcopy(value))
    if selector is not None:
        return PerStepGraph(net, qunet.calib_timesteps, selector).eval()
    return net


class PinnedReference(nn.Module):
    """The fake-quant QuantUNet configured as a file is: weights and activations quantized,
    activation set ``act_set`` at every timestep (None: the set of each timestep, the model's own
    per-step rule). Restores the model's own state after each call."""

    def __init__(self, qunet: nn.Module, act_set: int | None):
        super().__init__()
        self.qunet = qunet
        self.act_set = None if act_set is None else int(act_set)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None
                ) -> torch.Tensor:
        q = self.qunet
        saved_fixed = getattr(q, "_fixed_set", None)
        saved_weight = {n: m.use_weight_quant for n, m in q.quant_modules()}
        saved_act = bool(getattr(q, "_act_on", True))
        q.set_quant_state(True, True)
        q.set_act_set(self.act_set)
        try:
            return q(sample, timestep, class_labels)
        finally:
            q.set_act_set(saved_fixed)
            q.set_quant_state(False, saved_act)
            for n, m in q.quant_modules():
                m.use_weight_quant = saved_weight[n]


class LowBitPair(nn.Module):
    """The graph to convert beside the model it is judged against, in one module tree, so the
    exporter's export forms (``export_mode``: GroupNorm's exact export form, ...) apply to both."""

    def __init__(self, deploy: nn.Module, reference: nn.Module):
        super().__init__()
        self.deploy = deploy
        self.reference = reference

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.deploy(*args)


def float_model(qunet: nn.Module) -> nn.Module:
    """The QuantUNet's float model as an exportable module (its current float weights, no
    quantizers): what the ``fp32``/``fp16``/``int8`` files of a QuantUNet are made from."""
    return deploy_module(qunet, acts="none", weights="fp")


def precision_spec(spec: Any, qunet: nn.Module, precision: str, fmt: str, act_set: int | None = None) -> Any:
    """The ModelSpec of one low-bit file: ``module`` is the deploy graph, ``reference_module`` the
    fake-quant model it is verified against. Cached on ``spec`` (both formats share the graph)."""
    plan = plan_for(precision, fmt)
    index = default_act_set(qunet, plan) if act_set is None else int(act_set)
    key = ("lowbit_spec", plan.acts, plan.weights, index)
    if key not in spec.cache:
        deploy = deploy_module(qunet, acts="none" if plan.acts == "float" else plan.acts,
                               weights=plan.weights, act_set=index)
        pair = LowBitPair(deploy, PinnedReference(qunet, index)).eval()
        spec.cache[key] = dataclasses.replace(
            spec, model=pair, module=deploy, reference_module=pair.reference, cache={}, functions={},
            name=spec.name, export_aware=spec.export_aware)
    lspec = spec.cache[key]
    lspec.cache["lowbit"] = {"plan": plan, "act_set": act_set_description(qunet, index),
                             "config": qunet.cfg.to_dict(), "qunet": qunet}
    return lspec


def lowbit_details(lspec: Any, fmt: str | None = None, path: Any = None) -> dict[str, Any]:
    """What the report records about a low-bit file's quantization; for a Core ML file with
    integer weights also the value-by-value checks of its weights and activation grids."""
    info = lspec.cache["lowbit"]
    plan: LowBitPlan = info["plan"]
    out: dict[str, Any] = {"kind": plan.kind, "activations": plan.acts, "weights": plan.weights,
                           "quant_config": info["config"], "activation_set": info["act_set"],
                           "verified_against": "the fake-quant QuantUNet (weights and activations quantized, " + (
                               "its own per-timestep sets)" if info["act_set"]["index"] is None and
                               info["act_set"]["num_sets"] > 1 else "the file's activation set pinned)")}
    if plan.kind == "fakequant":
        out["note"] = ("a float graph that rounds like the model (no 4-bit activation kernels exist on Core ML "
                       "or TFLite): for accuracy studies, no speed-up")
    if fmt == "coreml" and plan.weights == "codes" and path is not None:
        try:
            out["weights_lossless"] = coreml_weight_check(path, info["qunet"])
            out["activation_grids"] = coreml_activation_check(path, info["qunet"], info["act_set"]["index"])
        except Exception as e:  # noqa: BLE001 - a check that cannot read the file says so, the export stands
            out["check_error"] = f"{type(e).__name__}: {e}"
    return out


# --- checking a file ------------------------------------------------------------------------------
def coreml_weight_check(path: Any, qunet: nn.Module) -> dict[str, Any]:
    """Value-by-value check that a Core ML package's int weights ARE the QuantUNet's weights.

    For every quantized layer, the package must hold a ``constexpr_blockwise_shift_scale`` whose
    data equal the layer's codes (``int_weight``), whose scale and offset equal its Δ and Z
    bit for bit, and whose expansion ``scale * (data - offset)`` (what Core ML computes at load)
    equals the layer's dequantized weight (``quantized_weight``) bit for bit. Layers are matched by
    their codes (the package's names are not the model's). Returns counts and the worst difference.
    """
    import numpy as np

    from . import mil

    program = mil.load_program(path)
    stored = []
    for op in program.function.operations:
        if op.op_type != "constexpr_blockwise_shift_scale":
            continue
        data = np.asarray(op.inputs["data"].val)
        scale = np.asarray(op.inputs["scale"].val, dtype=np.float32)
        offset = np.asarray(op.inputs["offset"].val) if "offset" in op.inputs else np.zeros_like(scale)
        stored.append((op.name, data, scale, offset))
    unused = list(range(len(stored)))
    layers, exact, worst, missing = 0, 0, 0.0, []
    for name, module in qunet.quant_modules():
        layers += 1
        codes, delta, zero = weight_codes(module)
        codes_np = codes.numpy()
        want = module.quantized_weight().float().numpy()
        hit = next((i for i in unused if stored[i][1].shape == codes_np.shape
                    and np.array_equal(stored[i][1].astype(np.int64), codes_np)), None)
        if hit is None:
            missing.append(name)
            continue
        unused.remove(hit)
        _, data, scale, offset = stored[hit]
        got = (scale * (data.astype(np.float32) - offset.astype(np.float32))).astype(np.float32)
        same_grid = (np.array_equal(scale.reshape(-1), delta.float().numpy().reshape(-1))
                     and np.array_equal(offset.reshape(-1).astype(np.float64), zero.double().numpy().reshape(-1)))
        diff = float(np.abs(got - want).max()) if want.size else 0.0
        worst = max(worst, diff)
        exact += int(same_grid and np.array_equal(got, want))
    return {"layers": layers, "matched": layers - len(missing), "bit_identical": exact,
            "max_abs_diff": worst, "unmatched_layers": missing[:5],
            "lossless": exact == layers and not missing}


def coreml_activation_check(path: Any, qunet: nn.Module, act_set: int) -> dict[str, Any]:
    """Which of the QuantUNet's activation grids (set ``act_set``) the package's MIL ``quantize``
    ops carry, compared as (scale bit for bit, zero point on the uint8 grid): coremltools may
    store a uint8 grid as int8 with the zero point moved by 128, which is the same grid."""
    import numpy as np
    from coremltools.converters.mil.mil import types

    from . import mil

    grids = set()
    for op in mil.load_program(path).function.operations:
        if op.op_type != "quantize":
            continue
        scale = np.float32(np.asarray(op.inputs["scale"].val).reshape(-1)[0])
        zp = int(np.asarray(op.inputs["zero_point"].val).reshape(-1)[0]) if "zero_point" in op.inputs else 0
        if types.builtin_to_string(op.outputs[0].dtype) == "int8":
            zp += 128
        grids.add((scale.tobytes(), zp))
    names = [n for n, _ in qunet.act_quantizers()]
    carried = []
    for name, q in qunet.act_quantizers():
        delta = np.float32(q.delta_table()[act_set].reshape(-1)[0])
        zero = int(q.zero_point_table()[act_set].reshape(-1)[0]) - (q.qmin if q.qmin < 0 else 0)
        if (delta.tobytes(), zero) in grids:
            carried.append(name)
    missing = [n for n in names if n not in carried]
    return {"quantizers": len(names), "carried": len(carried), "quantize_ops": len(grids),
            "missing": missing[:5]}

"""Uniform affine fake-quantizers: activations with per-set tables, weights with AdaRound.

QuEST/Q-Diffusion quantize with x̂ = clamp(round(x/Δ) + Z, q_min, q_max), x̃ = (x̂ − Z)·Δ and pass
gradients straight through the rounding (STE), so a fake-quant float graph can be finetuned and
exported. Two quantizers cover the method:

- :class:`UniformQuantizer` for activations. A diffusion model sees very different activation
  ranges at different timesteps, so it holds one (Δ, Z) row per *set* (a calibrated timestep);
  the owner picks the row with ``set_index``. Δ is an ``nn.ParameterList`` (one tensor a set) so
  Adam leaves the rows of the other timesteps untouched, Z a buffer; both live in the
  ``state_dict`` and move with ``.to()``.
- :class:`AdaRoundQuantizer` for weights: per-output-channel (Δ, Z) and a learned rounding
  decision ``alpha`` (AdaRound, Nagel et al. 2020), with a soft mode for reconstruction, a hard
  mode that freezes the decision and a round-to-nearest mode.

This module imports only torch (``vizoo.layers`` rule).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

__all__ = ["round_ste", "floor_ste", "fake_quant", "affine_params", "lp_error", "UniformQuantizer",
           "AdaRoundQuantizer", "ADAROUND_ZETA", "ADAROUND_GAMMA", "WEIGHT_MODES"]

#: stretch of the rectified sigmoid h(α) = clamp(σ(α)(ζ − γ) + γ, 0, 1) (AdaRound eq. 23)
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1
#: the weight quantizer's forward modes
WEIGHT_MODES = ("soft", "hard", "nearest")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator).

    Written as round(x) + (x − x.detach()) so the forward value is exactly round(x) (the usual
    (round(x) − x).detach() + x can be off by an ulp, which would break bit-exact export checks).
    """
    return x.round() + (x - x.detach())


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor with a straight-through gradient, so a finetuned FP weight still learns under hard AdaRound."""
    return x.floor() + (x - x.detach())


def fake_quant(x: torch.Tensor, delta: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize and dequantize ``x`` on the grid (Δ, Z, [q_min, q_max]); STE on the rounding.

    The gradient w.r.t. Δ is the LSQ one, which the activation-scale finetuning relies on. Without
    autograd the chain runs in place, which keeps the quantized forward close to the float one.
    """
    if torch.is_grad_enabled() and (x.requires_grad or delta.requires_grad):
        q = torch.clamp(round_ste(x / delta) + zero_point, qmin, qmax)
        return (q - zero_point) * delta
    return x.div(delta).round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(delta)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, unsigned: bool = False,
                  symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, Z) of the grid that covers [lo, hi] (both widened to contain 0, so 0 is exact).

    ``unsigned``: non-negative data (softmax output), Z = 0 on [0, 2^b − 1];
    ``symmetric``: Z = 0 on [−2^(b−1), 2^(b−1) − 1]; otherwise asymmetric on [0, 2^b − 1] with an
    integer Z in range (an export format needs an integer zero point).
    """
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    levels = 2 ** bits - 1
    if unsigned:
        delta = hi / levels
        zero = torch.zeros_like(delta)
    elif symmetric:
        delta = torch.maximum(hi, -lo) / (2 ** (bits - 1) - 1 if bits > 1 else 1)
        zero = torch.zeros_like(delta)
    else:
        delta = (hi - lo) / levels
        zero = None
    delta = delta.clamp_min(1e-8)
    if zero is None:
        zero = torch.round(-lo / delta).clamp_(0, levels)
    return delta, zero


def lp_error(x: torch.Tensor, xq: torch.Tensor, p: float, dims: Sequence[int]) -> torch.Tensor:
    """Mean |x − x_q|^p over ``dims`` (LAPQ's L_p range criterion; Q-Diffusion uses p = 2.4 for weights)."""
    diff = x - xq
    diff = diff.square_() if p == 2 else diff.abs_().pow_(p)
    return diff.mean(dim=tuple(dims))


def _grid(bits: int, unsigned: bool, symmetric: bool) -> tuple[int, int]:
    if symmetric and not unsigned:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _channel_view(row: torch.Tensor, axis: int | None, ndim: int) -> torch.Tensor:
    """Shape a [C] row so it broadcasts along ``axis`` of an ``ndim`` tensor (a [1] row broadcasts anywhere)."""
    if axis is None or row.numel() == 1:
        return row.reshape(())
    axis = axis % ndim
    return row.reshape((-1,) + (1,) * (ndim - axis - 1))


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """[C, N] view of ``x`` for per-channel statistics ([1, N] when per tensor)."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis % x.ndim, 0).reshape(x.shape[axis], -1)


class UniformQuantizer(nn.Module):
    """Activation fake-quantizer with ``num_sets`` rows of (Δ, Z), per tensor or per channel.

    ``channel_axis``: None for one (Δ, Z) per tensor; else the axis of ``x`` holding the
    ``num_channels`` channels (1 for a conv input [B, C, H, W], −1 for a token input [B, T, C]).
    Disabled (``enabled = False``) it is the identity, so the float graph is untouched. With
    ``calibrate`` set to "minmax" or "percentile" a forward first initialises the current row from
    the data it sees (Q-Diffusion's lazy init), then quantizes.
    """

    def __init__(self, bits: int = 8, unsigned: bool = False, channel_axis: int | None = None, num_sets: int = 1,
                 num_channels: int = 1, symmetric: bool = False,
                 percentiles: Sequence[float] = (0.999, 0.9999, 0.99999)):
        super().__init__()
        if bits < 2 or bits > 16:
            raise ValueError(f"UniformQuantizer: bits={bits} is outside 2..16")
        self.bits = int(bits)
        self.unsigned = bool(unsigned)
        self.symmetric = bool(symmetric)
        self.channel_axis = channel_axis
        self.num_channels = int(num_channels) if channel_axis is not None else 1
        self.qmin, self.qmax = _grid(self.bits, self.unsigned, self.symmetric)
        self.percentiles = tuple(percentiles)
        self.delta = nn.ParameterList([nn.Parameter(torch.ones(self.num_channels)) for _ in range(num_sets)])
        self.register_buffer("zero_point", torch.zeros(num_sets, self.num_channels))
        self.register_buffer("initialized_sets", torch.zeros(num_sets, dtype=torch.bool))
        self.set_index = 0
        self.enabled = False
        self.calibrate: str | None = None
        self.name = ""  # set by the owner, for error messages

    @property
    def num_sets(self) -> int:
        return len(self.delta)

    @property
    def initialized(self) -> bool:
        """True when every set has parameters."""
        return bool(self.initialized_sets.all())

    def delta_table(self) -> torch.Tensor:
        """Δ of all sets, [num_sets, C] (C = 1 per tensor), detached (for export and inspection)."""
        return torch.stack([d.detach() for d in self.delta])

    def zero_point_table(self) -> torch.Tensor:
        """Z of all sets, [num_sets, C]."""
        return self.zero_point.detach().clone()

    def _is_ready(self, index: int) -> bool:
        """Whether set ``index`` has parameters, from a host-side copy of ``initialized_sets``.

        Reading one element of a tensor per quantizer per forward is a measurable cost (and a device
        sync on GPU); the copy is refreshed whenever the buffer changes (its version counter moves).
        """
        version = (self.initialized_sets._version, self.initialized_sets.data_ptr())
        if getattr(self, "_ready_version", None) != version:
            self._ready = self.initialized_sets.tolist()
            self._ready_version = version
        return self._ready[index]

    def row(self, index: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δ, Z) rows of set ``index`` (default: the current ``set_index``), each [C]."""
        i = self.set_index if index is None else index
        return self.delta[i], self.zero_point[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        i = self.set_index
        if not self._is_ready(i):
            if self.calibrate is None:
                raise RuntimeError(
                    f"activation quantizer {self.name or '(unnamed)'} has no parameters for set {i}: run "
                    "vizoo.quant.init_act_quantizers(qmodel, calib) first, or disable activation quantization "
                    "with set_quant_state(weight, act=False)")
            self.init_from(x, self.calibrate)
        delta = _channel_view(self.delta[i], self.channel_axis, x.ndim)
        zero = _channel_view(self.zero_point[i], self.channel_axis, x.ndim)
        return fake_quant(x, delta, zero, self.qmin, self.qmax)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, method: str = "minmax", index: int | None = None) -> None:
        """Set row ``index`` (default current) from data: min–max, or the percentile pair with least L2 error."""
        i = self.set_index if index is None else index
        flat = _channels_first(x.detach().float(), self.channel_axis)
        if method == "minmax":
            delta, zero = affine_params(flat.amin(1), flat.amax(1), self.bits, self.unsigned, self.symmetric)
        elif method == "percentile":
            delta, zero = self._percentile_search(flat)
        else:
            raise ValueError(f"unknown activation init {method!r}; use 'minmax' or 'percentile'")
        self.delta[i].data.copy_(delta.to(self.delta[i]))
        self.zero_point[i].copy_(zero.to(self.zero_point))
        self.initialized_sets[i] = True

    def _percentile_search(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel, the clipping percentile in ``percentiles`` whose grid has the least L2 error.

        One ``topk`` per tail serves all percentiles (a full sort per quantizer and step is slow).
        """
        n = flat.shape[1]
        ks = [max(int(round((1.0 - p) * (n - 1))), 0) for p in self.percentiles]
        kmax = min(max(ks) + 1, n)
        top = flat.topk(kmax, dim=1, largest=True, sorted=True).values
        bottom = flat.topk(kmax, dim=1, largest=False, sorted=True).values
        his = torch.stack([top[:, k] for k in ks])          # [P, C]
        los = torch.stack([bottom[:, k] for k in ks])
        delta, zero = affine_params(los, his, self.bits, self.unsigned, self.symmetric)  # [P, C]
        xq = fake_quant(flat.unsqueeze(0), delta.unsqueeze(-1), zero.unsqueeze(-1), self.qmin, self.qmax)
        err = lp_error(flat.unsqueeze(0), xq, 2.0, dims=(2,))  # [P, C]
        best = err.argmin(0, keepdim=True)
        return delta.gather(0, best)[0], zero.gather(0, best)[0]

    def extra_repr(self) -> str:
        kind = ("per-tensor" if self.channel_axis is None
                else f"per-channel(axis={self.channel_axis}, C={self.num_channels})")
        sign = "unsigned" if self.unsigned else ("symmetric" if self.symmetric else "asymmetric")
        return f"bits={self.bits}, {sign}, {kind}, num_sets={self.num_sets}, enabled={self.enabled}"


class AdaRoundQuantizer(nn.Module):
    """Per-output-channel weight fake-quantizer with a learned rounding decision (AdaRound).

    The weight is floored on its grid and ``alpha`` (one value a weight) decides up or down:
    ``soft`` adds h(α) ∈ [0, 1] (block reconstruction optimises α), ``hard`` adds 1[α ≥ 0] (the frozen
    decision; floor-STE lets the FP weight keep learning, as QuEST finetunes it), ``nearest`` rounds
    to nearest (RTN). α is initialised so that h(α) equals the fractional part, i.e. hard = RTN
    before any reconstruction.
    """

    def __init__(self, bits: int, weight_shape: Sequence[int], channel_axis: int = 0):
        super().__init__()
        if bits < 2 or bits > 16:
            raise ValueError(f"AdaRoundQuantizer: bits={bits} is outside 2..16")
        self.bits = int(bits)
        self.qmin, self.qmax = 0, 2 ** self.bits - 1
        self.channel_axis = channel_axis
        shape = [1] * len(weight_shape)
        shape[channel_axis] = weight_shape[channel_axis]
        self.register_buffer("delta", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape))
        self.alpha = nn.Parameter(torch.zeros(tuple(weight_shape)), requires_grad=False)
        self.mode = "nearest"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in WEIGHT_MODES:
            raise ValueError(f"weight quantizer mode must be one of {WEIGHT_MODES}, got {value!r}")
        self._mode = value

    @torch.no_grad()
    def set_params(self, delta: torch.Tensor, zero_point: torch.Tensor, weight: torch.Tensor) -> None:
        """Adopt a per-channel grid and reset α so the hard decision equals round-to-nearest of ``weight``."""
        self.delta.copy_(delta.reshape(self.delta.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        rest = weight / self.delta - torch.floor(weight / self.delta)  # in [0, 1)
        # h(α) = rest  ⇔  σ(α) = (rest − γ)/(ζ − γ)
        self.alpha.copy_(-torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1))

    def soft_targets(self) -> torch.Tensor:
        """h(α): the rectified sigmoid relaxation of the up/down decision."""
        return torch.clamp(torch.sigmoid(self.alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)

    def rounding_regularizer(self, b: float) -> torch.Tensor:
        """Σ 1 − |2h(α) − 1|^b: pushes every h(α) to 0 or 1 as b anneals from large to small."""
        return (1 - (2 * self.soft_targets() - 1).abs().pow(b)).sum()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scaled = w / self.delta
        if self.mode == "nearest":
            q = round_ste(scaled)
        elif self.mode == "soft":
            base, inside = self._soft_base(w)
            return (base + inside * self.soft_targets() - self.zero_point) * self.delta
        else:
            q = floor_ste(scaled) + (self.alpha >= 0).to(w.dtype)
        q = torch.clamp(q + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.delta

    @torch.no_grad()
    def _soft_base(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """clamp(⌊w/Δ⌋ + Z) and the mask of weights whose code can still move up by h(α).

        clamp(⌊w/Δ⌋ + Z + h, 0, q_max) equals base + mask·h for h ∈ [0, 1]; both are constant during a
        reconstruction, so they are computed once per weight (the clamp's backward was ~10 % of it).
        """
        key = (w.data_ptr(), w._version, self.delta._version, self.zero_point._version, w.dtype, w.device)
        cache = getattr(self, "_soft_cache", None)
        if cache is None or cache[0] != key:
            floor = torch.floor(w / self.delta) + self.zero_point
            inside = ((floor >= self.qmin) & (floor < self.qmax)).to(w.dtype)
            cache = (key, floor.clamp(self.qmin, self.qmax), inside)
            self._soft_cache = cache
        return cache[1], cache[2]

    @torch.no_grad()
    def int_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Integer codes in [0, 2^bits − 1] (LongTensor) as the forward uses them (soft counts as hard)."""
        scaled = w / self.delta
        if self.mode == "nearest":
            q = scaled.round()
        else:
            q = scaled.floor() + (self.alpha >= 0).to(w.dtype)
        return torch.clamp(q + self.zero_point, self.qmin, self.qmax).long()

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Float weight from integer codes: (codes − Z)·Δ, bit-identical to the forward's result."""
        return (codes.to(self.delta.dtype) - self.zero_point) * self.delta

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-channel(axis={self.channel_axis}), mode={self.mode}"

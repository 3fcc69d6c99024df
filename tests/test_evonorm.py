"""EvoNorm layers against two independent references: timm's layers (same parameters, timm mode)
and a NumPy transcription of the TF reference formulas (paper mode)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import timm.layers as tl

from vizoo.layers.evonorm import (EvoNorm2dB0, EvoNorm2dB1, EvoNorm2dS0, EvoNorm2dS0a, EvoNorm2dS1,
                                  resolve_num_groups)

TOL = dict(rtol=1e-5, atol=1e-5)

# (ours with timm's numbers, timm's layer)
PAIRS = {
    "b0": (lambda c, **kw: EvoNorm2dB0(c, timm_compatible=True, **kw), tl.EvoNorm2dB0),
    "b1": (lambda c, **kw: EvoNorm2dB1(c, timm_compatible=True, **kw), tl.EvoNorm2dB1),
    "s0": (lambda c, **kw: EvoNorm2dS0(c, timm_compatible=True, **kw), tl.EvoNorm2dS0),
    "s0a": (lambda c, **kw: EvoNorm2dS0a(c, timm_compatible=True, **kw), tl.EvoNorm2dS0a),
    "s1": (lambda c, **kw: EvoNorm2dS1(c, timm_compatible=True, **kw), tl.EvoNorm2dS1),
}


def _randomise(layer: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)


def _pair(kind: str, channels: int, apply_act: bool = True):
    make_ours, timm_cls = PAIRS[kind]
    theirs = timm_cls(channels, apply_act=apply_act)
    _randomise(theirs, seed=1)
    ours = make_ours(channels, apply_act=apply_act)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("apply_act", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_matches_timm_forward_backward(kind, apply_act, training):
    ours, theirs = _pair(kind, 64, apply_act)
    ours.train(training)
    theirs.train(training)
    g = torch.Generator().manual_seed(2)
    if not training and hasattr(theirs, "running_var"):  # a non-trivial running variance
        rv = torch.rand(64, generator=g) * 3 + 0.2
        theirs.running_var.copy_(rv)
        ours.running_var.copy_(rv)
    x = (torch.randn(4, 64, 6, 5, generator=g) * 2 + 0.3)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, **TOL)
    w = torch.randn(ya.shape, generator=g)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **TOL, msg=f"grad of {name}")


@pytest.mark.parametrize("kind", ["b0", "b1"])
def test_running_var_update_matches_timm(kind):
    ours, theirs = _pair(kind, 32)
    ours.train()
    theirs.train()
    g = torch.Generator().manual_seed(3)
    for step in range(4):
        x = torch.randn(3, 32, 4, 4, generator=g) * (1 + step)
        ours(x)
        theirs(x)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **TOL)
    assert not torch.allclose(ours.running_var, torch.ones(32))


@pytest.mark.parametrize("kind", sorted(PAIRS))
def test_timm_state_dict_loads_strictly(kind):
    ours, theirs = _pair(kind, 96)
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
           {k: v.shape for k, v in theirs.state_dict().items()}
    fresh = PAIRS[kind][0](96)
    fresh.load_state_dict(theirs.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_old_timm_shapes_load():
    """timm <= 0.4 stored (1, C, 1, 1) parameters and running_var."""
    old = {"weight": torch.randn(1, 16, 1, 1), "bias": torch.randn(1, 16, 1, 1),
           "v": torch.randn(1, 16, 1, 1), "running_var": torch.rand(1, 16, 1, 1)}
    layer = EvoNorm2dB0(16)
    layer.load_state_dict(dict(old), strict=True)
    for k, v in old.items():
        torch.testing.assert_close(layer.state_dict()[k], v.flatten())


# --- paper mode vs a NumPy transcription of the TF reference (tensorflow/tpu resnet_model.py) -------

def _np_moments_var(x: np.ndarray, axes) -> np.ndarray:
    return ((x - x.mean(axis=axes, keepdims=True)) ** 2).mean(axis=axes, keepdims=True)


def _tf_groups(c: int, g: int = 32) -> int:
    while g > 1:
        if c % g == 0:
            break
        g -= 1
    return g


def _np_evonorm_s0(x, gamma, beta, v, eps=1e-5, groups=32):
    n, c, h, w = x.shape
    g = _tf_groups(c, groups)
    xg = x.reshape(n, g, c // g, h, w)
    std = np.sqrt(_np_moments_var(xg, (2, 3, 4)) + eps)
    den = np.broadcast_to(std, xg.shape).reshape(x.shape)
    sig = 1 / (1 + np.exp(-v * x))
    return x * sig / den * gamma + beta


def _np_evonorm_b0(x, gamma, beta, v, moving_variance, training, eps=1e-5, decay=0.9):
    if training:
        var = _np_moments_var(x, (0, 2, 3))
        moving_variance = moving_variance - (moving_variance - var) * (1 - decay)
    else:
        var = moving_variance
    left = np.sqrt(var + eps)
    right = v * x + np.sqrt(_np_moments_var(x, (2, 3)) + eps)
    return x / np.maximum(left, right) * gamma + beta, moving_variance


def _params(layer, c):
    to = lambda t: t.detach().double().numpy().reshape(1, c, 1, 1)  # noqa: E731
    return to(layer.weight), to(layer.bias), to(layer.v)


@pytest.mark.parametrize("channels", [64, 40, 144, 24])
def test_s0_paper_mode_matches_tf_formula(channels):
    layer = EvoNorm2dS0(channels)
    _randomise(layer, seed=4)
    x = torch.randn(3, channels, 5, 7, generator=torch.Generator().manual_seed(5)) * 1.5 + 0.2
    ref = _np_evonorm_s0(x.double().numpy(), *_params(layer, channels))
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert layer.groups == _tf_groups(channels)


def test_tf_group_fallback_values_from_spec():
    # spec §4.1: C=24 -> 24, 40 -> 20, 80 -> 20, 144 -> 24
    assert [resolve_num_groups(c) for c in (24, 40, 80, 144, 256)] == [24, 20, 20, 24, 32]
    with pytest.raises(ValueError, match="do not divide"):
        EvoNorm2dS0(40, timm_compatible=True)
    assert EvoNorm2dS0(40, group_size=8, timm_compatible=True).groups == 5


def test_b0_paper_mode_matches_tf_formula_train_and_eval():
    c = 32
    layer = EvoNorm2dB0(c)
    assert layer.eps == 1e-5
    _randomise(layer, seed=6)
    g = torch.Generator().manual_seed(7)
    mv = np.ones((1, c, 1, 1))
    layer.train()
    for _ in range(3):
        x = torch.randn(4, c, 5, 5, generator=g) * 2 - 0.5
        ref, mv = _np_evonorm_b0(x.double().numpy(), *_params(layer, c), mv, training=True)
        np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.running_var.numpy(), mv.ravel(), rtol=1e-5)  # biased, decay 0.9
    layer.eval()
    x = torch.randn(2, c, 6, 6, generator=g)
    ref, _ = _np_evonorm_b0(x.double().numpy(), *_params(layer, c), mv, training=False)
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [EvoNorm2dB0, EvoNorm2dS0])
def test_nonlinearity_off_is_affine_only(cls):
    layer = cls(16, apply_act=False)
    _randomise(layer, seed=8)
    assert layer.v is None
    x = torch.randn(2, 16, 3, 3) * 5
    expected = x * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer.train()(x), expected)
    torch.testing.assert_close(layer.eval()(x), expected)


@pytest.mark.parametrize("cls", [EvoNorm2dB0, EvoNorm2dS0])
def test_half_precision_statistics_do_not_overflow(cls):
    """x² of 400 overflows float16 (max 65504); the statistics are taken in float32."""
    layer = cls(32).eval()
    x = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(9)) * 400
    ref = layer(x)
    out = layer.half()(x.half()).float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_s0_export_graph_is_at_most_4d():
    layer = EvoNorm2dS0(64).eval()
    ep = torch.export.export(layer, (torch.randn(1, 64, 8, 8),))
    ranks = {len(n.meta["val"].shape) for n in ep.graph.nodes if "val" in n.meta
             and isinstance(n.meta["val"], torch.Tensor)}
    assert max(ranks) == 4, ranks


def test_rejects_non_4d_input():
    with pytest.raises(ValueError, match="4-D"):
        EvoNorm2dS0(8)(torch.randn(2, 8, 4))

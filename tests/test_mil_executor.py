"""The MIL reference executor against PyTorch, on real converted and saved ML Programs.

Most tests convert a tiny module the way the exporter does (torch.export ->
run_decompositions -> coremltools ML Program), save the .mlpackage, read it back with
vizoo.export.mil and compare the executor's outputs with the PyTorch module's; they also
assert which MIL ops the program holds, so a test fails if the converter stops emitting the op
it is meant to exercise. Ops the torch frontend rarely emits are checked on programs built with
coremltools' MIL builder, against torch functions. Compressed weights are checked against
coremltools' own decompression as well as PyTorch.
"""
from __future__ import annotations

import math
from pathlib import Path

import coremltools as ct
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vizoo.export.mil import (
    ExecutionError,
    UnsupportedOpError,
    load_program,
    run_mlpackage,
    supported_ops,
    unsupported_ops,
)


# --------------------------------------------------------------------------- helpers
def export(module: nn.Module, example: tuple, path: Path, *, inputs=None, **convert_kwargs) -> Path:
    """Convert exactly as the exporter does and save the package."""
    module = module.eval()
    with torch.no_grad():
        program = torch.export.export(module, example).run_decompositions({})
    if inputs is None:
        inputs = [ct.TensorType(name=f"x{i}", shape=t.shape) for i, t in enumerate(example)]
    convert_kwargs.setdefault("minimum_deployment_target", ct.target.iOS17)
    convert_kwargs.setdefault("compute_precision", ct.precision.FLOAT32)
    mlmodel = ct.convert(program, inputs=inputs, convert_to="mlprogram", **convert_kwargs)
    mlmodel.save(str(path))
    return path


def torch_outputs(module: nn.Module, example: tuple) -> list[np.ndarray]:
    with torch.no_grad():
        out = module.eval()(*example)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.numpy() for o in out]


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5, what: str = "") -> None:
    """allclose relative to the output's magnitude (tiny outputs are not held to 1e-5 of 0)."""
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max()), 1e-3)
    np.testing.assert_allclose(
        actual.astype(np.float64), expected, rtol=rtol, atol=rtol * scale, err_msg=what
    )


def check(module: nn.Module, example: tuple, tmp_path: Path, *, expect_ops=(), rtol=1e-5, **kw) -> set[str]:
    """Export, run with the executor, compare with PyTorch; returns the program's op types."""
    path = export(module, example, tmp_path / "model.mlpackage", **kw)
    program = load_program(path)
    ops = program.op_types()
    missing = set(expect_ops) - ops
    assert not missing, f"converter no longer emits {missing}; program has {sorted(ops)}"
    out = program.run({f"x{i}": t.numpy() for i, t in enumerate(example)})
    expected = torch_outputs(module, example)
    assert len(out) == len(expected)
    for i, (got, ref) in enumerate(zip(out.values(), expected)):
        assert_close(got, ref, rtol, what=f"output {i}")
    return ops


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


class Lambda(nn.Module):
    def __init__(self, fn, *params: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        self.params = nn.ParameterList([nn.Parameter(p, requires_grad=False) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.params)


# ------------------------------------------------------------------------- convolution
class ConvZoo(nn.Module):
    """Every conv geometry the zoo uses, in one program."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(4, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.depthwise = nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8)
        self.multiplier = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # depth multiplier 2
        self.dilated = nn.Conv2d(8, 4, 3, padding=2, dilation=2)
        self.asym = nn.Conv2d(4, 4, (1, 3), stride=(1, 2), padding=(0, 1))
        self.pointwise = nn.Conv2d(16, 6, 1, stride=2)
        self.valid = nn.Conv2d(4, 3, 4, stride=4)  # patch embedding

    def forward(self, x):
        y = self.plain(x)
        a = self.depthwise(self.grouped(y))
        b = self.pointwise(self.multiplier(y))
        return a, b, self.dilated(y), self.asym(x), self.valid(x)


def test_conv_geometries(tmp_path):
    ops = check(ConvZoo(), (rand(2, 4, 16, 16),), tmp_path, expect_ops={"conv"})
    assert ops <= {"const", "conv"}


def test_conv1d_and_transposed_conv(tmp_path):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(3, 5, 3, padding=1)
            self.up = nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1)
            self.up_pad = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)

        def forward(self, x, s):
            return self.c1(s), self.up(x), self.up_pad(x)

    check(M(), (rand(1, 3, 6, 7), rand(2, 3, 10)), tmp_path, expect_ops={"conv", "conv_transpose"})


# ------------------------------------------------------------------------- linear algebra
def test_linear_matmul_bmm_einsum(tmp_path):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 5)
            self.w = nn.Parameter(torch.randn(8, 3), requires_grad=False)

        def forward(self, x, y):
            a = self.fc(x)  # [2, 6, 5]
            b = torch.bmm(x, y)  # [2, 6, 4]
            c = torch.einsum("bij,bkj->bik", x, x)
            d = torch.einsum("bnc,cd->bnd", x, self.w)
            e = x @ self.w
            return a, b, c, d, e

    check(M(), (rand(2, 6, 8), rand(2, 8, 4)), tmp_path, expect_ops={"linear", "matmul"})


def test_dft_as_constant_matmuls(tmp_path):
    """AFFNet's FFT-free export form: a 2-D DFT as matmuls with cos/sin matrices, + group_norm."""
    n = 8
    k = torch.arange(n, dtype=torch.float32)
    angle = 2 * math.pi * torch.outer(k, k) / n
    cos, sin = torch.cos(angle), torch.sin(angle)

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("cos", cos)
            self.register_buffer("sin", sin)
            self.norm = nn.GroupNorm(2, 4)
            self.w = nn.Parameter(torch.randn(4, 1, 1) * 0.1 + 1, requires_grad=False)

        def forward(self, x):
            x = self.norm(x)
            re = self.cos @ x @ self.cos - self.sin @ x @ self.sin  # real part of F X F
            im = -(self.sin @ x @ self.cos + self.cos @ x @ self.sin)
            re, im = re * self.w, im * self.w
            re = re - torch.clamp(re, -0.1, 0.1)  # softshrink as x - clamp(x)
            back = (self.cos @ re @ self.cos - self.sin @ im @ self.sin) / (n * n)
            return back + x

    x = rand(1, 4, n, n)
    ops = check(M(), (x,), tmp_path, expect_ops={"matmul", "clip"})
    # the DFT matrices really are a DFT: compare with torch.fft on the same input
    xf = torch.fft.fft2(x)
    re = cos @ x @ cos - sin @ x @ sin
    torch.testing.assert_close(re, xf.real, atol=1e-4, rtol=1e-4)
    assert ops & {"instance_norm", "layer_norm", "reduce_mean", "batch_norm"}


# ------------------------------------------------------------------------- normalization
def test_norms(tmp_path):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn_input = nn.BatchNorm2d(4)  # nothing to fold into: a real batch_norm op
            self.conv = nn.Conv2d(4, 6, 3, padding=1)
            self.bn_folded = nn.BatchNorm2d(6)
            self.ln = nn.LayerNorm(6)
            self.gn = nn.GroupNorm(3, 6)
            self.inorm = nn.InstanceNorm2d(6, affine=True)
            for bn in (self.bn_input, self.bn_folded):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-1, 1)

        def forward(self, x):
            y = self.bn_folded(self.conv(torch.relu(self.bn_input(x))))
            tokens = self.ln(y.flatten(2).transpose(1, 2))
            return y, tokens, self.gn(y), self.inorm(y)

    check(M(), (rand(2, 4, 8, 8),), tmp_path, expect_ops={"batch_norm", "layer_norm"})


def test_evonorm_style_variance(tmp_path):
    """EvoNorm-S0: x * sigmoid(v x) / group std, variance from reduce ops, sqrt and maximum."""

    def evonorm(x, v, gamma, beta):
        n, c, h, w = x.shape
        g = x.reshape(n, 2, c // 2, h, w)
        var = g.var(dim=(2, 3, 4), unbiased=False, keepdim=True)
        std = torch.sqrt(torch.maximum(var, torch.tensor(1e-5))).expand_as(g).reshape(n, c, h, w)
        return x * torch.sigmoid(v * x) / std * gamma + beta

    params = (torch.rand(1, 4, 1, 1) + 0.5, torch.rand(1, 4, 1, 1) + 0.5, torch.randn(1, 4, 1, 1))
    check(Lambda(evonorm, *params), (rand(2, 4, 6, 6),), tmp_path, expect_ops={"sqrt", "sigmoid"})


# ------------------------------------------------------------------------- activations
def test_activations(tmp_path):
    def acts(x):
        return (
            F.relu(x), F.relu6(x * 4), torch.clamp(x, -0.5, 0.7), F.hardtanh(x, -0.3, 0.4),
            torch.sigmoid(x), F.silu(x), F.hardswish(x * 4), F.hardsigmoid(x * 4),
            F.gelu(x), torch.tanh(x), F.leaky_relu(x, 0.1),
            F.elu(x), F.softplus(x), F.mish(x), F.softshrink(x, 0.5), x - torch.clamp(x, -0.5, 0.5),
        )

    ops = check(Lambda(acts), (rand(2, 3, 5, 7) * 3,), tmp_path, expect_ops={"gelu", "sigmoid", "clip"})
    assert {"relu", "silu"} & ops


def test_softmax_and_reductions(tmp_path):
    def fn(x):
        return (
            torch.softmax(x, dim=-1), torch.softmax(x, dim=1), torch.log_softmax(x, dim=-1),
            x.mean(dim=(2, 3), keepdim=True), x.sum(dim=1), x.amax(dim=-1), x.amin(dim=2),
            x.var(dim=-1), x.std(dim=(1, 2)), x.norm(dim=1), x.argmax(dim=1), x.logsumexp(dim=-1),
        )

    check(Lambda(fn), (rand(2, 3, 4, 5),), tmp_path,
          expect_ops={"softmax", "reduce_mean", "reduce_sum", "reduce_max"})


def test_elementwise_math_and_broadcasting(tmp_path):
    def fn(x, y):
        p = x.abs() + 0.1
        return (
            x + y, x - y[:, :1], x * y[..., :1], x / (y.abs() + 1), torch.sqrt(p), torch.rsqrt(p),
            torch.pow(p, 1.7), x**2, torch.square(x), torch.maximum(x, y), torch.minimum(x, y),
            torch.exp(x), torch.log(p), y / p, torch.floor(x), torch.ceil(x),
            torch.sin(x), torch.cos(x), torch.erf(x), torch.round(x * 3), torch.sign(x), 2.0 - x,
            torch.pow(p, y),
        )

    check(Lambda(fn), (rand(2, 3, 4), rand(2, 3, 4)), tmp_path,
          expect_ops={"add", "sub", "mul", "real_div", "sqrt", "rsqrt", "pow", "maximum", "minimum"})


def test_converter_quirks_are_reproduced_not_hidden(tmp_path):
    """coremltools 9 lowers two torch ops inexactly; the executor must show what Core ML runs.

    - F.gelu(approximate="tanh") becomes gelu(mode=EXACT): up to ~5e-4 off the tanh form;
    - torch.reciprocal becomes inverse(epsilon=1e-4): 1 / (x + 1e-4).
    """

    def fn(x):
        return F.gelu(x, approximate="tanh"), torch.reciprocal(x.abs() + 0.1)

    x = rand(4, 64) * 3
    path = export(Lambda(fn), (x,), tmp_path / "quirks.mlpackage")
    gelu, inv = run_mlpackage(path, {"x0": x.numpy()}).values()
    tanh_form, recip = torch_outputs(Lambda(fn), (x,))
    assert_close(gelu, F.gelu(x).numpy())  # what the file computes: exact GELU
    assert np.abs(gelu - tanh_form).max() > 1e-4
    assert_close(inv, (1.0 / (x.abs() + 0.1 + 1e-4)).numpy())
    assert np.abs(inv - recip).max() > 1e-4


def test_gelu_modes_from_a_mil_program(tmp_path):
    """Modes the torch frontend does not emit, built directly with the MIL builder."""
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(3, 50))], opset_version=ct.target.iOS17)
    def prog(x):
        return (mb.gelu(x=x, mode="TANH_APPROXIMATION"), mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"),
                mb.inverse(x=x, epsilon=0.5), mb.log(x=mb.abs(x=x), epsilon=1e-3))

    path = tmp_path / "gelu.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
               compute_precision=ct.precision.FLOAT32).save(str(path))
    x = rand(3, 50) * 3
    tanh_form, sigmoid_form, inv, log = run_mlpackage(path, {"x": x.numpy()}).values()
    assert_close(tanh_form, F.gelu(x, approximate="tanh").numpy())
    assert_close(sigmoid_form, (x * torch.sigmoid(1.702 * x)).numpy())
    assert_close(inv, (1 / (x + 0.5)).numpy())
    assert_close(log, torch.log(x.abs() + 1e-3).numpy())


# ------------------------------------------------------------------------- layout
def test_layout_ops(tmp_path):
    def fn(x, y):
        a = x.reshape(2, 12, 5).transpose(1, 2)
        b = x.permute(0, 3, 1, 2).contiguous()
        c = torch.cat([x, y], dim=1)
        d0, d1, d2 = torch.split(x, [1, 1, 2], dim=2)
        e = x[:, 1:3, ::2, -3:]
        f = x[:, 0]  # integer index: a squeeze
        g = torch.narrow(x, 3, 1, 3)
        h = x.unsqueeze(1).squeeze(1).flatten(1)
        i = x[:, :1].expand(2, 3, 4, 5) * 1.0
        j = x.repeat(1, 2, 1, 1)
        k = torch.flip(x, dims=[-1])
        l_ = torch.stack([x, y], dim=2)
        m = torch.roll(x, shifts=2, dims=-1)
        n = F.pixel_shuffle(torch.cat([x, x, x, x], dim=1), 2)
        o, p = x.chunk(2, dim=-2)
        return a, b, c, d0, d1, d2, e, f, g, h, i, j, k, l_, m, n, o, p

    check(Lambda(fn), (rand(2, 3, 4, 5), rand(2, 3, 4, 5)), tmp_path,
          expect_ops={"reshape", "transpose", "concat", "split", "slice_by_index"})


def test_pad_modes(tmp_path):
    def fn(x):
        return (
            F.pad(x, (1, 2, 0, 3)), F.pad(x, (1, 1, 2, 2), value=0.5),
            F.pad(x, (2, 1, 1, 2), mode="reflect"), F.pad(x, (1, 2, 2, 1), mode="replicate"),
        )

    check(Lambda(fn), (rand(1, 2, 5, 6),), tmp_path, expect_ops={"pad"})


# ------------------------------------------------------------------------- pooling / resizing
def test_pools(tmp_path):
    def fn(x):
        return (
            F.avg_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
            F.avg_pool2d(x, 2), F.max_pool2d(x, 3, 1, 1), F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
            F.max_pool2d(x, 2, 2), F.adaptive_avg_pool2d(x, 1), F.adaptive_avg_pool2d(x, (3, 3)),
            F.avg_pool2d(x, 3, 2, 1, ceil_mode=True),
        )

    check(Lambda(fn), (rand(2, 3, 9, 9),), tmp_path, expect_ops={"avg_pool", "max_pool"})


def test_upsample_and_grid_sample(tmp_path):
    def fn(x, grid):
        return (
            F.interpolate(x, scale_factor=2, mode="nearest"),
            F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
            F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
            F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False),
            F.interpolate(x, size=(8, 10), mode="nearest"),
            F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False),
            F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True),
            F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True),
            F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False),
            F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False),
        )

    grid = torch.rand(2, 5, 6, 2) * 3.2 - 1.6  # reaches past the border: padding modes matter
    check(Lambda(fn), (rand(2, 3, 4, 5), grid), tmp_path,
          expect_ops={"upsample_nearest_neighbor", "upsample_bilinear", "resample"})


# ------------------------------------------------------------------------- index ops
def test_token_selection_topk_gather_onehot(tmp_path):
    """EViT-style: keep the top-k tokens by score (topk + gather), fuse the rest, one-hot matmul."""

    def fn(tokens, scores):
        k = 5
        _, idx = torch.topk(scores, k, dim=1)  # [B, k]
        kept = torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        picked = tokens[torch.arange(tokens.shape[0]).unsqueeze(1), idx]  # gather_nd style
        onehot = F.one_hot(idx, tokens.shape[1]).to(tokens.dtype)  # [B, k, N]
        via_matmul = onehot @ tokens
        mask = (scores == scores.amax(dim=1, keepdim=True)).to(tokens.dtype)
        chosen = torch.where(scores > 0, scores, torch.zeros_like(scores))
        first = torch.index_select(tokens, 1, torch.tensor([0, 2]))
        return kept, picked, via_matmul, mask, chosen, idx.to(torch.float32), first

    scores = torch.randperm(12).float().reshape(1, 12).repeat(2, 1) - 6  # no ties
    ops = check(Lambda(fn), (rand(2, 12, 4), scores), tmp_path, expect_ops={"topk", "one_hot"})
    assert ops & {"gather", "gather_along_axis", "gather_nd"}
    assert ops & {"equal", "select", "greater", "cast"}


def test_cumsum_and_int_ops(tmp_path):
    def fn(x):
        i = (x * 4).to(torch.int32)
        return torch.cumsum(x, dim=1), torch.cumsum(x, dim=-1).flip(-1), (i // 3).float(), (i % 3).float()

    check(Lambda(fn), (rand(2, 6, 3),), tmp_path, expect_ops={"cumsum", "cast"})


# ------------------------------------------------------------------------- attention
class Attention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(b, n, c)), z


@pytest.mark.parametrize("target", ["iOS17", "iOS18"])
def test_scaled_dot_product_attention(tmp_path, target):
    ops = check(Attention(), (rand(2, 7, 16), rand(7, 7)), tmp_path,
                minimum_deployment_target=getattr(ct.target, target))
    if target == "iOS18":
        assert "scaled_dot_product_attention" in ops
    else:
        assert {"matmul", "softmax"} <= ops


def test_ulsam_style_block(tmp_path):
    """ULSAM: grouped 1x1 conv, max_pool 3x3 s1, softmax over the flattened spatial axis."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 1, groups=8)
            self.pw = nn.Conv2d(8, 4, 1, groups=4)

        def forward(self, x):
            a = self.pw(F.max_pool2d(self.dw(x), 3, 1, 1))
            n, g, h, w = a.shape
            att = torch.softmax(a.reshape(n, g, h * w), dim=-1).reshape(n, g, 1, h, w)
            return (x.reshape(n, g, 2, h, w) * att).reshape(n, 8, h, w)

    check(M(), (rand(2, 8, 6, 6),), tmp_path, expect_ops={"conv", "max_pool", "softmax"})


# ------------------------------------------------------------------------- app-facing I/O
def test_image_input_scale_bias_and_bgr(tmp_path):
    from PIL import Image

    conv = nn.Conv2d(3, 4, 3, padding=1).eval()
    mean, scale = [0.485, 0.456, 0.406], 1 / 255
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float().contiguous()
    for space in (ct.colorlayout.RGB, ct.colorlayout.BGR):
        inputs = [ct.ImageType(name="image", shape=x.shape, scale=scale, bias=[-m for m in mean],
                               color_layout=space)]
        path = export(conv, (x,), tmp_path / f"img_{space.value}.mlpackage", inputs=inputs)
        program = load_program(path)
        assert program.inputs["image"].image.color_space == space.value
        chans = x if space == ct.colorlayout.RGB else x.flip(1)
        bias = torch.tensor([-m for m in mean]).reshape(1, 3, 1, 1)
        with torch.no_grad():
            ref = conv(chans * scale + bias).numpy()
        for feed in (Image.fromarray(pixels), pixels, pixels.astype(np.float32)):
            (out,) = program.run({"image": feed}).values()
            assert_close(out, ref)
        with pytest.raises(ExecutionError, match="resize"):
            program.run({"image": Image.fromarray(pixels).resize((8, 8))})
    assert {"mul", "add"} <= program.op_types()


def test_classifier_config(tmp_path):
    labels = ["cat", "dog", "fox", "owl", "bee"]
    head = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Softmax(dim=-1))
    x = rand(1, 3, 2, 2)
    path = export(head, (x,), tmp_path / "cls.mlpackage", classifier_config=ct.ClassifierConfig(labels))
    program = load_program(path)
    assert "classify" in program.op_types()
    out = program.run({"x0": x.numpy()})
    probs = torch_outputs(head, (x,))[0][0]
    assert out["classLabel"] == labels[int(probs.argmax())]
    assert list(out["classLabel_probs"]) == labels
    assert_close(np.array(list(out["classLabel_probs"].values()), dtype=np.float32), probs)


def test_fp16_precision_is_really_simulated(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.GELU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, 10),
    ).eval()
    x = rand(1, 3, 16, 16)
    ref = torch_outputs(model, (x,))[0]
    p16 = export(model, (x,), tmp_path / "fp16.mlpackage", compute_precision=ct.precision.FLOAT16)
    p32 = export(model, (x,), tmp_path / "fp32.mlpackage")
    program16 = load_program(p16)
    assert program16.inputs["x0"].dtype == np.float16  # fp16 I/O with a TensorType input
    (y16,) = program16.run({"x0": x.numpy()}).values()
    (y32,) = run_mlpackage(p32, {"x0": x.numpy()}).values()
    assert y16.dtype == np.float16 and y32.dtype == np.float32
    scale = np.abs(ref).max()
    err16, err32 = np.abs(y16.astype(np.float32) - ref).max(), np.abs(y32 - ref).max()
    assert err16 < 1e-2 * scale  # fp16 parity
    assert err32 < 1e-5 * scale
    assert err16 > 10 * err32  # rounding to fp16 really happened inside the program


# ------------------------------------------------------------------------- compressed weights
@pytest.fixture(scope="module")
def dense_packages(tmp_path_factory):
    """One float model (weights big enough to be compressed), converted once per target."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 64),
    ).eval()
    x = torch.randn(1, 16, 6, 6)
    root = tmp_path_factory.mktemp("dense")
    packages = {
        name: export(model, (x,), root / f"{name}.mlpackage",
                     minimum_deployment_target=getattr(ct.target, name))
        for name in ("iOS17", "iOS18")
    }
    return model, x, packages


def _magnitude_pruned(model: nn.Module, sparsity: float) -> nn.Module:
    """The same model with the smallest |w| of every weight tensor (>= 2048 values) zeroed."""
    import copy

    pruned = copy.deepcopy(model)
    for module in pruned.modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.numel() >= 2048:
            k = int(round(w.numel() * sparsity))
            order = w.detach().abs().flatten().argsort()
            w.data.view(-1)[order[:k]] = 0
    return pruned


def _compress(mlmodel, scheme: str):
    cto = ct.optimize.coreml
    quant8 = cto.OpLinearQuantizerConfig(mode="linear_symmetric")
    int4_block = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4",
                                             granularity="per_block", block_size=16)
    kmeans4 = cto.OpPalettizerConfig(mode="kmeans", nbits=4)
    prune = cto.OpMagnitudePrunerConfig(target_sparsity=0.5)

    def cfg(op_config):
        return cto.OptimizationConfig(global_config=op_config)

    if scheme == "int8_linear":
        return cto.linear_quantize_weights(mlmodel, cfg(quant8))
    if scheme == "int4_per_block":
        return cto.linear_quantize_weights(mlmodel, cfg(int4_block))
    if scheme == "palettize_4bit":
        return cto.palettize_weights(mlmodel, cfg(kmeans4))
    pruned = cto.prune_weights(mlmodel, cfg(prune))
    if scheme == "prune_50":
        return pruned
    if scheme == "prune_palettize":
        return cto.palettize_weights(pruned, cfg(kmeans4), joint_compression=True)
    return cto.linear_quantize_weights(pruned, cfg(quant8), joint_compression=True)


@pytest.mark.parametrize(
    "scheme, expect_ops, rtol",
    [
        pytest.param("int8_linear", {"constexpr_affine_dequantize"}, 2e-2, id="int8"),
        pytest.param("palettize_4bit", {"constexpr_lut_to_dense"}, 0.15, id="lut4"),
        pytest.param("int4_per_block", {"constexpr_blockwise_shift_scale"}, 0.15, id="int4-block"),
        pytest.param("prune_50", {"constexpr_sparse_to_dense"}, 1e-5, id="prune"),
        pytest.param("prune_palettize", {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"}, 0.15,
                     id="prune+lut4"),
        pytest.param("prune_quantize", {"constexpr_sparse_blockwise_shift_scale",
                                        "constexpr_sparse_to_dense"}, 2e-2, id="prune+int8"),
    ],
)
def test_compressed_weights(tmp_path, dense_packages, scheme, expect_ops, rtol):
    """Weights expanded from the stored bits match coremltools' own expansion and PyTorch."""
    cto = ct.optimize.coreml
    model, x, packages = dense_packages
    path = packages["iOS17" if scheme in ("int8_linear", "palettize_4bit", "prune_50") else "iOS18"]
    compressed = _compress(ct.models.MLModel(str(path), skip_model_load=True), scheme)
    comp_path = tmp_path / "compressed.mlpackage"
    compressed.save(str(comp_path))
    program = load_program(comp_path)
    assert expect_ops <= program.op_types()
    (y,) = program.run({"x0": x.numpy()}).values()
    # an independent expansion of the same stored bits: coremltools' decompression to consts
    decompressed_path = tmp_path / "decompressed.mlpackage"
    cto.decompress_weights(ct.models.MLModel(str(comp_path), skip_model_load=True)).save(
        str(decompressed_path))
    plain = load_program(decompressed_path)
    assert not any(t.startswith("constexpr_") for t in plain.op_types())
    (y_plain,) = plain.run({"x0": x.numpy()}).values()
    assert_close(y, y_plain, rtol=1e-6)
    # and PyTorch (magnitude-pruned the same way where the scheme prunes)
    reference = _magnitude_pruned(model, 0.5) if scheme.startswith("prune") else model
    ref = torch_outputs(reference, (x,))[0]
    assert_close(y, ref, rtol=rtol)


# ------------------------------------------------------------------------- multifunction
def test_multifunction_package(tmp_path):
    torch.manual_seed(2)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()
    x = rand(1, 3, 6, 6)
    pa = export(a, (x,), tmp_path / "a.mlpackage")
    pb = export(b, (x,), tmp_path / "b.mlpackage")
    desc = ct.utils.MultiFunctionDescriptor()
    desc.add_function(str(pa), src_function_name="main", target_function_name="task_a")
    desc.add_function(str(pb), src_function_name="main", target_function_name="task_b")
    desc.default_function_name = "task_a"
    multi = tmp_path / "multi.mlpackage"
    ct.utils.save_multifunction(desc, str(multi))
    for fn, model in (("task_a", a), ("task_b", b)):
        (y,) = run_mlpackage(multi, {"x0": x.numpy()}, function_name=fn).values()
        assert_close(y, torch_outputs(model, (x,))[0])
    assert load_program(multi).function_name == "task_a"
    with pytest.raises(ValueError, match="task_c"):
        load_program(multi, "task_c")


# ------------------------------------------------------------------------- MIL-builder programs
def run_built(prog, feeds: dict, tmp_path: Path, name: str) -> list:
    """Save a hand-built MIL program as written (no graph passes) and run it."""
    path = tmp_path / f"{name}.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
               compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY).save(str(path))
    return list(run_mlpackage(path, {k: v.numpy() for k, v in feeds.items()}).values())


def _legacy_bilinear(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """TF's legacy resize (position i * in / out) through grid_sample, an independent path."""
    h, w = x.shape[-2:]
    ys = torch.clamp(torch.arange(out_h) * h / out_h, max=h - 1) / (h - 1) * 2 - 1
    xs = torch.clamp(torch.arange(out_w) * w / out_w, max=w - 1) / (w - 1) * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).expand(x.shape[0], -1, -1, -1)
    return F.grid_sample(x, grid.float(), mode="bilinear", align_corners=True)


def test_float_ops_the_torch_frontend_rarely_emits(tmp_path):
    from coremltools.converters.mil import Builder as mb

    shape = (2, 8, 4, 6)
    alpha = np.linspace(0.1, 0.8, 8).astype(np.float32)
    beta = np.linspace(0.5, 2.0, 8).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape), mb.TensorSpec(shape=(2, 6, 4, 5))],
                opset_version=ct.target.iOS17)
    def prog(x, z):
        t = mb.tanh(x=x)
        return (
            mb.argsort(x=x, axis=-1, ascending=False),
            mb.band_part(x=x, lower=1, upper=0),
            mb.clamped_relu(x=x, alpha=0.1, beta=1.0),
            mb.depth_to_space(x=x, block_size=2),
            mb.space_to_depth(x=x, block_size=2),
            mb.pixel_unshuffle(x=x, downscale_factor=np.uint32(2)),
            mb.local_response_norm(x=x, size=3, alpha=1e-2, beta=0.75, k=1.0),
            mb.l2_norm(x=x, epsilon=1e-6),
            mb.prelu(x=x, alpha=alpha),
            mb.softplus_parametric(x=x, alpha=alpha, beta=beta),
            mb.scaled_tanh(x=x, alpha=0.5, beta=2.0),
            mb.softsign(x=x),
            mb.threshold(x=x, alpha=0.2),
            mb.reduce_prod(x=t, axes=[-1]),
            mb.reduce_l1_norm(x=x, axes=[1, 3], keep_dims=True),
            mb.reduce_sum_square(x=x, axes=[2]),
            mb.reduce_log_sum(x=mb.abs(x=x), axes=[-1]),
            mb.reduce_argmin(x=x, axis=1),
            *(mb.resize_bilinear(x=x, target_size_height=7, target_size_width=9, sampling_mode=mode)
              for mode in ("ALIGN_CORNERS", "UNALIGN_CORNERS", "DEFAULT")),
            mb.resize(x=x, shape=np.array([7, 9], dtype=np.int32), resized_dims=np.uint32(2),
                      interpolation_mode="LINEAR", sampling_mode="ALIGN_CORNERS"),
            mb.resize_nearest_neighbor(x=x, target_size_height=8, target_size_width=12),
            mb.slice_by_size(x=x, begin=[0, 2, 1, 0], size=[-1, 3, 2, -1]),
            mb.sliding_windows(x=x, axis=2, size=3, stride=1),
            mb.l2_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid"),
            mb.exp2(x=t), mb.sinh(x=t), mb.cosh(x=t), mb.tan(x=t), mb.atan(x=x),
            mb.asin(x=t), mb.acos(x=t), mb.atanh(x=mb.mul(x=t, y=0.9)),
            mb.einsum(values=(x, z), equation="nchw,nwhu->nchu"),
            mb.linear_activation(x=x, alpha=2.0, beta=-1.0),
            mb.mod(x=x, y=0.7),
            mb.flatten2d(x=x, axis=2),
            mb.fill_like(ref_tensor=x, value=3.0),
            mb.add(x=x, y=mb.constexpr_cast(source_val=np.full(shape[-1:], 0.5, np.float16),
                                            output_dtype="fp32")),
            mb.identity(x=x),
        )

    x, z = rand(*shape), rand(2, 6, 4, 5)
    out = run_built(prog, {"x": x, "z": z}, tmp_path, "float_ops")
    t = torch.tanh(x)
    rows, cols = torch.arange(4)[:, None], torch.arange(6)[None, :]
    n, c, h, w = shape
    d2s = torch.zeros(n, c // 4, h * 2, w * 2)
    s2d = torch.zeros(n, c * 4, h // 2, w // 2)
    for i in range(2):
        for j in range(2):  # DCR order (TensorFlow's): channel (i*b + j)*C' + c <-> pixel (i, j)
            d2s[:, :, i::2, j::2] = x[:, (i * 2 + j) * (c // 4) : (i * 2 + j + 1) * (c // 4)]
            s2d[:, (i * 2 + j) * c : (i * 2 + j + 1) * c] = x[:, :, i::2, j::2]
    a4, b4 = torch.from_numpy(alpha).reshape(1, 8, 1, 1), torch.from_numpy(beta).reshape(1, 8, 1, 1)
    expected = [
        torch.argsort(x, dim=-1, descending=True, stable=True),
        x * ((rows - cols <= 1) & (cols - rows <= 0)),
        torch.clamp(F.leaky_relu(x, 0.1), max=1.0),
        d2s, s2d, F.pixel_unshuffle(x, 2),
        F.local_response_norm(x, 3, alpha=1e-2, beta=0.75, k=1.0),
        x / torch.sqrt((x**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-6),
        F.prelu(x, torch.from_numpy(alpha)),
        a4 * F.softplus(b4 * x),
        0.5 * torch.tanh(2 * x), F.softsign(x), torch.clamp(x, min=0.2),
        t.prod(dim=-1), x.abs().sum(dim=(1, 3), keepdim=True), (x**2).sum(dim=2),
        torch.log(x.abs().sum(dim=-1)), x.argmin(dim=1),
        F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
        F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False),
        _legacy_bilinear(x, 7, 9),
        F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=True),
        F.interpolate(x, size=(8, 12), mode="nearest"),
        x[:, 2:5, 1:3, :],
        x.unfold(2, 3, 1).permute(0, 1, 2, 4, 3),
        F.lp_pool2d(x, 2, 2),
        torch.exp2(t), torch.sinh(t), torch.cosh(t), torch.tan(t), torch.atan(x),
        torch.asin(t), torch.acos(t), torch.atanh(t * 0.9),
        torch.einsum("nchw,nwhu->nchu", x, z),
        2 * x - 1, torch.remainder(x, 0.7), x.reshape(16, 24), torch.full(shape, 3.0),
        x + 0.5, x,
    ]
    assert len(out) == len(expected)
    for i, (got, ref) in enumerate(zip(out, expected)):
        assert_close(got, ref.numpy(), what=f"output {i}")


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # the reference uses it on purpose
def test_index_logic_and_quantize_ops(tmp_path):
    from coremltools.converters.mil import Builder as mb

    idx = np.array([2, 0], dtype=np.int32)
    along = np.array([[[1], [0], [2]], [[2], [2], [0]]], dtype=np.int32)  # [2, 3, 1]
    nd = np.array([[0, 1], [1, 2]], dtype=np.int32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3, 4)), mb.TensorSpec(shape=(2, 3, 4))],
                opset_version=ct.target.iOS17)
    def prog(x, y):
        less = mb.less(x=x, y=0.0)
        q = mb.quantize(input=x, scale=np.float32(0.05), zero_point=np.int8(3), output_dtype="int8")
        return (
            mb.cast(x=mb.logical_and(x=less, y=mb.greater(x=y, y=0.0)), dtype="fp32"),
            mb.cast(x=mb.logical_or(x=less, y=mb.less_equal(x=y, y=-0.5)), dtype="fp32"),
            mb.cast(x=mb.logical_xor(x=less, y=mb.not_equal(x=x, y=y)), dtype="fp32"),
            mb.cast(x=mb.logical_not(x=less), dtype="int32"),
            mb.scatter(data=x, indices=idx, updates=mb.slice_by_index(x=y, begin=[0, 0, 0], end=[2, 3, 2]),
                       axis=2, mode="add"),
            mb.scatter(data=x, indices=idx, updates=mb.slice_by_index(x=y, begin=[0, 0, 0], end=[2, 2, 4]),
                       axis=1, mode="update"),
            mb.scatter_along_axis(data=x, indices=along, updates=mb.slice_by_index(
                x=y, begin=[0, 0, 0], end=[2, 3, 1]), axis=2, mode="add"),
            mb.scatter_nd(data=x, indices=nd, updates=mb.slice_by_index(x=y, begin=[0, 0, 0], end=[2, 1, 4],
                                                                         squeeze_mask=[False, True, False]),
                          mode="update"),
            mb.cast(x=q, dtype="int32"),
            mb.dequantize(input=q, scale=np.float32(0.05), zero_point=np.int8(3)),
            mb.non_zero(x=mb.greater(x=x, y=0.5)),
            mb.range_1d(start=np.int32(1), end=np.int32(9), step=np.int32(3)),
            mb.shape(x=x),
            mb.reverse_sequence(x=x, lengths=np.array([3, 1], dtype=np.int32), seq_axis=2, batch_axis=0),
            mb.crop(x=x, crop_height=[1, 0], crop_width=[1, 2]),
            mb.fill(shape=np.array([2, 2], dtype=np.int32), value=1.5),
            mb.reshape_like(x=x, ref_tensors=(mb.reshape(x=y, shape=[6, 4]),), begins=(0,), ends=(0,),
                            end_masks=(True,)),
        )

    x, y = rand(2, 3, 4), rand(2, 3, 4)
    out = run_built(prog, {"x": x, "y": y}, tmp_path, "index_ops")
    tidx = torch.from_numpy(idx).long()
    scatter_nd = x.clone()
    scatter_nd[0, 1], scatter_nd[1, 2] = y[0, 0], y[1, 0]
    q = torch.quantize_per_tensor(x, 0.05, 3, torch.qint8)
    rev = x.clone()
    rev[0, :, :3], rev[1, :, :1] = x[0, :, :3].flip(-1), x[1, :, :1].flip(-1)
    expected = [
        ((x < 0) & (y > 0)).float(), ((x < 0) | (y <= -0.5)).float(), ((x < 0) ^ (x != y)).float(),
        (x >= 0).int(),
        x.index_add(2, tidx, y[:, :, :2]),
        x.index_copy(1, tidx, y[:, :2]),
        x.scatter_add(2, torch.from_numpy(along).long(), y[:, :, :1]),
        scatter_nd,
        q.int_repr().int(), q.dequantize(),
        torch.nonzero(x > 0.5).int(), torch.arange(1, 9, 3, dtype=torch.int32),
        torch.tensor(x.shape, dtype=torch.int32), rev,
        x[:, 1:, 1:2], torch.full((2, 2), 1.5), x.reshape(6, 4),
    ]
    assert len(out) == len(expected)
    for i, (got, ref) in enumerate(zip(out, expected)):
        ref = ref.numpy()
        if np.issubdtype(ref.dtype, np.integer):
            np.testing.assert_array_equal(got, ref, err_msg=f"output {i}")  # int ops are exact
        else:
            assert_close(got, ref, what=f"output {i}")


def test_ios18_lut_blocks_vectors_and_slice_update(tmp_path):
    """iOS18 palettization layouts, checked against the worked examples in the op's docs."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    def sub_byte(values, nbits: int) -> np.ndarray:
        return np.asarray(values).astype(types.nptype_from_builtin(types.string_to_builtin(f"uint{nbits}")))

    # case 1: two 2-bit LUTs, one per half of axis 0
    idx_groups = sub_byte([2, 3, 3, 0, 1, 0, 3, 0, 2, 1, 0, 3], 2).reshape(6, 2)
    lut_groups = np.array([1, 5, 9, 13, 2, 10, 18, 26], np.float32).reshape(2, 1, 4, 1)
    # case 2: 1-bit vector palettization, vectors of 3 laid along axis 1
    idx_vector = sub_byte([0, 0, 1, 0, 1, 1, 0, 0], 1).reshape(2, 2, 2)
    a, b = [1.0, 2.0, 3.0], [10.0, 20.0, 30.0]
    lut_vector = np.array(a + b, np.float32).reshape(1, 1, 1, 2, 3)

    @mb.program(input_specs=[mb.TensorSpec(shape=(6, 2)), mb.TensorSpec(shape=(2, 6, 2))],
                opset_version=ct.target.iOS18)
    def prog(x, y):
        update = mb.slice_by_index(x=x, begin=[0, 0], end=[4, 2])
        return (
            mb.add(x=x, y=mb.constexpr_lut_to_dense(indices=idx_groups, lut=lut_groups)),
            mb.add(x=y, y=mb.constexpr_lut_to_dense(indices=idx_vector, lut=lut_vector, vector_axis=1)),
            mb.slice_update(x=y, update=mb.reshape(x=update, shape=[2, 2, 2]),
                            begin=[0, 1, 0], end=[2, 3, 2]),
        )

    path = tmp_path / "ios18.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
               compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY).save(str(path))
    x, y = rand(6, 2), rand(2, 6, 2)
    grouped, vector, updated = run_mlpackage(path, {"x": x.numpy(), "y": y.numpy()}).values()
    doc_groups = torch.tensor([[9, 13], [13, 1], [5, 1], [26, 2], [18, 10], [2, 26]], dtype=torch.float32)
    doc_vector = torch.tensor([
        [[a[0], a[0]], [a[1], a[1]], [a[2], a[2]], [b[0], a[0]], [b[1], a[1]], [b[2], a[2]]],
        [[b[0], b[0]], [b[1], b[1]], [b[2], b[2]], [a[0], a[0]], [a[1], a[1]], [a[2], a[2]]],
    ])
    expected_update = y.clone()
    expected_update[0:2, 1:3, 0:2] = x[:4].reshape(2, 2, 2)
    assert_close(grouped, (x + doc_groups).numpy())
    assert_close(vector, (y + doc_vector).numpy())
    assert_close(updated, expected_update.numpy())


def test_out_of_range_gather_index_fails(tmp_path):
    """iOS17 gather treats out-of-range indices as undefined: the executor must not wrap them."""
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(5, 3))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.gather(x=x, indices=np.array([0, 5], dtype=np.int32), axis=0)

    with pytest.raises(ExecutionError, match="out of range"):
        run_built(prog, {"x": rand(5, 3)}, tmp_path, "oob")


# ------------------------------------------------------------------------- failing loudly
def test_corrupted_weight_blob_breaks_parity(tmp_path):
    """Flip the sign of the largest weight inside weight.bin: the verifier must see it."""
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    x = rand(4, 32)
    path = export(model, (x,), tmp_path / "m.mlpackage")
    ref = torch_outputs(model, (x,))[0]
    (y,) = run_mlpackage(path, {"x0": x.numpy()}).values()
    assert_close(y, ref)

    blob = path / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(blob.read_bytes())
    weight = model[0].weight.detach().numpy().astype(np.float32)
    start = bytes(data).find(weight.tobytes())
    assert start >= 0, "fp32 weight not stored verbatim in weight.bin"
    flipped = (-weight).tobytes()
    data[start : start + len(flipped)] = flipped
    blob.write_bytes(bytes(data))

    (bad,) = run_mlpackage(path, {"x0": x.numpy()}).values()
    assert np.abs(bad - ref).max() > 0.1 * np.abs(ref).max()
    with pytest.raises(AssertionError):
        assert_close(bad, ref)


def test_modified_const_in_program_breaks_parity(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    x = rand(1, 3, 8, 8)
    program = load_program(export(model, (x,), tmp_path / "m.mlpackage"))
    ref = torch_outputs(model, (x,))[0]
    assert_close(next(iter(program.run({"x0": x.numpy()}).values())), ref)
    weights = [op for op in program.function.operations
               if op.op_type == "const" and op.outputs[0].val is not None
               and np.ndim(op.outputs[0].val) == 4]
    target = max(weights, key=lambda op: np.size(op.outputs[0].val)).outputs[0]
    from coremltools.converters.mil import Builder as mb

    with program.function:  # the way coremltools' graph passes swap a weight
        perturbed = mb.const(val=(target.val * 1.5).astype(target.val.dtype), before_op=target.op)
        program.function.replace_uses_of_var_after_op(
            anchor_op=perturbed.op, old_var=target, new_var=perturbed)
    bad = next(iter(program.run({"x0": x.numpy()}).values()))
    assert np.abs(bad - ref).max() > 0.05 * np.abs(ref).max()


def test_unsupported_op_is_named_not_skipped(tmp_path):
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS17)
    def prog(x):
        noise = mb.random_uniform(shape=np.array([1, 4], dtype=np.int32), low=0.0, high=1.0,
                                  name="noise_source")
        return mb.add(x=x, y=noise)

    mlmodel = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                         compute_precision=ct.precision.FLOAT32)
    path = tmp_path / "rand.mlpackage"
    mlmodel.save(str(path))
    program = load_program(path)
    assert unsupported_ops(program) == {"random_uniform"}
    assert "random_uniform" not in supported_ops()
    with pytest.raises(UnsupportedOpError) as info:
        program.run({"x": np.zeros((1, 4), np.float32)})
    assert info.value.op_type == "random_uniform"
    assert info.value.op_name == "noise_source"
    assert str(info.value).startswith("unverified: op random_uniform (")


def test_undocumented_nearest_rounding_is_refused(tmp_path):
    """4 -> 2 rows nearest: PyTorch takes rows 0, 2; Core ML's rounding of scale 0.500025 is
    undocumented, so the executor names the op instead of guessing."""
    path = export(Lambda(lambda x: F.interpolate(x, size=(2, 3), mode="nearest")), (rand(1, 2, 4, 5),),
                  tmp_path / "down.mlpackage")
    with pytest.raises(UnsupportedOpError, match="undocumented rounding") as info:
        run_mlpackage(path, {"x0": np.zeros((1, 2, 4, 5), np.float32)})
    assert info.value.op_type == "upsample_nearest_neighbor"


def test_bad_inputs_are_explained(tmp_path):
    model = nn.Linear(4, 2).eval()
    path = export(model, (rand(1, 4),), tmp_path / "m.mlpackage")
    with pytest.raises(ExecutionError, match="missing"):
        run_mlpackage(path, {})
    with pytest.raises(ExecutionError, match="shape"):
        run_mlpackage(path, {"x0": np.zeros((2, 4), np.float32)})

"""AFFNet: sizes, the FFT-free DFT form against torch.fft, official checkpoint keys."""
import math

import pytest
import torch
import torch.nn.functional as F

import vizoo
from vizoo.counting import count_macs, count_params
from vizoo.layers.aff import AdaptiveFrequencyFilter
from vizoo.layers.dft import hermitian_project, irfft2_ortho, rfft2_ortho
from vizoo.layers.export_mode import export_mode

SIZES = [(32, 32), (16, 9), (8, 8), (7, 7), (14, 10), (5, 9), (1, 4), (1, 1)]

# Spec §2.3: exact parameter counts of the official module tree, and MACs without FFTs.
EXPECTED = {"affnet_et": (1_436_264, 0.357), "affnet_t": (2_654_232, 0.787), "affnet": (5_568_696, 1.455)}


# --- model sizes --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(EXPECTED))
def test_param_count_is_exact_and_matches_paper(name):
    model = vizoo.create_model(name)
    params = count_params(model)
    assert params == EXPECTED[name][0]
    assert abs(params / 1e6 - model.pretrained_cfg["paper_metrics"]["params_m"]) < 0.1
    assert len(model.state_dict()) == 416  # as the official checkpoints (BN buffers included)


def test_macs_match_spec_without_ffts():
    model = vizoo.create_model("affnet_et")
    assert abs(count_macs(model, (3, 256, 256)) / 1e9 - EXPECTED["affnet_et"][1]) < 0.005
    assert "FFT" in model.pretrained_cfg["macs_note"]


def test_config_has_cvnets_preprocessing():
    cfg = vizoo.get_pretrained_cfg("affnet")
    assert cfg.input_size == (3, 256, 256) and cfg.mean == (0, 0, 0) and cfg.std == (1, 1, 1)
    assert cfg.paper_metrics["top1"] == 79.8


# --- DFT layer against torch.fft ------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("size", SIZES)
def test_dft_matches_torch_fft(size, dtype, tol):
    x = torch.randn(2, 3, *size, dtype=dtype)
    real, imag = rfft2_ortho(x)
    ref = torch.fft.rfft2(x, norm="ortho")
    assert torch.allclose(real, ref.real, atol=tol, rtol=0) and torch.allclose(imag, ref.imag, atol=tol, rtol=0)
    # A spectrum that is NOT Hermitian (random imaginary DC/Nyquist parts): CPU real-part semantics.
    spec = torch.randn(2, 3, size[0], size[1] // 2 + 1, dtype=dtype) \
        + 1j * torch.randn(2, 3, size[0], size[1] // 2 + 1, dtype=dtype)
    out = irfft2_ortho(spec.real, spec.imag, size)
    assert torch.allclose(out, torch.fft.irfft2(spec, s=size, norm="ortho"), atol=tol, rtol=0)
    assert torch.allclose(irfft2_ortho(real, imag, size), x, atol=10 * tol, rtol=0)


@pytest.mark.parametrize("size", [(8, 8), (7, 7), (14, 10)])
def test_hermitian_projection_keeps_the_cpu_inverse_and_makes_columns_hermitian(size):
    spec = torch.randn(1, 2, size[0], size[1] // 2 + 1, dtype=torch.complex128)
    proj = hermitian_project(spec, size[1])
    ref = torch.fft.irfft2(spec, s=size, norm="ortho")
    assert torch.allclose(torch.fft.irfft2(proj, s=size, norm="ortho"), ref, atol=1e-12)
    # After projection the spectrum is a genuine rfft2 output, so a round trip reproduces it.
    assert torch.allclose(torch.fft.rfft2(ref, norm="ortho"), proj, atol=1e-12)


# --- the AFF token mixer -------------------------------------------------------------------------

def _reference_aff(x, mixer, return_masked=False):
    """Spec §2.1 with complex tensors (independent of both forms under test)."""
    k, c, lam = mixer.num_groups, mixer.group_size, mixer.sparsity_threshold
    act = mixer.act
    cplx = lambda p: torch.complex(p[0].to(x.dtype), p[1].to(x.dtype))  # noqa: E731
    spec = torch.fft.rfft2(x, norm="ortho")
    g = spec.reshape(x.shape[0], k, c, *spec.shape[-2:])
    b1, b2 = cplx(mixer.b1)[..., None, None], cplx(mixer.b2)[..., None, None]
    h = torch.einsum("bkihw,kio->bkohw", g, cplx(mixer.w1)) + b1
    h = torch.complex(act(h.real), act(h.imag))
    m = torch.einsum("bkihw,kio->bkohw", h, cplx(mixer.w2)) + b2
    m = torch.complex(F.softshrink(m.real, lam), F.softshrink(m.imag, lam)).reshape(spec.shape)
    out = torch.fft.irfft2(m * spec, s=x.shape[-2:], norm="ortho") + x
    return (out, m * spec) if return_masked else out


def _mixer(dim, trained_like, dtype=torch.float32):
    mixer = AdaptiveFrequencyFilter(dim).to(dtype)
    if trained_like:
        # Large, uneven masks: most bins pass the shrinkage and the masked spectrum is far from
        # Hermitian in the DC/Nyquist columns (what trained weights produce).
        with torch.no_grad():
            for p in mixer.parameters():
                p.copy_(torch.randn_like(p) * 3.0)
    return mixer.eval()


@pytest.mark.parametrize("trained_like", [False, True])
@pytest.mark.parametrize("size", SIZES)
def test_fft_and_dft_forms_are_equal(size, trained_like):
    mixer = _mixer(16, trained_like)
    x = torch.randn(2, 16, *size) * (4.0 if trained_like else 1.0)
    with torch.no_grad():
        fft_out = mixer(x)
        with export_mode(mixer):
            dft_out = mixer(x)
        ref = _reference_aff(x.double(), mixer.double()).float()
    scale = max(1.0, ref.abs().max().item())
    assert (fft_out - ref).abs().max().item() <= 1e-5 * scale
    assert (dft_out - fft_out).abs().max().item() <= 1e-5 * scale
    assert not mixer.exporting


def test_trained_like_masked_spectrum_is_not_hermitian():
    """The case where irfft2 backends may differ (spec §2.7) is really exercised by the tests."""
    mixer = _mixer(16, trained_like=True).double()
    x = torch.randn(1, 16, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        _, masked = _reference_aff(x, mixer, return_masked=True)
    assert (hermitian_project(masked, 8) - masked).abs().max() > 1e-2


def test_forms_agree_in_float64():
    mixer = _mixer(24, trained_like=True, dtype=torch.float64)
    x = torch.randn(1, 24, 14, 10, dtype=torch.float64)
    with torch.no_grad():
        a = mixer(x)
        with export_mode(mixer):
            b = mixer(x)
    assert torch.allclose(a, b, atol=1e-10, rtol=0)
    assert torch.allclose(a, _reference_aff(x, mixer), atol=1e-10, rtol=0)


def test_mixer_runs_in_float32_under_autocast():
    mixer = _mixer(16, trained_like=False)
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), mixer(x.bfloat16().float()).detach(), atol=5e-2)


def test_export_form_has_no_fft_or_complex_op():
    mixer = _mixer(16, trained_like=False)
    with export_mode(mixer):
        ep = torch.export.export(mixer, (torch.randn(1, 16, 8, 8),))
    targets = " ".join(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert "aten.to" not in targets  # float32 all through: no cast ops in the exported file
    assert "fft" not in targets and "complex" not in targets and "softshrink" not in targets
    assert "conv2d" in targets and ("matmul" in targets or "mm" in targets)


def test_mixer_rejects_bad_input():
    with pytest.raises(ValueError, match="divisible"):
        AdaptiveFrequencyFilter(20, num_groups=8)
    with pytest.raises(ValueError, match=r"\[B, 16, H, W\]"):
        AdaptiveFrequencyFilter(16)(torch.randn(1, 8, 4, 4))


# --- whole model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [64, 72])
def test_model_forward_and_export_form_agree(size):
    model = vizoo.create_model("affnet_et", num_classes=10).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        with export_mode(model):
            out_export = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert torch.allclose(out, out_export, atol=1e-4, rtol=1e-4)


def test_layer_norm_export_form_equals_group_norm():
    from vizoo.models.affnet import _LayerNorm2d

    norm = _LayerNorm2d(24)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 24, 5, 7) * 3 + 1
    ref = torch.nn.functional.group_norm(x, 1, norm.weight, norm.bias, norm.eps)
    with torch.no_grad(), export_mode(norm):
        assert torch.allclose(norm(x), ref, atol=1e-5)


# --- official checkpoint keys (spec §2.5) ---------------------------------------------------------

def _official_state_dict(model):
    """Our tensors under the official cvnets names, built from the module structure (§2.5)."""
    sd = {}

    def conv_layer(prefix, m):  # cvnets ConvLayer = block.{conv, norm}
        sd[f"{prefix}.block.conv.weight"] = m.conv.weight
        for k, v in m.bn.state_dict().items():
            sd[f"{prefix}.block.norm.{k}"] = v

    def inverted_residual(prefix, m):
        for name, conv, bn in (("exp_1x1", m.conv_pw, m.bn1), ("conv_3x3", m.conv_dw, m.bn2),
                               ("red_1x1", m.conv_pwl, m.bn3)):
            sd[f"{prefix}.block.{name}.block.conv.weight"] = conv.weight
            for k, v in bn.state_dict().items():
                sd[f"{prefix}.block.{name}.block.norm.{k}"] = v

    conv_layer("conv_1", model.stem)
    for i, stage in enumerate(model.stages):
        layer = f"layer_{i + 1}"
        if i < 2:
            for j, block in enumerate(stage):
                inverted_residual(f"{layer}.{j}", block)
            continue
        inverted_residual(f"{layer}.0", stage[0])
        aff = stage[1]
        for j, blk in enumerate(aff.blocks):
            p = f"{layer}.1.global_rep.{j}"
            for norm in ("norm1", "norm2"):
                sd[f"{p}.{norm}.weight"] = getattr(blk, norm).weight
                sd[f"{p}.{norm}.bias"] = getattr(blk, norm).bias
            for name in ("w1", "b1", "w2", "b2"):
                sd[f"{p}.filter.{name}"] = getattr(blk.token_mixer, name)
            inverted_residual(f"{p}.mlp", blk.channel_mixer)
        n = len(aff.blocks)
        sd[f"{layer}.1.global_rep.{n}.weight"] = aff.norm.weight
        sd[f"{layer}.1.global_rep.{n}.bias"] = aff.norm.bias
        conv_layer(f"{layer}.1.conv_proj", aff.conv_proj)
        conv_layer(f"{layer}.1.fusion", aff.conv_fusion)
    conv_layer("conv_1x1_exp", model.final_conv)
    sd["classifier.fc.weight"] = model.head.fc.weight
    sd["classifier.fc.bias"] = model.head.fc.bias
    return {k: v.detach().clone() for k, v in sd.items()}


def test_official_keys_load_through_the_filter(tmp_path):
    source = vizoo.create_model("affnet_et").eval()
    with torch.no_grad():  # make every tensor distinct so a wrong mapping cannot go unnoticed
        for t in source.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t).abs() + 0.5 if t.ndim == 1 else torch.randn_like(t) * 0.1)
    official = _official_state_dict(source)
    assert len(official) == 416
    shapes = {"conv_1.block.conv.weight": (16, 3, 3, 3),
              "layer_3.1.global_rep.0.filter.w1": (2, 8, 8, 8),
              "layer_4.1.global_rep.3.mlp.block.exp_1x1.block.conv.weight": (208, 104, 1, 1),
              "layer_5.1.global_rep.3.weight": (144,),
              "layer_5.1.fusion.block.conv.weight": (144, 288, 1, 1),
              "conv_1x1_exp.block.norm.num_batches_tracked": (),
              "classifier.fc.weight": (1000, 576)}
    for key, shape in shapes.items():
        assert tuple(official[key].shape) == shape, key
    path = tmp_path / "checkpoint_ema_score_73.0238.pt"
    torch.save(official, path)
    loaded = vizoo.create_model("affnet_et", pretrained=str(path)).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


def test_incomplete_official_checkpoint_is_a_clear_error(tmp_path):
    official = _official_state_dict(vizoo.create_model("affnet_et"))
    official.pop("layer_4.1.global_rep.2.filter.w2")
    path = tmp_path / "bad.pt"
    torch.save(official, path)
    with pytest.raises(vizoo.CheckpointError, match="token_mixer.w2"):
        vizoo.create_model("affnet_et", pretrained=str(path))


def test_weights_note_explains_how_to_load_official_weights():
    cfg = vizoo.get_pretrained_cfg("affnet_et")
    assert not cfg.has_weights and "OneDrive" in cfg.notes and "pretrained=" in cfg.notes
    with pytest.raises(vizoo.CheckpointError, match="OneDrive"):
        vizoo.create_model("affnet_et", pretrained=True)


def test_head_width_is_capped_at_960():
    model = vizoo.create_model("affnet", num_classes=0).eval()
    assert model.num_features == 960 and model.get_classifier() is not None
    assert model.forward_head(torch.randn(1, 960, 2, 2), pre_logits=True).shape == (1, 960)
    model.reset_classifier(5)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 5) and math.isclose(model.drop_rate, 0.1)


def test_coreml_export_at_32px_with_1x1_maps_verifies(tmp_path):
    """At 32 px input AFFNet's last stage runs on 1x1 maps, where coremltools 9's
    reduce_transposes pass emits an invalid reshape; the exporter retries without it and the MIL
    executor checks the result (the digits recipe trains affnet_et at 32 px)."""
    torch.manual_seed(0)
    model = vizoo.create_model("affnet_et", num_classes=10).eval()
    report = vizoo.export(model, formats="coreml", precision=["fp32", "int8"], input_size=(3, 32, 32),
                          out_dir=tmp_path, verify_images=4, latency=False, coreml_inputs="tensor")
    r = report.result("coreml", "fp32")
    assert r.status == "ok", r.reason
    assert r.details["skipped_graph_passes"] == ["common::reduce_transposes"]
    assert r.parity()["rel_max_abs_diff"] <= 1e-4 and r.parity()["top1_agreement"] == 1.0
    # weight compression re-runs coremltools' default pipeline, which hits the same pass
    q = report.result("coreml", "int8")
    assert q.status == "ok", q.reason
    assert q.details["weight_compression"] == "linear8"
    assert q.parity()["cosine_min"] >= 0.95
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    assert PASS_REGISTRY.passes["common::reduce_transposes"].__name__ != "_Skipped"  # restored

"""QuEST quantization toolkit (vizoo.quant): exactness in FP mode, grids, per-step tables, AdaRound."""

import pytest
import torch
import torch.nn as nn

pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import Attention  # noqa: E402

from vizoo.layers.quantizers import AdaRoundQuantizer, UniformQuantizer, affine_params, fake_quant  # noqa: E402
from vizoo.quant import (CalibrationSet, QuantAttnProcessor, QuantConfig, QuantModule, QuantUNet,  # noqa: E402
                         init_act_quantizers, init_weight_quantizers, reconstruct, reconstruct_unit,
                         reconstruction_units, weight_range_search)

CALIB_T = [900, 700, 500, 300, 100]


class TinyDiffusionUNet(nn.Module):
    """The DiffusionUNet interface (``unet`` attribute, ε as a plain tensor) around a tiny UNet2DModel."""

    def __init__(self, num_class_embeds=None):
        super().__init__()
        self.unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                attention_head_dim=8, num_class_embeds=num_class_embeds)
        self.conditional = num_class_embeds is not None
        self.num_train_timesteps, self.beta_schedule = 1000, "linear"

    def forward(self, sample, timestep, class_labels=None):
        return self.unet(sample, timestep, class_labels=class_labels).sample


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest, and two threads stall badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fp_model():
    torch.manual_seed(0)
    return TinyDiffusionUNet().eval()


@pytest.fixture(scope="module")
def calib():
    gen = torch.Generator().manual_seed(1)
    return CalibrationSet(torch.randn(len(CALIB_T), 8, 1, 8, 8, generator=gen), torch.tensor(CALIB_T))


@pytest.fixture(scope="module")
def quantized(fp_model, calib):
    """W4A4 (per-channel activations) with MSE weights, short AdaRound and percentile activation init."""
    torch.manual_seed(0)
    qmodel = QuantUNet(fp_model, QuantConfig(w_bits=4, a_bits=4, act_init="percentile"), CALIB_T).eval()
    init_weight_quantizers(qmodel)
    reconstruct(qmodel, fp_model, calib, iters=5)
    init_act_quantizers(qmodel, calib)
    return qmodel


def _inputs(t=500, n=2):
    gen = torch.Generator().manual_seed(2)
    return torch.randn(n, 1, 8, 8, generator=gen), torch.full((n,), t)


# ---------------------------------------------------------------------------------------- FP exactness
def test_fp_mode_equals_float_model_exactly(fp_model, quantized):
    x, t = _inputs()
    with torch.no_grad():
        ref = fp_model(x, t)
        fresh = QuantUNet(fp_model, QuantConfig(), CALIB_T).eval()
        assert torch.equal(fresh(x, t), ref)
        quantized.set_quant_state(False, False)
        try:
            assert torch.equal(quantized(x, t), ref)
        finally:
            quantized.set_quant_state(True, True)
        assert not torch.equal(quantized(x, t), ref)


def test_parameter_names_match_the_float_model(fp_model, quantized):
    names = {n for n, _ in quantized.named_parameters()}
    for name, _ in fp_model.named_parameters():
        assert f"model.{name}" in names
    assert "model.unet.down_blocks.1.resnets.0.time_emb_proj.weight" in names
    assert all(n.startswith("model.unet.") for n in quantized.te_layer_names())
    assert len(quantized.te_layer_names()) == 8
    assert len(quantized.attn_layer_names()) == 4 * 4  # 4 attention blocks × to_q/k/v/out.0
    mlp = QuantUNet(fp_model, QuantConfig(te_layers="mlp+proj"), CALIB_T)
    assert len(mlp.te_layer_names()) == 10


def test_attention_processor_explicit_path_matches_diffusers_default(fp_model):
    qmodel = QuantUNet(fp_model, QuantConfig(), CALIB_T).eval()
    qmodel.set_attention_explicit(True)
    x, t = _inputs()
    captured = {}
    name = "unet.up_blocks.0.attentions.1"
    hook = fp_model.get_submodule(name).register_forward_hook(
        lambda m, a, kw, out: captured.update(args=a, kwargs=kw, out=out), with_kwargs=True)
    with torch.no_grad():
        fp_model(x, t)
        hook.remove()
        attn = qmodel.get_submodule(f"model.{name}")
        assert isinstance(attn.processor, QuantAttnProcessor)
        out = attn(*captured["args"], **captured["kwargs"])
    assert captured["args"][0].ndim == 4 and attn.group_norm is not None and attn.residual_connection
    torch.testing.assert_close(out, captured["out"], atol=1e-6, rtol=0)


def test_attention_processor_cross_attention_and_mask():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, rescale_output_factor=2.0).eval()
    hidden, context = torch.randn(2, 5, 16), torch.randn(2, 7, 12)
    mask = torch.zeros(2, 1, 7)
    mask[:, :, -2:] = -10000.0
    with torch.no_grad():
        ref = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
        attn.set_processor(QuantAttnProcessor(fp_processor=attn.processor, explicit=True))
        out = attn(hidden, encoder_hidden_states=context, attention_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------- grids
def test_4bit_weight_has_at_most_16_values_per_output_channel(quantized):
    for mode in ("hard", "nearest"):
        quantized.set_weight_mode(mode)
        for name, module in quantized.quant_modules():
            wq = module.quantized_weight()
            flat = wq.reshape(wq.shape[0], -1)
            counts = [torch.unique(row).numel() for row in flat]
            assert max(counts) <= 16, (name, mode, max(counts))
            codes = module.weight_quantizer.int_weight(module.weight)
            assert codes.dtype == torch.long and int(codes.min()) >= 0 and int(codes.max()) <= 15
            assert torch.equal(module.weight_quantizer.dequantize(codes), wq)
    quantized.set_weight_mode("hard")


def test_rtn_fake_quant_is_idempotent():
    x = torch.randn(4, 6, 5, 5) * 3
    q = UniformQuantizer(4, channel_axis=1, num_channels=6)
    q.init_from(x, "minmax")
    q.enabled = True
    once = q(x)
    assert torch.equal(q(once), once)
    assert torch.unique(once[:, 0]).numel() <= 16
    w = torch.randn(8, 3, 3, 3)
    wq = AdaRoundQuantizer(4, w.shape)
    delta, zero = weight_range_search(w, 4, "mse")
    wq.set_params(delta, zero, w)
    wq.mode = "nearest"
    rtn = wq(w)
    assert torch.equal(wq(rtn), rtn)
    wq.mode = "hard"  # α initialised from the fractional part: the hard decision is round-to-nearest
    assert torch.equal(wq(w), rtn)


def test_weight_range_search_matches_a_per_channel_loop():
    torch.manual_seed(3)
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 2, 6).view(-1, 1, 1, 1)
    delta, zero = weight_range_search(w, 4, "mse")
    for c in range(w.shape[0]):
        row, best = w[c].reshape(1, -1), None
        for i in range(80):
            d, z = affine_params(row.min() * (1 - 0.01 * i), row.max() * (1 - 0.01 * i), 4)
            err = (row - fake_quant(row, d, z, 0, 15)).abs().pow(2.4).mean()
            if best is None or err < best[0]:
                best = (err, d, z)
        torch.testing.assert_close(delta[c], best[1])
        assert zero[c] == best[2]
    # a chunked search (memory cap) finds the same ranges
    d2, z2 = weight_range_search(w, 4, "mse", max_elements=w.numel() * 7)
    assert torch.equal(d2, delta) and torch.equal(z2, zero)


def test_softmax_quantizer_is_unsigned_and_per_tensor(quantized):
    attn = quantized.get_submodule("model.unet.mid_block.attentions.0")
    assert attn.act_quantizer_w.unsigned and attn.act_quantizer_w.channel_axis is None
    assert attn.act_quantizer_w.bits == 8 and torch.all(attn.act_quantizer_w.zero_point_table() == 0)
    assert attn.act_quantizer_q.delta_table().shape == (len(CALIB_T), attn.to_q.out_features)  # A4: per channel
    # first/last convs keep 8-bit per-tensor inputs in W4A4
    for name in ("conv_in", "conv_out"):
        q = quantized.get_submodule(f"model.unet.{name}").act_quantizer
        assert q.bits == 8 and q.channel_axis is None and q.delta_table().shape == (len(CALIB_T), 1)
    conv = quantized.get_submodule("model.unet.down_blocks.0.resnets.0.conv1").act_quantizer
    assert conv.bits == 4 and conv.delta_table().shape == (len(CALIB_T), 8)


# ---------------------------------------------------------------------------------------- per-step tables
def test_per_step_switching_picks_the_nearest_calibrated_timestep_at_or_above(quantized):
    expect = {950: 4, 900: 4, 899: 4, 701: 4, 700: 3, 650: 3, 500: 2, 301: 2, 300: 1, 150: 1, 100: 0, 1: 0, 0: 0}
    table = quantized.calib_timesteps.tolist()
    assert table == sorted(CALIB_T)
    for t, index in expect.items():
        assert quantized.set_index_for(t) == index, t
    probe = quantized.get_submodule("model.unet.down_blocks.0.resnets.0.conv1").act_quantizer
    with torch.no_grad():
        for t, index in expect.items():
            x, ts = _inputs(t)
            quantized(x, ts)
            assert probe.set_index == index
        x, ts = _inputs(650)
        out_650 = quantized(x, ts)
        quantized.set_act_set(3)  # pinned: the timestep no longer decides
        quantized(x, torch.full_like(ts, 100))
        assert probe.set_index == 3
        assert torch.equal(quantized(x, ts), out_650)
        quantized.set_act_set(0)  # and the sets really differ
        out_other = quantized(x, ts)
        quantized.set_act_set(None)
        assert not torch.equal(out_other, out_650)


def test_clear_errors(fp_model, quantized):
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="one timestep per batch"):
        quantized(x, torch.tensor([900, 100]))
    fresh = QuantUNet(fp_model, QuantConfig(), CALIB_T)
    fresh.set_quant_state(True, True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="init_act_quantizers"):
        fresh(x, torch.tensor([900, 900]))
    fresh.set_quant_state(True, False)  # weights only: mixed timesteps are fine
    with torch.no_grad():
        fresh(x, torch.tensor([900, 100]))
    with pytest.raises(ValueError, match="weight mode"):
        fresh.set_weight_mode("sharp")
    bad = CalibrationSet(torch.randn(1, 2, 1, 8, 8), torch.tensor([800]))
    with pytest.raises(ValueError, match="calib_timesteps"):
        init_act_quantizers(fresh, bad)


def test_single_set_mode_ignores_the_timestep(fp_model, calib):
    qmodel = QuantUNet(fp_model, QuantConfig(w_bits=8, a_bits=8, per_step=False), CALIB_T).eval()
    init_weight_quantizers(qmodel, method="minmax")
    init_act_quantizers(qmodel, calib, max_samples=4)
    assert qmodel.num_sets == 1
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out = qmodel(x, torch.tensor([900, 100]))  # mixed timesteps are fine with one set
        ref = qmodel.model(x, torch.tensor([900, 100]))
    assert torch.equal(out, ref)


def test_save_load_round_trip_keeps_per_step_tables(fp_model, quantized, tmp_path):
    path = tmp_path / "quest.safetensors"
    with torch.no_grad():
        quantized.get_submodule("model.unet.conv_in.act_quantizer").delta[3].mul_(1.5)  # rows differ
    quantized.save_quant_state(path)
    other = QuantUNet(fp_model, QuantConfig(w_bits=4, a_bits=4), CALIB_T).eval()
    other.load_quant_state(path)
    state, loaded = quantized.state_dict(), other.state_dict()
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[k], loaded[k]) for k in state)
    assert other.weight_mode() == quantized.weight_mode() == "hard"
    other.set_quant_state(True, True)
    rebuilt = QuantUNet.from_file(fp_model, path).eval()
    with torch.no_grad():
        for t in (900, 420, 10):
            x, ts = _inputs(t)
            ref = quantized(x, ts)
            assert torch.equal(other(x, ts), ref)
            assert torch.equal(rebuilt(x, ts), ref)


def test_to_moves_and_converts_the_tables(fp_model):
    qmodel = QuantUNet(fp_model, QuantConfig(a_bits=4), CALIB_T).to(torch.float64)
    q = qmodel.get_submodule("model.unet.down_blocks.0.resnets.0.conv1").act_quantizer
    assert q.delta[0].dtype == torch.float64 and q.zero_point.dtype == torch.float64
    assert q.initialized_sets.dtype == torch.bool and qmodel.calib_timesteps.dtype == torch.long


# ---------------------------------------------------------------------------------------- gradients / AdaRound
def test_ste_gradients_reach_weights_and_activation_scales(quantized):
    module = quantized.get_submodule("model.unet.down_blocks.0.resnets.0.time_emb_proj")
    assert isinstance(module, QuantModule) and module.weight_quantizer.mode == "hard"
    x, ts = _inputs(300)
    quantized.zero_grad(set_to_none=True)
    quantized(x, ts).square().mean().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    deltas = module.act_quantizer.delta
    assert deltas[quantized.set_index_for(300)].grad is not None
    assert deltas[4].grad is None  # other timesteps' rows untouched (Adam skips them)
    assert module.weight_quantizer.alpha.grad is None  # the frozen decision does not train
    quantized.zero_grad(set_to_none=True)


def test_adaround_reduces_block_output_error_vs_nearest(fp_model, calib):
    torch.manual_seed(0)
    qmodel = QuantUNet(fp_model, QuantConfig(w_bits=3, a_bits=8), CALIB_T).eval()
    init_weight_quantizers(qmodel)
    name = "model.unet.down_blocks.0.resnets.0"
    assert name in dict(reconstruction_units(qmodel))
    block, fp_block = qmodel.get_submodule(name), fp_model.get_submodule(name[len("model."):])
    captured = {}
    hook = fp_block.register_forward_hook(lambda m, a, out: captured.update(args=a, out=out))
    x, t, _ = calib.flat()
    with torch.no_grad():
        fp_model(x, t)
    hook.remove()
    stats = reconstruct_unit(block, captured["args"], {}, captured["out"], iters=150, batch_size=8, lr=1e-2,
                             generator=torch.Generator().manual_seed(0))
    assert stats["mse_after"] < 0.9 * stats["mse_before"], stats
    assert all(m.weight_quantizer.mode == "hard" for m in block.modules() if isinstance(m, QuantModule))


def test_reconstruct_runs_every_unit_once(fp_model, calib):
    qmodel = QuantUNet(fp_model, QuantConfig(w_bits=4), CALIB_T).eval()
    init_weight_quantizers(qmodel)
    records = reconstruct(qmodel, None, calib.subset(samples=slice(0, 2)), iters=2, measure=True)
    names = [r["name"] for r in records]
    assert sorted(names) == sorted(n for n, _ in reconstruction_units(qmodel))
    assert names[0] == "model.unet.time_embedding.linear_1"  # execution order, not module order
    assert qmodel.weight_mode() == "hard"


# ---------------------------------------------------------------------------------------- calibration
def test_calibration_batches_have_one_timestep_each(calib):
    seen = 0
    for x, t, y, step in calib.batches(3, shuffle=True, seed=0):
        assert y is None and x.shape[0] == t.shape[0] <= 3
        assert torch.all(t == calib.t[step])
        seen += x.shape[0]
    assert seen == calib.num_steps * calib.num_samples
    with pytest.raises(ValueError, match="fp_eps"):
        next(calib.batches(3, return_eps=True))


def test_collect_calibration_keeps_every_second_ddim_step():
    from vizoo.quant import collect_calibration

    torch.manual_seed(0)
    model = TinyDiffusionUNet(num_class_embeds=3).eval()
    calib = collect_calibration(model, n_samples=4, num_steps=6, keep_every=2, seed=0)
    assert calib.x.shape == (3, 4, 1, 8, 8) and calib.t.shape == (3,)
    assert calib.t.tolist() == sorted(calib.t.tolist(), reverse=True)
    assert calib.class_labels.shape == (3, 4) and calib.fp_eps.shape == calib.x.shape
    again = collect_calibration(model, n_samples=4, num_steps=6, keep_every=2, seed=0)
    assert torch.equal(again.x, calib.x)  # deterministic from the seed (DDIM, η = 0)
    with torch.no_grad():
        eps = model(calib.x[1], calib.t[1].expand(4), calib.class_labels[1])
    torch.testing.assert_close(calib.fp_eps[1], eps)
    qmodel = QuantUNet(model, QuantConfig(w_bits=4, a_bits=8), calib.t.tolist()).eval()
    init_weight_quantizers(qmodel)
    init_act_quantizers(qmodel, calib)
    with torch.no_grad():
        out = qmodel(calib.x[0], calib.t[0].expand(4), calib.class_labels[0])
    assert torch.isfinite(out).all()

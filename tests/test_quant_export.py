"""Low-bit files of a QuEST-quantized UNet: the two-input fp32 export, W4A8 CoreML (int4 weights
mapped value by value, activation grids as quantize/dequantize), W8A8 TFLite full integer, and
the one-line errors. A tiny UNet2DModel (two levels, 16/32 channels) keeps it to about a minute of
one core; the fp32 TFLite file and the latencies are measured by benchmarks/quest_export.py."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusion UNet needs the diffusion extra (pip install 'vizoo[diffusion]')")
for _module in ("coremltools", "litert_torch", "ai_edge_litert", "ai_edge_quantizer"):
    pytest.importorskip(_module, reason="export tests need the export extra (pip install 'vizoo[export]')")

from vizoo.export import export_model  # noqa: E402
from vizoo.export.spec import resolve_spec  # noqa: E402
from vizoo.export.verify import parity_inputs  # noqa: E402
from vizoo.models.diffusion import DiffusionUNet  # noqa: E402
from vizoo.quant import (CalibrationSet, QuantConfig, QuantUNet, init_act_quantizers,  # noqa: E402
                         init_weight_quantizers)

CALIB_STEPS = (900, 500, 100)


def tiny_unet() -> DiffusionUNet:
    torch.manual_seed(0)
    return DiffusionUNet(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                         attention_head_dim=8).eval()


def calibration() -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(x=torch.randn(len(CALIB_STEPS), 8, 1, 16, 16, generator=g), t=torch.tensor(CALIB_STEPS))


def quantized(w_bits: int, a_bits: int, per_step: bool) -> QuantUNet:
    """RTN weights on the min-max grid, min-max activations: a real QuantUNet, quickly."""
    calib = calibration()
    q = QuantUNet(tiny_unet(), QuantConfig(w_bits=w_bits, a_bits=a_bits, per_step=per_step, weight_init="minmax"),
                  calib.t.tolist())
    init_weight_quantizers(q)
    init_act_quantizers(q, calib)
    return q


def example() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 1, 16, 16), torch.tensor([500.0])


@pytest.fixture(scope="module")
def w4a8(tmp_path_factory):
    q = quantized(4, 8, per_step=True)
    report = export_model(q, formats="coreml", precision=("fp32", "w4a8"), example_inputs=example(),
                          out_dir=tmp_path_factory.mktemp("w4a8"), latency=False, verify_images=8)
    return q, report


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    q = quantized(8, 8, per_step=False)
    report = export_model(q, formats="tflite", precision="w8a8", out_dir=tmp_path_factory.mktemp("w8a8"),
                          calibration_data=calibration(), verify_images=8, latency=False)
    return q, report


def test_two_input_model_verifies_on_noisy_samples_over_the_schedule(w4a8, w8a8):
    spec = resolve_spec(tiny_unet(), example_inputs=example())
    assert spec.input_names == ["sample", "timestep"] and not spec.image_input and spec.task == "diffusion"
    pin = parity_inputs(spec, 16)
    t = torch.cat([s[1] for s in pin.samples])
    x = torch.cat([s[0] for s in pin.samples])
    assert len(set(t.tolist())) == 16 and t.min() < 1000 / 16 and t.max() >= 1000 * 15 / 16   # one per stratum
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1                        # x_t ~ N(0, 1)
    r = w4a8[1].result("coreml", "fp32")
    assert r.status == "ok", r.reason
    assert "timesteps stratified" in r.verification["inputs"]
    assert r.parity()["rel_max_abs_diff"] <= 1e-4
    assert "timesteps stratified" in w8a8[1].result("tflite", "w8a8").verification["inputs"]


def test_int4_weights_are_the_quest_weights_value_by_value(w4a8):
    from coremltools.converters.mil.mil import types

    from vizoo.export import mil

    q, report = w4a8
    r = report.result("coreml", "w4a8")
    stored = [op for op in mil.load_program(r.file).function.operations
              if op.op_type == "constexpr_blockwise_shift_scale"]
    assert {types.builtin_to_string(op.inputs["data"].dtype) for op in stored} == {"uint4"}
    expanded = [np.asarray(op.inputs["scale"].val, np.float32)
                * (np.asarray(op.inputs["data"].val, np.float32) - np.asarray(op.inputs["offset"].val, np.float32))
                for op in stored]
    layers = list(q.quant_modules())
    assert len(stored) == len(layers)
    for name, module in layers:
        want = module.quantized_weight().numpy()
        codes = module.weight_quantizer.int_weight(module.weight).numpy()
        assert len(np.unique(codes.reshape(codes.shape[0], -1)[0])) <= 16
        hits = [k for k, op in enumerate(stored) if np.array_equal(np.asarray(op.inputs["data"].val), codes)]
        assert hits, f"{name}: no int4 weight in the package holds its codes"
        assert any(np.array_equal(expanded[k], want) for k in hits), f"{name}: Core ML's weight != QuEST's"
    assert r.details["lowbit"]["weights_lossless"]["lossless"]


def test_w4a8_coreml_verifies_against_the_fake_quant_model(w4a8):
    q, report = w4a8
    r = report.result("coreml", "w4a8")
    assert r.status == "ok", r.reason
    assert r.details["minimum_deployment_target"] == "iOS18"
    low = r.details["lowbit"]
    assert low["activation_set"]["timestep"] == 500 and low["activation_set"]["num_sets"] == 3  # the middle set
    grids = low["activation_grids"]
    assert grids["carried"] == grids["quantizers"] == len(list(q.act_quantizers()))   # QuEST's scales, all of them
    p = r.parity()
    assert p["rel_max_abs_median"] <= 1e-4          # most samples equal the fake-quant model to float rounding
    assert p["cosine_min"] >= r.verification["bounds"]["cosine_min"]
    # size: the codes are half a byte per weight; on this tiny UNet the graph description and the
    # float biases/norms are a large share, so the package is ~1/4 of fp32 (1/6 holds at 1.16 M
    # parameters: benchmarks/quest_export.py)
    params = sum(m.weight.numel() for _, m in q.quant_modules())
    assert r.details["weight_storage"]["code_bytes"] == params // 2
    assert r.details["size_vs_fp32"] < 0.35


def test_w8a8_tflite_is_full_integer_and_verifies(w8a8):
    _, report = w8a8
    r = report.result("tflite", "w8a8")
    assert r.status == "ok", r.reason
    assert r.verification["bounds"]["cosine_min"] == 0.95                 # int8 bounds vs the fake-quant model
    assert {d["dtype"] for d in r.details["io"]["inputs"]} == {"float32"}   # a float timestep is not rounded to int8
    ops = r.details["xnnpack"]["op_counts"]
    assert ops.get("QUANTIZE", 0) > 0 and "BATCH_MATMUL" not in r.details["xnnpack"]["ops_outside"]
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=r.file)
    dtypes = {t["index"]: t["dtype"] for t in it.get_tensor_details()}
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    # the weight layers (not the 1x1 convs that average GroupNorm statistics, which stay float)
    layers = [op for op in it._get_ops_details() if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")
              and "GroupNormExport" not in names[op["outputs"][0]]]
    assert layers and {dtypes[op["inputs"][k]] for op in layers for k in (0, 1)} == {np.int8}  # int8 x int8
    assert r.details["quantization"]["calibration_data"] == "the calibration set you gave"


def test_lowbit_requests_that_cannot_be_met_fail_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="QuEST-quantized UNet") as e:
        export_model(tiny_unet(), formats="coreml", precision="w4a8", out_dir=tmp_path)
    assert "\n" not in str(e.value)
    q = quantized(4, 8, per_step=False)
    with pytest.raises(ValueError, match="does not support"):
        export_model(q, formats="tflite", precision="w4a8", out_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a QuantUNet quantized at W8A8; this one is W4A8"):
        export_model(q, formats="coreml", precision="w8a8", out_dir=tmp_path)
    assert not any(tmp_path.iterdir())                                   # refused before any conversion


def test_explicit_example_inputs_of_a_model_without_a_hook():
    class Mix(torch.nn.Module):
        def forward(self, features, index):
            return features * (index[:, None].float() + 1)

    spec = resolve_spec(Mix(), example_inputs=(torch.randn(2, 5) * 3 + 1, torch.tensor([0, 7])))
    assert spec.batch_size == 2 and spec.input_names == ["features", "index"] and not spec.image_input
    pin = parity_inputs(spec, 4)
    assert "resembling the given example inputs" in pin.source and len(pin.samples) == 4
    feats = torch.cat([s[0] for s in pin.samples])
    index = torch.cat([s[1] for s in pin.samples])
    assert feats.std() > 1 and index.dtype == torch.long and 0 <= int(index.min()) and int(index.max()) <= 7
    from vizoo.export.errors import InputSizeError

    with pytest.raises(InputSizeError, match="batch size"):
        resolve_spec(Mix(), example_inputs=(torch.randn(2, 5), torch.tensor([0])))


def test_a_class_conditional_unet_file_is_timed_and_calibrated(tmp_path):
    """An integer input (the class label): the timing run feeds it a valid index (a random integer
    made TFLite's EMBEDDING_LOOKUP fail, so the file had no latency), and int8 calibration feeds it
    in the file's int32 (int64 samples were refused)."""
    import vizoo

    torch.manual_seed(0)
    cond = vizoo.create_model("ddpm_digits16_cond", block_out_channels=[8, 16, 16], norm_num_groups=4,
                              attention_head_dim=8).eval()
    report = export_model(cond, formats="tflite", precision=("fp32", "int8"), int8_mode="mixed", out_dir=tmp_path,
                          verify_images=4)
    for result in report.results:
        assert result.status == "ok", result.reason
        assert result.latency["median_ms"] > 0, result.latency

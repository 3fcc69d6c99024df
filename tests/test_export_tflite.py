"""TFLite export: parity on real images, int8 bounds, app metadata, and a verifier that can fail."""
import json
import shutil

import numpy as np
import pytest
import torch

from vizoo.data.bundled import normalize, photo_images
from vizoo.export.api import verify_file
from vizoo.export.spec import resolve_spec
from vizoo.export.tflite import read_metadata

from test_export_verify import MEAN, STD, export_labelled_tiny


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_labelled_tiny(tmp_path_factory.mktemp("tflite"), "tflite", ("fp32", "int8"), latency=True)


def test_fp32_file_matches_pytorch_on_64_real_images(exported):
    model, report, out = exported
    r = report.result("tflite", "fp32")
    assert r.status == "ok", r.reason
    p = r.parity()
    assert p["n_samples"] == 64
    assert p["rel_max_abs_diff"] <= 1e-4 and p["top1_agreement"] == 1.0
    assert r.latency["median_ms"] > 0 and r.latency["threads"] == 2
    assert (out / "report.json").is_file()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["results"][0]["status"] == "ok"
    assert on_disk["input"]["shapes"] == [[1, 3, 32, 32]]


def test_file_runs_in_the_plain_interpreter_as_an_app_would(exported):
    """Independent of vizoo's runner: NHWC float input, normalised with the sidecar's numbers."""
    from ai_edge_litert.interpreter import Interpreter

    model, report, out = exported
    side = json.loads((out / "tiny_fp32.tflite.json").read_text())
    assert side["input_layout"] == "NHWC" and side["labels"][3] == "class_3"
    assert side["preprocessing"]["mean"] == pytest.approx(MEAN)
    assert read_metadata(out / "tiny_fp32.tflite")["labels"] == side["labels"]   # embedded too
    it = Interpreter(model_path=str(out / "tiny_fp32.tflite"), num_threads=1)
    it.allocate_tensors()
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    assert list(inp["shape"]) == [1, 32, 32, 3]
    x01 = photo_images(3, 32)
    for img in x01:
        pixels = (img.permute(1, 2, 0).numpy() - np.array(side["preprocessing"]["mean"])) / \
            np.array(side["preprocessing"]["std"])
        it.set_tensor(inp["index"], pixels[None].astype(np.float32))
        it.invoke()
        with torch.no_grad():
            expected = model(normalize(img[None], MEAN, STD)).numpy()
        np.testing.assert_allclose(it.get_tensor(outp["index"]), expected, atol=1e-5)


def test_int8_full_integer_within_stated_bounds(exported):
    _, report, out = exported
    r = report.result("tflite", "int8")
    assert r.status == "ok", r.reason
    # auto timed full against the fp32 file and kept it if not slower; at 10 µs a file this tiny is
    # overhead-bound (int8 about 2x fp32 here), so auto may go on, and then keeps the fastest
    attempts = r.details["int8_attempts"]
    assert attempts[0]["int8_mode"] == "full" and attempts[0]["fp32_latency_ms"] > 0
    timed = [a for a in attempts if a.get("latency_ratio") is not None]
    if attempts[0]["latency_ratio"] <= 1.0:
        assert len(attempts) == 1 and r.details["int8_decision"]["faster_than_fp32"]
    else:
        assert min(timed, key=lambda a: a["latency_ratio"])["int8_mode"] == r.details["int8_mode"]
        assert "no verified int8 mode is faster than the fp32 file" in r.reason
    if r.details["int8_mode"] == "full":
        assert r.details["io"]["inputs"][0]["dtype"] == "int8"      # full integer, int8 I/O
    assert r.details["xnnpack"]["partitions"] == 1
    p = r.parity()
    assert p["cosine_min"] >= r.verification["bounds"]["cosine_min"] == 0.95
    assert p["top1_agreement"] >= 0.75


def test_corrupted_weight_in_file_fails_verification(exported, tmp_path):
    model, _, out = exported
    bad = tmp_path / "tiny_fp32.tflite"
    shutil.copy(out / "tiny_fp32.tflite", bad)
    shutil.copy(out / "tiny_fp32.tflite.json", tmp_path / "tiny_fp32.tflite.json")
    data = bytearray(bad.read_bytes())
    bias = model[-1].bias.detach().numpy().astype(np.float32)
    at = data.find(bias.tobytes())
    assert at > 0, "the classifier bias is stored verbatim in the fp32 file"
    corrupted = bias.copy()
    corrupted[0] += 1.0                                               # one weight, one class
    data[at:at + bias.nbytes] = corrupted.tobytes()
    bad.write_bytes(bytes(data))
    status, reason, details = verify_file("tflite", bad, resolve_spec(model), "fp32")
    assert status == "failed" and "parity out of bounds" in reason
    assert details["functions"]["serving_default"]["parity"]["max_abs_diff"] > 0.5


class _ConstantOnTheLeft(torch.nn.Module):
    """A conv, then a constant matrix applied from the left (like AFFNet's DFT form), a head."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("mix", torch.randn(32, 32) / 32 ** 0.5)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = torch.matmul(self.mix, self.conv(x).relu())
        return self.head(y.mean((2, 3)))


def test_dynamic_int8_file_with_a_constant_matmul_operand_loads_and_verifies(tmp_path):
    import vizoo

    torch.manual_seed(0)
    model = _ConstantOnTheLeft().eval()
    report = vizoo.export(model, formats="tflite", precision="int8", input_size=(3, 32, 32), out_dir=tmp_path,
                          verify_images=8, latency=False, int8_mode="dynamic")
    r = report.result("tflite", "int8")
    assert r.status == "ok", r.reason                 # the runtime refused an int8 BATCH_MATMUL LHS before
    assert r.parity()["cosine_min"] >= 0.95


def _op_input_types(path) -> dict[str, set[str]]:
    """Type of the first input of every op in a .tflite, read from the flatbuffer schema."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAsModel(open(path, "rb").read(), 0)
    op_names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    type_names = {v: k for k, v in vars(fb.TensorType).items() if not k.startswith("_")}
    graph, out = model.Subgraphs(0), {}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        name = op_names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
        out.setdefault(name, set()).add(type_names[graph.Tensors(op.Inputs(0)).Type()])
    return out


def test_mixed_int8_runs_weight_layers_in_int8_and_softmax_in_float(tmp_path):
    """The mode for ViTs: matmul layers int8, attention softmax and norms float, and closer to
    PyTorch than full integer on the same calibration (random weights: neither meets the bound,
    whose top-1 criterion needs a trained model; benchmarks/int8_trained.py measures that)."""
    import timm

    import vizoo

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                            num_heads=2, num_classes=10).eval()
    cos = {}
    for mode in ("full", "mixed"):
        report = vizoo.export(vit, formats="tflite", precision="int8", input_size=(3, 32, 32),
                              out_dir=tmp_path / mode, verify_images=16, latency=False, int8_mode=mode)
        r = report.result("tflite", "int8")
        assert r.details["quantization"]["int8_mode"] == mode
        cos[mode] = r.parity()["cosine_mean"]
    assert r.details["io"]["inputs"][0]["dtype"] == "float32"       # mixed: float I/O
    types = _op_input_types(r.file)
    assert types["FULLY_CONNECTED"] == {"INT8"} and types["CONV_2D"] == {"INT8"}
    assert types["SOFTMAX"] == {"FLOAT32"}
    assert cos["mixed"] > cos["full"]


def test_int8_auto_falls_back_and_says_why(tmp_path):
    """Calibrated on flat grey frames, the activation ranges are useless for photographs: full and
    mixed int8 miss the bound, auto goes on to dynamic range (no calibration) and keeps it."""
    import vizoo

    from test_export_verify import MEAN, STD

    torch.manual_seed(0)  # unbounded activations (ReLU, not ReLU6): their ranges come from calibration
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": MEAN, "std": STD, "num_classes": 10}
    gray = torch.full((8, 3, 32, 32), 0.45)   # ~ the mean colour: normalised to almost zero
    report = vizoo.export(model, formats="tflite", precision="int8", out_dir=tmp_path,
                          calibration_data=gray, verify_images=32, latency=False)
    r = report.result("tflite", "int8")
    attempts = r.details["int8_attempts"]
    assert [a["int8_mode"] for a in attempts] == ["full", "mixed", "dynamic"]
    assert [a["status"] for a in attempts] == ["failed", "failed", "ok"]
    assert "parity out of bounds" in attempts[0]["reason"]
    assert r.status == "ok" and r.details["int8_mode"] == "dynamic"
    assert r.reason.startswith("int8_mode auto chose dynamic (full: ")
    assert json.loads((tmp_path / "report.json").read_text())["results"][0]["details"]["int8_mode"] == "dynamic"

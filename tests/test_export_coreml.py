"""CoreML export: both functions verified by the MIL executor, app metadata, fp16 bounds, and a
verifier that fails on a corrupted weight."""
import json
import shutil

import numpy as np
import torch
import pytest

from vizoo.export.api import verify_file
from vizoo.export.spec import resolve_spec

from test_export_verify import MEAN, export_labelled_tiny, tiny_classifier


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_labelled_tiny(tmp_path_factory.mktemp("coreml"), "coreml", ("fp32", "fp16"), latency=False)


@pytest.fixture(scope="module")
def exported_both(tmp_path_factory):
    return export_labelled_tiny(tmp_path_factory.mktemp("coreml_both"), "coreml", ("fp32",), latency=False,
                                coreml_inputs="both")


def test_default_package_is_one_image_function_at_the_lowest_target(exported):
    import coremltools as ct

    _, report, out = exported
    r = report.result("coreml", "fp32")
    assert r.status == "ok", r.reason
    fns = r.verification["functions"]
    assert set(fns) == {"main"} and fns["main"]["input"] == "image"
    assert fns["main"]["parity"]["n_samples"] == 64          # alone, the image function sees every image
    assert fns["main"]["parity"]["rel_max_abs_diff"] <= 1e-4 and fns["main"]["parity"]["top1_agreement"] == 1.0
    assert r.details["minimum_deployment_target"] == "iOS15" and r.details["minimum_macos"] == "macOS12"
    # what the file itself declares: ML Program spec version 6 is iOS 15 / macOS 12
    spec = ct.models.MLModel(str(out / "tiny_fp32.mlpackage"), skip_model_load=True).get_spec()
    assert spec.specificationVersion == 6
    assert spec.description.input[0].type.WhichOneof("Type") == "imageType"
    assert spec.description.predictedFeatureName == "classLabel"


def test_fp32_multifunction_package_verified_by_mil_executor(exported_both):
    _, report, _ = exported_both
    r = report.result("coreml", "fp32")
    assert r.status == "ok", r.reason
    assert r.details["minimum_deployment_target"] == "iOS18"
    fns = r.verification["functions"]
    assert set(fns) == {"main", "tensor"}
    assert fns["main"]["input"] == "image" and fns["tensor"]["input"] == "tensor"
    assert fns["tensor"]["parity"]["n_samples"] == 64
    for fn in fns.values():
        assert fn["parity"]["rel_max_abs_diff"] <= 1e-4
        assert fn["parity"]["top1_agreement"] == 1.0


def test_package_carries_what_an_app_needs(exported_both):
    import coremltools as ct

    _, _, out = exported_both
    spec = ct.models.MLModel(str(out / "tiny_fp32.mlpackage"), skip_model_load=True).get_spec()
    desc = spec.description
    functions = {f.name: f for f in desc.functions}
    image_fn, tensor_fn = functions["main"], functions["tensor"]
    assert image_fn.input[0].type.WhichOneof("Type") == "imageType"
    assert image_fn.predictedFeatureName == "classLabel"
    assert list(tensor_fn.input[0].type.multiArrayType.shape) == [1, 3, 32, 32]
    meta = dict(desc.metadata.userDefined)
    assert meta["vizoo.model"] == "tiny"
    assert json.loads(meta["vizoo.labels"])[2] == "class_2"
    assert json.loads(meta["vizoo.preprocessing"])["mean"] == pytest.approx(MEAN)
    # the labels sit in the classify op of the image function
    mil = spec.mlProgram.functions["main"].block_specializations
    ops = [op.type for block in mil.values() for op in block.operations]
    assert "classify" in ops


def test_fp16_within_stated_bounds(exported):
    _, report, _ = exported
    r = report.result("coreml", "fp16")
    assert r.status == "ok", r.reason
    assert r.details["compute_precision"] == "fp16"
    for fn in r.verification["functions"].values():
        p = fn["parity"]
        assert p["rel_max_abs_diff"] <= 1e-2 and p["cosine_min"] >= 0.999
        assert p["rel_max_abs_diff"] > 0  # half precision really was used


def test_corrupted_weight_in_package_fails_verification(exported, tmp_path):
    model, _, out = exported
    bad = tmp_path / "tiny_fp32.mlpackage"
    shutil.copytree(out / "tiny_fp32.mlpackage", bad)
    blob = bad / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(blob.read_bytes())
    weight = model[-1].weight.detach().numpy().astype(np.float32)   # classifier, stored verbatim
    at = data.find(weight.tobytes())
    assert at > 0, "the classifier weight is stored verbatim in the fp32 package"
    corrupted = weight.copy()
    corrupted[0, :] *= -4.0                                          # one class's weights
    data[at:at + weight.nbytes] = corrupted.tobytes()
    blob.write_bytes(bytes(data))
    status, reason, details = verify_file("coreml", bad, resolve_spec(model), "fp32")
    assert status == "failed" and "parity out of bounds" in reason
    assert all(f["parity"]["top1_agreement"] < 1 or f["parity"]["rel_max_abs_diff"] > 1e-2
               for f in details["functions"].values())


class _CancellingHead(torch.nn.Module):
    """A classifier whose output passes through a large-magnitude add/subtract that cancels:
    exact in fp32, off by whole units in fp16 arithmetic (its spacing near 4096 is 4)."""

    def __init__(self):
        super().__init__()
        self.body = tiny_classifier()
        self.pretrained_cfg = self.body.pretrained_cfg

    def forward(self, x):
        h = self.body(x)
        return h + ((h * 4096.0 + 2048.0) - h * 4096.0 - 2048.0)


def test_fp16_auto_falls_back_to_fp32_elementwise_ops_and_says_why(tmp_path):
    from vizoo.export import export_model
    from coremltools.converters.mil.mil import types

    from vizoo.export.mil import load_program
    from vizoo.export.mil.program import iter_ops

    report = export_model(_CancellingHead().eval(), formats="coreml", precision="fp16", out_dir=tmp_path,
                          name="cancel", verify_images=16, latency=False, coreml_inputs="tensor")
    r = report.result("coreml", "fp16")
    attempts = r.details["fp16_attempts"]
    assert [a["fp16_mode"] for a in attempts] == ["all", "mixed"]
    assert attempts[0]["status"] == "failed"                   # all-fp16 arithmetic misses the bound
    assert r.status == "ok", r.reason
    assert r.details["fp16_mode"] == "mixed" and r.reason.startswith("fp16_mode auto chose mixed (all: ")
    assert r.parity()["rel_max_abs_diff"] <= 1e-2
    # in the kept file the weight layers compute in fp16, the cancelling adds in fp32
    program = load_program(tmp_path / "cancel_fp16.mlpackage")
    out_dtypes: dict[str, set] = {}
    for op in iter_ops(program.function):
        out_dtypes.setdefault(op.op_type, set()).update(types.builtin_to_string(v.dtype) for v in op.outputs)
    assert out_dtypes["conv"] == {"fp16"} and out_dtypes["linear"] == {"fp16"}
    assert out_dtypes["add"] == {"fp32"} and "fp32" in out_dtypes["mul"]

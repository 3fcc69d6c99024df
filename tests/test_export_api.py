"""The export API on a user's timm model, its errors, and the CLI commands."""
import csv
import sys

import pytest
import torch
import torch.nn as nn

import vizoo
from vizoo.cli import main as vizoo_main
from vizoo.export.errors import MissingDependencyError


def test_timm_model_through_the_same_api(tmp_path):
    import timm

    # timm's own tiny EfficientNet (depthwise convs, squeeze-excite, SiLU) keeps this test fast;
    # benchmarks/export_matrix.py exports mobilenetv2_100 at 224 px through the same call.
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    report = vizoo.export(model, input_size=64, out_dir=tmp_path, name="test_efficientnet",
                          verify_images=16, latency=False, coreml_inputs="image")
    for fmt in ("tflite", "coreml"):
        r = report.result(fmt, "fp32")
        assert r.status == "ok", r.reason
        for fn in r.verification["functions"].values():
            assert fn["parity"]["rel_max_abs_diff"] <= 1e-4 and fn["parity"]["top1_agreement"] == 1.0
    assert report.input["shapes"] == [[1, 3, 64, 64]]
    assert report.input["mean"] == pytest.approx(model.pretrained_cfg["mean"])   # timm's config


class FFTMixer(nn.Module):
    """AFFNet-style global filter written with torch.fft: neither converter takes it."""

    def forward(self, x):
        return torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho"), s=x.shape[-2:], norm="ortho")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.mixer = FFTMixer()

    def forward(self, x):
        return self.mixer(self.conv(x))


def test_unsupported_op_names_module_op_and_fix_and_leaves_no_file(tmp_path):
    model = nn.Sequential(Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    report = vizoo.export(model, input_size=(3, 16, 16), out_dir=tmp_path, name="fftnet",
                          latency=False, verify_images=4)
    assert not report.ok
    for fmt in ("coreml", "tflite"):
        r = report.result(fmt, "fp32")
        assert r.status == "failed" and r.file is None
        assert r.error["module_path"] == "0.mixer" and r.error["module_type"] == "FFTMixer"
        assert "fft" in r.error["op"]
        assert "ExportAware" in r.error["fix"] and "0.mixer" in r.reason
    # nothing half-written: only the report is there (no .tflite, .mlpackage or temporaries)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_missing_converter_says_install_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)      # as if it were not installed
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    with pytest.raises(MissingDependencyError, match=r"install vizoo\[export\]"):
        vizoo.export(model, formats="coreml", input_size=(3, 16, 16), out_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_export_rejects_bad_size_before_converting(tmp_path, capsys):
    code = vizoo_main(["export", "timm:mobilenetv2_050", "--format", "tflite", "--img-size", "4",
                       "--out", str(tmp_path)])
    assert code == 2
    assert "too small" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_bench_prints_table_and_writes_csv(tmp_path, capsys):
    out = tmp_path / "bench.csv"
    code = vizoo_main(["bench", "timm:mobilenetv2_050", "--backend", "torch", "--img-size", "32",
                       "--threads", "1", "--warmup", "1", "--runs", "3", "--csv", str(out)])
    assert code == 0
    assert "| timm:mobilenetv2_050 | torch |" in capsys.readouterr().out
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["backend"] == "torch" and float(rows[0]["median_ms"]) > 0
    assert int(rows[0]["runs"]) >= 3 and rows[0]["input"] == "1x3x32x32"


def _tiny_classifier() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 5)).eval()


def test_input_size_may_be_the_tensor_shape_with_batch(tmp_path):
    report = vizoo.export(_tiny_classifier(), formats="tflite", input_size=(1, 3, 32, 32), out_dir=tmp_path,
                          name="tiny", verify_images=4, latency=False)
    r = report.result("tflite", "fp32")
    assert r.status == "ok", r.reason
    assert report.input["shapes"] == [[1, 3, 32, 32]]
    # B disagreeing with batch_size, or a 5-D size, is refused with what to give
    with pytest.raises(ValueError, match="batch 2 but batch_size is 3"):
        vizoo.export(_tiny_classifier(), formats="tflite", input_size=(2, 3, 32, 32), batch_size=3,
                     out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        vizoo.export(_tiny_classifier(), formats="tflite", input_size=(1, 1, 3, 32, 32), out_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "wrong channels", "wrong size"])
def test_bad_calibration_data_fails_before_any_conversion(tmp_path, case):
    import time

    data = {"missing folder": tmp_path / "no_such_folder", "empty folder": tmp_path / "empty",
            "wrong channels": torch.rand(8, 1, 32, 32), "wrong size": torch.rand(8, 3, 64, 64)}[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as info:
        # int8_mode auto would otherwise fall back to a dynamic-range file that needs no calibration
        vizoo.export(_tiny_classifier(), formats="tflite", precision="int8", input_size=32,
                     calibration_data=data, out_dir=out, latency=False)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    expected = {"missing folder": "does not exist", "empty folder": "has no images",
                "wrong channels": "(3, 32, 32)", "wrong size": "(3, 32, 32)"}[case]
    assert expected in message and "pass a folder of images" in message
    assert not out.exists()                      # nothing converted, nothing written
    assert time.perf_counter() - t0 < 10


def test_cli_missing_calibration_folder_is_one_line_and_exit_2(tmp_path, capsys):
    code = vizoo_main(["export", "timm:mobilenetv2_050", "--format", "tflite", "--precision", "int8",
                       "--img-size", "32", "--calibration", str(tmp_path / "missing"),
                       "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "calibration folder" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()

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

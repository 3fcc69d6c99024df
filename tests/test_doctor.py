"""`vizoo doctor`: passes on a working install, fails with one line on a broken converter."""
import json
import os
import subprocess
import sys

from vizoo.cli import main


def test_doctor_passes_here_with_its_selfcheck(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["problems"] == []
    packages = {p["module"]: p for p in report["packages"]}
    for module in ("torch", "torchvision", "timm", "numpy", "coremltools", "litert_torch",
                   "ai_edge_litert", "ai_edge_quantizer"):
        assert packages[module]["imports"], packages[module]
        assert packages[module]["installed"]
    # the pins come from vizoo's installed metadata and are shown beside the installed version
    assert packages["coremltools"]["expected"].startswith("==") and packages["coremltools"]["extra"] == "export"
    assert packages["torch"]["expected"].startswith("==")
    assert "vizoo.export.mil" in report["coreml_verification"] or "Core ML" in report["coreml_verification"]
    assert report["torch_threads"]["intra_op"] >= 1
    results = {r["format"]: r for r in report["selfcheck"]["results"]}
    assert set(results) == {"coreml", "tflite"}
    assert all(r["status"] == "ok" for r in results.values()), results


def test_doctor_text_report(capsys):
    assert main(["doctor", "--no-selfcheck"]) == 0
    out = capsys.readouterr().out
    for text in ("Python", "platform", "coremltools", "ai-edge-quantizer", "OpenCV",
                 "CoreML files are verified by", "torch threads", "self-check: skipped", "all good"):
        assert text in out, text


def test_doctor_fails_with_one_line_when_a_converter_does_not_import(tmp_path):
    # a real import failure: a coremltools package earlier on the path that raises on import
    fake = tmp_path / "shadow" / "coremltools"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("libcoremlpython is missing")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "vizoo", "doctor", "--no-selfcheck"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("vizoo doctor:")]
    assert len(lines) == 1, out.stderr[-2000:]
    assert "coremltools does not import" in lines[0] and "libcoremlpython is missing" in lines[0]
    assert "pip install 'vizoo[export]'" in lines[0]
    assert "FAILED" in out.stdout and "1 problem(s)" in out.stdout


def test_version_outside_the_pin_is_flagged_beside_the_expected_one(capsys, monkeypatch):
    import vizoo.doctor as doctor

    pins = {**doctor.pinned_requirements(), "numpy": ("==0.1", None)}
    monkeypatch.setattr(doctor, "pinned_requirements", lambda: pins)
    assert main(["doctor", "--no-selfcheck"]) == 0          # a warning, not a failure
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("numpy"))
    assert "==0.1" in row and "VERSION MISMATCH" in row
    assert "warning: numpy" in out and "pip install 'numpy==0.1'" in out

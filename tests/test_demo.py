"""Webcam demos (`vizoo demo classify|detect`, demos/webcam_*.py), driven headless on videos the
tests write from the bundled digits and shapes, with tiny models exported once per module.

What is checked is what a user sees: the saved frames carry the overlay exactly where the model's
answer says (and nowhere else), the printed statistics parse, bad input is one line and exit 2,
and the window (under Xvfb, when installed) shows the annotated frame.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

try:
    import cv2
except ModuleNotFoundError:   # a cv2 that is installed but does not load (libGL missing) fails loudly
    pytest.skip("OpenCV is not installed (pip install 'vizoo[demo]')", allow_module_level=True)
pytest.importorskip("ai_edge_litert", reason="the demos' TFLite runs need ai-edge-litert (vizoo[export])")

from vizoo.cli import main  # noqa: E402
from vizoo.demo import overlay  # noqa: E402
from vizoo.demo.classify import ClassifyTask  # noqa: E402
from vizoo.demo.detect import DetectTask  # noqa: E402
from vizoo.demo.errors import DemoError  # noqa: E402
from vizoo.demo.loop import parse_summary, run_demo  # noqa: E402
from vizoo.demo.runners import Preprocessing, TFLiteBackend, TorchBackend, read_export_metadata  # noqa: E402
from vizoo.demo.samples import digits_frames, shapes_frames, write_video  # noqa: E402
from vizoo.demo.sources import LiveSource  # noqa: E402

from test_export_verify import MEAN, STD, tiny_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_FRAMES = 6
DET_LABELS = ["circle", "square", "triangle"]
DET_SIZE = 64
#: the tiny detector's answer, whatever the image: query -> (class, score, box in input pixels)
DET_BOXES = [[4.0, 4.0, 28.0, 20.0], [30.0, 34.0, 60.0, 60.0], [0.0, 0.0, 64.0, 64.0]]
DET_LOGITS = [[4.0, -4.0, -4.0], [-4.0, 2.0, -4.0], [-4.0, -4.0, -4.0]]


class TinyDetector(nn.Module):
    """A detector whose answer is known: two confident boxes (classes 0 and 1), one below any
    sensible threshold. The image still flows through a conv, so nothing is constant-folded."""

    export_task = "detection"

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.logits = nn.Parameter(torch.tensor(DET_LOGITS))
        self.boxes = nn.Parameter(torch.tensor(DET_BOXES))
        self.pretrained_cfg = {"input_size": (3, DET_SIZE, DET_SIZE), "mean": MEAN, "std": STD, "num_classes": 3}
        self.labels = list(DET_LABELS)

    def forward_export(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.conv(x).mean(dim=(1, 2, 3)).view(-1, 1, 1) * 1e-6
        return torch.sigmoid(self.logits + g), self.boxes + g

    forward = forward_export


def _expected_frame_boxes(frame_hw: tuple[int, int]) -> list[tuple[int, list[float], float]]:
    """(class, frame box, score) of the detections above 0.3, from the letterbox geometry."""
    scale = min(DET_SIZE / frame_hw[0], DET_SIZE / frame_hw[1])
    out = []
    for q, logits in enumerate(DET_LOGITS):
        c = int(np.argmax(logits))
        score = 1 / (1 + np.exp(-logits[c]))
        if score >= 0.3:
            out.append((c, [v / scale for v in DET_BOXES[q]], score))
    return out


# --- fixtures: exported files and videos, made once per module ------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from vizoo.export import export_model

    out = tmp_path_factory.mktemp("demo_files")
    cls = tiny_classifier()
    cls.labels = [f"digit{i}" for i in range(10)]
    r = export_model(cls, formats="tflite", precision="fp32", out_dir=out, name="tinycls", verify=False,
                     latency=False)
    assert r.results[0].file, r.results[0].reason
    det = TinyDetector().eval()
    r = export_model(det, formats="tflite", precision="fp32", out_dir=out, name="tinydet", verify=False,
                     latency=False)
    assert r.results[0].file, r.results[0].reason
    digits = [f for f, _ in digits_frames(N_FRAMES, height=240, width=320)]
    shapes = [f for f, _ in shapes_frames(N_FRAMES, scale=2)]
    write_video(out / "digits.mp4", digits)
    write_video(out / "shapes.mp4", shapes)
    return {"dir": out, "cls": out / "tinycls_fp32.tflite", "det": out / "tinydet_fp32.tflite",
            "cls_model": cls, "det_model": det, "digits": out / "digits.mp4", "shapes": out / "shapes.mp4"}


def _decoded(video: Path) -> list[np.ndarray]:
    """The video's frames as the demo decodes them (same OpenCV, same FFmpeg)."""
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames


def _stats(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("stats:")]
    assert len(lines) == 1, out
    return parse_summary(lines[0])


def _one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("vizoo demo: error: ")
    for fragment in fragments:
        assert fragment in err, err
    return err


# --- classification ---------------------------------------------------------------------------------

def test_classify_tflite_headless_saves_frames_with_the_topk_panel(files, tmp_path, capsys):
    out_dir = tmp_path / "frames"
    assert main(["demo", "classify", "--tflite", str(files["cls"]), "--source", str(files["digits"]),
                 "--headless", "--save", str(out_dir), "--topk", "3"]) == 0
    out = capsys.readouterr().out
    stats = _stats(out)
    assert stats["task"] == "classify" and stats["frames"] == N_FRAMES and stats["dropped"] == 0
    assert stats["fps"] > 0 and stats["infer_ms"] > 0 and stats["seconds"] > 0
    # one line per frame: three "label probability" pairs, best first, from the file's labels
    per_frame = [line for line in out.splitlines() if line.startswith("frame_")]
    assert len(per_frame) == N_FRAMES
    for line in per_frame:
        pairs = re.findall(r"(digit\d) (\d\.\d+)", line)
        probs = [float(p) for _, p in pairs]
        assert len(pairs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    raw = _decoded(files["digits"])
    saved = sorted(out_dir.glob("*.png"))
    assert len(saved) == len(raw) == N_FRAMES
    for frame, path in zip(raw, saved):
        annotated = cv2.imread(str(path))
        assert annotated.shape == frame.shape == (240, 320, 3)
        changed = np.any(annotated != frame, axis=-1)
        h, w = changed.shape
        panel, status = changed[: h // 2, : w * 2 // 3], changed[h * 3 // 4:, :]
        assert panel.sum() > 300 and status.sum() > 300          # top-k panel and status line drawn
        rest = changed.copy()
        rest[: h // 2, : w * 2 // 3] = False
        rest[h * 3 // 4:, :] = False
        assert rest.sum() == 0                                   # and nothing else touched


def test_classify_saves_a_video(files, tmp_path, capsys):
    video = tmp_path / "out.mp4"
    assert main(["demo", "classify", "--tflite", str(files["cls"]), "--source", str(files["digits"]),
                 "--headless", "--save", str(video), "--max-frames", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert _stats(out)["frames"] == 4 and "frame_" not in out        # --quiet: the summary only
    written, raw = _decoded(video), _decoded(files["digits"])
    assert len(written) == 4 and written[0].shape == raw[0].shape
    for a, b in zip(written, raw):
        diff = np.abs(a.astype(int) - b.astype(int)).mean(-1)
        assert diff[:60, :120].mean() > 15          # the panel (lossy video: mean differences)
        assert diff[80:170, 60:260].mean() < 6      # the digit in the middle is left alone


def test_tflite_backend_matches_pytorch_with_the_same_pre_and_post_processing(files):
    """The reference app path (sidecar -> NHWC float -> interpreter) against the PyTorch model fed
    by the same geometry step: the same probabilities and the same boxes."""
    frames = _decoded(files["digits"])[:3]
    tfl = TFLiteBackend(files["cls"])
    assert tfl.task == "classify" and tfl.labels == [f"digit{i}" for i in range(10)]
    assert tfl.pre == Preprocessing(3, 32, 32, MEAN, STD, "bilinear", 1.0)
    torch_cls = TorchBackend(files["cls_model"], tfl.pre, None, "classify", "pytorch tiny")
    task = ClassifyTask(topk=10)
    for f in frames:
        pixels, geom = task.geometry(f, tfl.pre)
        a = task.postprocess(tfl(pixels), geom, f.shape, None)
        b = task.postprocess(torch_cls(pixels), geom, f.shape, None)
        assert a.ids[0] == b.ids[0]
        np.testing.assert_allclose(sorted(a.probs), sorted(b.probs), atol=1e-5)
    det = TFLiteBackend(files["det"])
    assert det.task == "detect" and det.pre.size_text == "64x64"
    shapes = _decoded(files["shapes"])[0]
    torch_det = TorchBackend(files["det_model"], det.pre, None, "detect", "pytorch tinydet")
    dtask = DetectTask(topk=5, threshold=0.3)
    pixels, geom = dtask.geometry(shapes, det.pre)
    a = dtask.postprocess(det(pixels), geom, shapes.shape, None)
    b = dtask.postprocess(torch_det(pixels), geom, shapes.shape, None)
    assert [d.class_id for d in a] == [d.class_id for d in b] == [0, 1]
    np.testing.assert_allclose([d.box for d in a], [d.box for d in b], atol=1e-3)


def test_read_export_metadata_is_the_sidecar_or_the_embedded_copy(files, tmp_path):
    meta = read_export_metadata(files["cls"])
    assert meta["labels"][3] == "digit3" and meta["input_layout"] == "NHWC"
    bare = tmp_path / "bare.tflite"
    shutil.copy(files["cls"], bare)                    # no sidecar: the metadata inside the file
    assert read_export_metadata(bare)["labels"] == meta["labels"]


def test_coreml_package_gives_the_tflite_answer(files, tmp_path, capsys):
    """--coreml: the image function fed the RGB picture (normalised inside the package); on Linux
    run by vizoo's MIL executor. Same top-k as the .tflite of the same model."""
    pytest.importorskip("coremltools")
    from vizoo.export import export_model

    r = export_model(files["cls_model"], formats="coreml", precision="fp32", out_dir=tmp_path, name="tinycls",
                     verify=False, latency=False)
    assert r.results[0].file, r.results[0].reason
    answers = []
    for flag, path in (("--coreml", r.results[0].file), ("--tflite", str(files["cls"]))):
        assert main(["demo", "classify", flag, path, "--source", str(files["digits"]), "--headless",
                     "--max-frames", "3"]) == 0
        out = capsys.readouterr().out
        answers.append([re.findall(r"(digit\d) (\d\.\d+)", line) for line in out.splitlines()
                        if line.startswith("frame_")])
    coreml, tflite = answers
    assert len(coreml) == 3
    for a, b in zip(coreml, tflite):
        assert [label for label, _ in a] == [label for label, _ in b]
        np.testing.assert_allclose([float(p) for _, p in a], [float(p) for _, p in b], atol=2e-3)


# --- detection ----------------------------------------------------------------------------------

def _edge_hits(image: np.ndarray, box: list[float], colour: tuple[int, int, int]) -> float:
    """Fraction of the box's left and right edge pixels drawn in ``colour`` (above the status line
    at the bottom, which is drawn over everything)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    rows = slice(y0 + 2, min(y1 - 1, image.shape[0] - 30))
    edge = np.concatenate([image[rows, x0], image[rows, x1]])
    return float(np.mean(np.all(edge == np.array(colour, np.uint8), axis=-1)))


def test_detect_tflite_draws_the_boxes_where_the_model_says_and_nowhere_else(files, tmp_path, capsys):
    out_dir = tmp_path / "frames"
    assert main(["demo", "detect", "--tflite", str(files["det"]), "--source", str(files["shapes"]),
                 "--headless", "--save", str(out_dir), "--labels", ",".join(DET_LABELS)]) == 0
    out = capsys.readouterr().out
    stats = _stats(out)
    assert stats["task"] == "detect" and stats["frames"] == N_FRAMES and stats["dropped"] == 0
    raw = _decoded(files["shapes"])
    expected = _expected_frame_boxes(raw[0].shape[:2])
    assert [c for c, _, _ in expected] == [0, 1]       # the third query is below the threshold
    per_frame = [line for line in out.splitlines() if line.startswith("frame_")]
    assert len(per_frame) == N_FRAMES
    for line in per_frame:
        found = re.findall(r"(\w+) (\d\.\d\d) \[(\d+), (\d+), (\d+), (\d+)\]", line)
        assert [f[0] for f in found] == ["circle", "square"]
        for f, (c, box, score) in zip(found, expected):
            assert float(f[1]) == pytest.approx(score, abs=0.01)
            assert [int(v) for v in f[2:]] == pytest.approx(box, abs=1)
    for frame, path in zip(raw, sorted(out_dir.glob("*.png"))):
        annotated = cv2.imread(str(path))
        for c, box, _ in expected:
            assert _edge_hits(annotated, box, overlay.class_colour(c)) > 0.9
        changed = np.any(annotated != frame, axis=-1)
        inside = changed[int(expected[0][1][1]) + 30:int(expected[0][1][3]) - 8,
                         int(expected[0][1][0]) + 8:int(expected[0][1][2]) - 8]
        assert inside.sum() == 0                        # a box's inside is the frame's own pixels
        assert changed[:, 0].sum() < 40                 # the below-threshold whole-image box is not drawn


def test_detect_script_writes_a_video_with_the_boxes(files, tmp_path):
    """The command of the issue, as a new user runs it: the script, a video in, a video out."""
    video = tmp_path / "out.mp4"
    proc = subprocess.run([sys.executable, str(REPO / "demos" / "webcam_detect.py"), "--source",
                           str(files["shapes"]), "--tflite", str(files["det"]), "--headless", "--save", str(video)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _stats(proc.stdout)["frames"] == N_FRAMES
    written, raw = _decoded(video), _decoded(files["shapes"])
    assert len(written) == N_FRAMES
    (c0, box0, _), (c1, box1, _) = _expected_frame_boxes(raw[0].shape[:2])
    for a in written:
        for c, box in ((c0, box0), (c1, box1)):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            edge = a[y0 + 4:y1 - 2, x0].astype(int)           # the left edge, in the class colour
            assert np.abs(edge - np.array(overlay.class_colour(c))).max(-1).mean() < 60


def test_detect_pytorch_checkpoint_matches_an_independent_computation(files, tmp_path, capsys):
    """--checkpoint of a real zoo detector (stageinteractor_tiny at 64 px, boxes made varied):
    the printed boxes are the model's top-3 (query, class) pairs mapped back to the frame."""
    import vizoo
    from vizoo.hub import save_model

    torch.manual_seed(1)
    model = vizoo.create_model("stageinteractor_tiny").eval()
    with torch.no_grad():
        for stage in model.stages:
            stage.reg_head.weight.normal_(0, 0.02)
    labels = ["circle", "square", "triangle", "ellipse", "cross"]
    ckpt = save_model(model, tmp_path / "det.safetensors", labels=labels)
    assert main(["demo", "detect", "--checkpoint", str(ckpt), "--img-size", "64", "--source",
                 str(files["shapes"]), "--headless", "--max-frames", "2", "--topk", "3",
                 "--score-threshold", "0"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("frame_")]
    assert len(lines) == 2
    for frame, line in zip(_decoded(files["shapes"]), lines):
        # independent: area-resize to 64 (frames are square: no padding), normalise, forward_export
        rgb = cv2.cvtColor(cv2.resize(frame, (64, 64), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        x = torch.from_numpy(((rgb / 255.0 - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            scores, boxes = model.forward_export(x)
        top = scores[0].flatten().topk(3)
        scale = frame.shape[0] / 64
        found = re.findall(r"(\w+) (\d\.\d\d) \[(\d+), (\d+), (\d+), (\d+)\]", line)
        assert len(found) == 3
        for (label, score, *box), s, i in zip(found, top.values, top.indices):
            assert label == labels[int(i) % 5] and float(score) == pytest.approx(float(s), abs=0.006)
            want = (boxes[0, int(i) // 5] * scale).clamp(0, frame.shape[0] - 1).tolist()
            assert [int(v) for v in box] == pytest.approx(want, abs=1.01)


def test_sample_video_command(tmp_path, capsys):
    """`vizoo demo video shapes` (the README's no-camera path) writes a playable video."""
    out = tmp_path / "shapes.mp4"
    assert main(["demo", "video", "shapes", str(out), "--frames", "3", "--scale", "2"]) == 0
    frames = _decoded(out)
    assert len(frames) == 3 and frames[0].shape == (256, 256, 3)
    assert "wrote 3 frames" in capsys.readouterr().out


# --- bad input: one line, exit 2 ------------------------------------------------------------------

def test_camera_that_does_not_open(files, capsys):
    _one_line_error(capsys, ["demo", "classify", "--tflite", str(files["cls"]), "--source", "97", "--headless"],
                    "camera 97 did not open", "try --source 0")


def test_missing_source_and_missing_model_file(files, tmp_path, capsys):
    _one_line_error(capsys, ["demo", "classify", "--tflite", str(files["cls"]), "--source",
                             str(tmp_path / "nope.mp4"), "--headless"], "no such file or folder", "camera index")
    _one_line_error(capsys, ["demo", "detect", "--tflite", str(tmp_path / "nope.tflite"), "--source",
                             str(files["shapes"]), "--headless"], "no such .tflite file")


def test_unreadable_frames(files, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), _decoded(files["digits"])[0])
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert main(["demo", "classify", "--tflite", str(files["cls"]), "--source", str(folder), "--headless"]) == 2
    captured = capsys.readouterr()
    assert "a.png:" in captured.out                    # the good image was classified first
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "cannot decode the image" in err and "b.png" in err
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(os.urandom(4096))
    _one_line_error(capsys, ["demo", "classify", "--tflite", str(files["cls"]), "--source", str(broken),
                             "--headless"], "broken.mp4", "video")


def test_exported_file_for_another_input_size(files, tmp_path, capsys):
    _one_line_error(capsys, ["demo", "classify", "--tflite", str(files["cls"]), "--img-size", "224",
                             "--source", str(files["digits"]), "--headless"],
                    "takes 32x32 inputs", "--img-size 224")
    stale = tmp_path / "stale.tflite"
    shutil.copy(files["cls"], stale)
    side = json.loads(Path(str(files["cls"]) + ".json").read_text())
    side["inputs"][0]["shape"] = [1, 224, 224, 3]
    Path(str(stale) + ".json").write_text(json.dumps(side))
    _one_line_error(capsys, ["demo", "classify", "--tflite", str(stale), "--source", str(files["digits"]),
                             "--headless"], "[1, 224, 224, 3]", "another export")


def test_task_mismatch(files, capsys):
    _one_line_error(capsys, ["demo", "classify", "--tflite", str(files["det"]), "--source", str(files["digits"]),
                             "--headless"], "is a detector", "vizoo demo detect")
    _one_line_error(capsys, ["demo", "detect", "--tflite", str(files["cls"]), "--source", str(files["digits"]),
                             "--headless"], "is a classifier", "vizoo demo classify")


def test_no_display_without_headless_is_one_line(files, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if sys.platform.startswith("linux"):
        _one_line_error(capsys, ["demo", "classify", "--tflite", str(files["cls"]), "--source",
                                 str(files["digits"])], "--headless")
    monkeypatch.setattr(overlay, "gui_backend", lambda cv2: "NONE")      # an opencv-python-headless build
    _one_line_error(capsys, ["demo", "detect", "--tflite", str(files["det"]), "--source", str(files["shapes"])],
                    "no GUI support", "--headless", "pip install opencv-python")


# --- the loop's sources, keys and shutdown ------------------------------------------------------------

class FakeCamera:
    """A camera delivering numbered frames every ``period`` s; records its release."""

    def __init__(self, period: float = 0.002, fail_after: int | None = None):
        self.period, self.fail_after = period, fail_after
        self.n = 0
        self.released = threading.Event()

    def read(self):
        if self.released.is_set():
            return False, None
        time.sleep(self.period)
        self.n += 1
        if self.fail_after is not None and self.n > self.fail_after:
            raise OSError("device unplugged")
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[0, 0, 0] = self.n % 256
        return True, frame

    def release(self):
        self.released.set()


def test_live_source_keeps_only_the_newest_frame_and_releases_the_camera():
    cam = FakeCamera()
    src = LiveSource(cam, "camera 0")
    seen = []
    try:
        for _ in range(4):
            frame = src.read()
            seen.append(frame.index)
            time.sleep(0.03)                      # a slow model
    finally:
        src.close()
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert min(gaps) >= 1 and max(gaps) > 1         # always newer frames; those in between dropped
    assert src.dropped > 0 and cam.released.wait(2)
    broken = FakeCamera(fail_after=3)
    src = LiveSource(broken, "camera 1")
    with pytest.raises(DemoError, match="device unplugged"):
        while src.read() is not None:
            pass
    src.close()
    assert broken.released.wait(2)


class _SlowBackend(TorchBackend):
    def __init__(self, interrupt_at: int | None = None):
        model = tiny_classifier()
        super().__init__(model, Preprocessing(3, 32, 32, MEAN, STD), None, "classify", "pytorch tiny", threads=1)
        self.calls, self.interrupt_at = 0, interrupt_at

    def run(self, feed):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        time.sleep(0.02)
        return super().run(feed)


def test_ctrl_c_and_quit_key_stop_cleanly_and_release_the_camera(monkeypatch):
    cam = FakeCamera()
    stats = run_demo(ClassifyTask(), _SlowBackend(interrupt_at=3), LiveSource(cam, "camera 0"), quiet=True)
    assert stats.stopped_by == "Ctrl-C" and stats.frames == 2 and cam.released.wait(2)
    assert stats.dropped > 0                      # the camera ran ahead of the slow model

    class FakeWindow:                             # q pressed on the third frame
        shown = 0

        def __init__(self, *a):
            FakeWindow.closed = False

        def show(self, image):
            FakeWindow.shown += 1
            return FakeWindow.shown < 3

        def close(self):
            FakeWindow.closed = True

    monkeypatch.setattr(overlay, "Window", FakeWindow)
    monkeypatch.setattr(overlay, "check_display", lambda: None)
    cam = FakeCamera()
    stats = run_demo(ClassifyTask(), _SlowBackend(), LiveSource(cam, "camera 0"), headless=False)
    assert stats.frames == 3 and stats.stopped_by.startswith("user") and FakeWindow.closed
    assert cam.released.wait(2)


def test_window_keys_and_close_button(monkeypatch):
    """overlay.Window's own logic with OpenCV's GUI calls faked: q and Esc quit, other keys go on
    (a still image waits for one), a closed window quits."""
    keys, visible = [], [1.0]
    monkeypatch.setattr(cv2, "namedWindow", lambda *a: None)
    monkeypatch.setattr(cv2, "imshow", lambda *a: None)
    monkeypatch.setattr(cv2, "destroyWindow", lambda *a: None)
    monkeypatch.setattr(cv2, "waitKey", lambda ms: keys.pop(0) if keys else -1)
    monkeypatch.setattr(cv2, "getWindowProperty", lambda *a: visible[0])
    win = overlay.Window()
    img = np.zeros((8, 8, 3), np.uint8)
    assert win.show(img) is True                       # no key: go on
    keys[:] = [ord("q")]
    assert win.show(img) is False
    keys[:] = [27]
    assert win.show(img) is False
    keys[:] = [-1, -1, ord(" ")]
    assert win.wait() is True and not keys             # a still waits for the space bar
    keys[:] = [-1, ord("q")]
    assert win.wait() is False
    visible[0] = 0.0
    assert win.show(img) is False and win.wait() is False   # closed with the mouse


# --- the window itself, under a virtual X display -----------------------------------------------------

def _read_xwd(path: Path) -> np.ndarray:
    """Xvfb's framebuffer file (XWD format, 32 bits per pixel) as a BGR image."""
    data = path.read_bytes()
    (header_size, _v, _fmt, _depth, width, height, _xoff, byte_order, _unit, _bo, _pad, bpp, bpl,
     _vc, rmask, gmask, bmask, _bits, _entries, ncolors) = struct.unpack(">20I", data[:80])
    assert bpp == 32, f"Xvfb framebuffer with {bpp} bits per pixel"
    px = np.frombuffer(data, np.uint8, count=height * bpl, offset=header_size + 12 * ncolors)
    px = px.reshape(height, bpl)[:, : 4 * width].copy().view("<u4" if byte_order == 0 else ">u4")

    def channel(mask: int) -> np.ndarray:
        return ((px & mask) >> ((mask & -mask).bit_length() - 1)).astype(np.uint8)

    return np.stack([channel(bmask), channel(gmask), channel(rmask)], axis=-1)


@pytest.fixture
def xvfb(tmp_path):
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (Debian: apt-get install xvfb): the window test needs a virtual display")
    number = next((n for n in range(60, 200) if not Path(f"/tmp/.X{n}-lock").exists()
                   and not Path(f"/tmp/.X11-unix/X{n}").exists()), None)
    if number is None:
        pytest.skip("no free X display number for Xvfb")
    fbdir = tmp_path / "fb"
    fbdir.mkdir()
    proc = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "640x480x24", "-fbdir", str(fbdir),
                             "-nolisten", "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not Path(f"/tmp/.X11-unix/X{number}").exists() or not (fbdir / "Xvfb_screen0").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"Xvfb :{number} did not start")
            time.sleep(0.1)
        yield f":{number}", fbdir / "Xvfb_screen0"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_window_shows_the_annotated_frame_under_xvfb(files, tmp_path, xvfb):
    if overlay.gui_backend(cv2) in ("NONE", ""):
        pytest.skip("this OpenCV has no GUI (opencv-python-headless): install opencv-python for the window test")
    display, framebuffer = xvfb
    still = tmp_path / "still.png"
    raw = _decoded(files["shapes"])[0]
    cv2.imwrite(str(still), raw)
    saved = tmp_path / "saved"
    env = {**os.environ, "DISPLAY": display}
    proc = subprocess.Popen([sys.executable, str(REPO / "demos" / "webcam_detect.py"), "--tflite", str(files["det"]),
                             "--source", str(still), "--save", str(saved), "--labels", ",".join(DET_LABELS)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            # a runner in the background (nohup, CI) ignores SIGINT and children inherit
                            # that: give the demo the default disposition, as a terminal would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline, found = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if not (saved / "still.png").exists():
                continue
            annotated = cv2.imread(str(saved / "still.png"))
            if annotated is None:
                continue
            shot = _read_xwd(framebuffer)
            match = cv2.matchTemplate(shot, annotated, cv2.TM_SQDIFF_NORMED)
            if match.min() < 1e-3:
                y, x = np.unravel_index(match.argmin(), match.shape)
                found = shot, annotated, x, y
                break
        assert found is not None, f"the window never showed the annotated frame; demo stderr: {proc.stderr}"
        cv2.imwrite(str(tmp_path / "screenshot.png"), found[0])
        # the still image waits for a key: Ctrl-C stops it cleanly
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    shot, annotated, x, y = found
    window = shot[y:y + raw.shape[0], x:x + raw.shape[1]]
    changed = np.any(window != raw, axis=-1)
    for c, box, _ in _expected_frame_boxes(raw.shape[:2]):
        assert _edge_hits(window, box, overlay.class_colour(c)) > 0.9      # boxes on screen
    assert changed[-20:].sum() > 200                                      # the status line too
    assert proc.returncode == 0, err
    assert "stopped by Ctrl-C" in out and _stats(out)["frames"] == 1

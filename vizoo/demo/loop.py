"""The demo loop: read a frame -> preprocess -> infer -> post-process -> draw -> save / show.

One loop for both tasks and every backend. Each stage is timed; the overlay shows the end-to-end
FPS (a moving average over frame completions) and the inference latency, and the summary line
(:meth:`DemoStats.summary`) gives the medians. The source, the writer and the window are closed
on every path out: the end of the source, ``--max-frames``, q / Esc / the window's close button,
Ctrl-C, or an error.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import overlay
from .errors import DemoError, import_cv2
from .runners import Backend
from .sources import Frame, FrameSource, open_source

VIDEO_SUFFIXES = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "XVID"}
STAGES = ("pre", "infer", "post", "draw", "out")


@dataclass
class DemoStats:
    """What a run did: frames, drops, wall time and per-stage latencies (ms)."""

    task: str
    backend: str
    source: str
    frames: int = 0
    dropped: int = 0
    seconds: float = 0.0
    stage_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    stopped_by: str = "end of source"
    saved: str | None = None

    @property
    def fps(self) -> float:
        """Frames per second end to end (reading/decoding included)."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def median_ms(self, stage: str) -> float:
        values = self.stage_ms.get(stage) or []
        return statistics.median(values) if values else 0.0

    def summary(self) -> str:
        """One ``key=value`` line (parsed by the tests and the benchmark)."""
        parts = [f"task={self.task}", f"frames={self.frames}", f"dropped={self.dropped}",
                 f"seconds={self.seconds:.3f}", f"fps={self.fps:.2f}"]
        parts += [f"{s}_ms={self.median_ms(s):.2f}" for s in STAGES]
        return "stats: " + " ".join(parts)


def parse_summary(line: str) -> dict[str, Any]:
    """The values of a :meth:`DemoStats.summary` line."""
    out: dict[str, Any] = {}
    for item in line.split("stats:", 1)[1].split():
        key, _, value = item.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


class FrameSink:
    """``--save``: a video (.mp4/.avi/...; its size is the first frame's) or a folder of images."""

    def __init__(self, path: str | Path, fps: float):
        self.cv2 = import_cv2()
        self.path = Path(path)
        self.fps = fps
        self.video = self.path.suffix.lower() in VIDEO_SUFFIXES
        self.written = 0
        self._writer: Any = None
        self._size: tuple[int, int] | None = None
        target = self.path.parent if self.video else self.path
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DemoError(f"cannot create {target} for --save: {e.strerror or e}") from None

    def write(self, frame: Frame, image: np.ndarray) -> None:
        cv2 = self.cv2
        if not self.video:
            out = self.path / frame.name
            if not cv2.imwrite(str(out), image):
                raise DemoError(f"cannot write {out}: check the folder's permissions and free space")
            self.written += 1
            return
        if self._writer is None:
            self._size = (image.shape[1], image.shape[0])
            fourcc = cv2.VideoWriter_fourcc(*VIDEO_SUFFIXES[self.path.suffix.lower()])
            self._writer = cv2.VideoWriter(str(self.path), fourcc, float(self.fps), self._size)
            if not self._writer.isOpened():
                raise DemoError(f"cannot write the video {self.path} (no {self.path.suffix} encoder in this "
                                "OpenCV, or the folder is not writable); save as .avi, or to a folder of images")
        if (image.shape[1], image.shape[0]) != self._size:
            image = cv2.resize(image, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(image)
        self.written += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


def _status(backend: Backend, fps: float | None, infer_ms: float) -> str:
    name = backend.name.split(" (")[0]
    return f"{name} {backend.pre.size_text} | {f'{fps:.1f}' if fps else '--'} FPS | infer {infer_ms:.1f} ms"


def run_demo(task: Any, backend: Backend, source: str | FrameSource, *, headless: bool = True,
             save: str | Path | None = None, max_frames: int | None = None, quiet: bool = False,
             emit: Callable[[str], None] | None = None) -> DemoStats:
    """Run ``task`` (:class:`~vizoo.demo.classify.ClassifyTask` / :class:`~vizoo.demo.detect.DetectTask`)
    with ``backend`` on ``source`` until it ends, ``max_frames`` are done, the user quits or Ctrl-C.

    ``headless``: no window (else one is opened; :func:`overlay.check_display` first). ``save``: a
    video file or a folder for the annotated frames. Per-frame predictions are printed (``emit``,
    default stdout) in headless mode unless ``quiet``. Returns the statistics.
    """
    emit = emit or (lambda line: print(line, flush=True))
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"--max-frames must be at least 1, got {max_frames}")
    if not headless:
        overlay.check_display()
    src = open_source(source) if isinstance(source, str) else source
    stats = DemoStats(task=task.name, backend=backend.name, source=src.description)
    sink: FrameSink | None = None
    window: overlay.Window | None = None
    start = time.perf_counter()
    paused, waiting_since = 0.0, None     # time a still image waited for a key: the user's, not the demo's
    try:
        if save:
            sink = FrameSink(save, src.fps or (30.0 if src.live else 2.0))
            stats.saved = str(save)
        if not headless:
            window = overlay.Window()
        fps_ema: float | None = None
        last_done: float | None = None
        start = time.perf_counter()
        while max_frames is None or stats.frames < max_frames:
            frame = src.read()
            if frame is None:
                break
            t0 = time.perf_counter()
            pixels, geometry = task.geometry(frame.image, backend.pre)
            feed = backend.prepare(pixels)
            t1 = time.perf_counter()
            outputs = backend.run(feed)
            t2 = time.perf_counter()
            result = task.postprocess(outputs, geometry, frame.image.shape, backend.labels)
            t3 = time.perf_counter()
            image = frame.image          # the frame is ours: drawn on in place
            task.draw(image, result)
            overlay.draw_status(image, _status(backend, fps_ema, (t2 - t1) * 1e3))
            t4 = time.perf_counter()
            if sink is not None:
                sink.write(frame, image)
            keep_going = window.show(image) if window is not None else True
            t5 = time.perf_counter()
            for stage, ms in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                stats.stage_ms[stage].append(ms * 1e3)
            stats.frames += 1
            if last_done is not None and t5 > last_done:
                rate = 1.0 / (t5 - last_done)
                fps_ema = rate if fps_ema is None else 0.9 * fps_ema + 0.1 * rate
            last_done = t5
            if headless and not quiet:
                emit(f"{frame.name}: {task.describe(result)}  (infer {(t2 - t1) * 1e3:.1f} ms)")
            if keep_going and window is not None and frame.still:
                waiting_since = t5
                keep_going = window.wait()      # a still image stays until a key is pressed
                last_done = time.perf_counter()
                paused, waiting_since = paused + last_done - t5, None
            if not keep_going:
                stats.stopped_by = "user (q / Esc / window closed)"
                break
        else:
            stats.stopped_by = f"--max-frames {max_frames}"
    except KeyboardInterrupt:
        stats.stopped_by = "Ctrl-C"
    finally:
        end = time.perf_counter()
        stats.seconds = end - start - paused - (end - waiting_since if waiting_since is not None else 0.0)
        try:
            src.close()
        finally:
            stats.dropped = src.dropped
            if sink is not None:
                sink.close()
            if window is not None:
                window.close()
    return stats


def report(stats: DemoStats, emit: Callable[[str], None] | None = None) -> None:
    """The closing lines: how it stopped, what was saved, the statistics."""
    emit = emit or (lambda line: print(line, flush=True))
    saved = f"; annotated frames in {stats.saved}" if stats.saved and stats.frames else ""
    emit(f"{stats.frames} frame(s) from {stats.source}, stopped by {stats.stopped_by}{saved}")
    emit(stats.summary())
    sys.stdout.flush()

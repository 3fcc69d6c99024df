"""Frames from a camera index, a video file, an image or a folder of images, or a stream URL.

Two kinds of source, one interface (:class:`FrameSource`: ``read()`` -> :class:`Frame` or None):

- live (a camera, ``/dev/videoN``, an ``rtsp://``/``http://`` stream): a capture thread reads
  frames as the device delivers them and keeps only the newest; ``read()`` returns it and counts
  the ones the model had no time for in ``dropped``. A slow model so shows the camera's present,
  never a growing backlog. The capture is released by that thread on every path (end of stream,
  error, :meth:`FrameSource.close`).
- files (a video, images): read in order by a prefetch thread (decoding overlaps inference), none
  dropped; a frame that cannot be decoded is an error, not a silent skip.

Every failure to open or read is a :class:`~vizoo.demo.errors.DemoError` with one line saying
what failed and what to try.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import DemoError, import_cv2, opencv_quiet

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SOURCE_HELP = ("--source takes a camera index (0), a video or image file, a folder of images, "
               "or a stream URL (rtsp://..., http://...)")


@dataclass
class Frame:
    """One frame: its number, the name it is saved under, the BGR pixels, whether it is a still."""

    index: int
    name: str
    image: np.ndarray   # (H, W, 3) uint8, BGR as OpenCV decodes it
    still: bool = False  # a still image: the window waits for a key before the next one


class FrameSource:
    """Base of the sources: iterate, or ``read()`` until None; always ``close()`` (or ``with``)."""

    live = False
    description = ""
    fps: float | None = None    # the source's frame rate when it states one
    dropped = 0                 # live sources: frames replaced by a newer one before being read

    def read(self) -> Frame | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[Frame]:
        while (frame := self.read()) is not None:
            yield frame

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LiveSource(FrameSource):
    """A capture thread keeps the newest frame of ``cap`` (anything with ``read()``/``release()``)."""

    live = True

    def __init__(self, cap: Any, description: str, fps: float | None = None,
                 first_frame_timeout: float = 10.0):
        self.description = description
        self.fps = fps
        self.first_frame_timeout = first_frame_timeout
        self.captured = 0
        self.delivered = 0
        self.dropped = 0
        self.released = False
        self._cap = cap
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._capture, name="vizoo-capture", daemon=True)
        self._thread.start()

    def _capture(self) -> None:
        try:
            while not self._stop.is_set():
                ok, image = self._cap.read()
                if not ok or image is None:
                    break
                with self._cond:
                    if self._latest is not None:
                        self.dropped += 1
                    self._latest = Frame(self.captured, f"frame_{self.captured:06d}.png", image)
                    self.captured += 1
                    self._cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the reader, who raises it
            self._error = e
        finally:
            try:
                self._cap.release()
            finally:
                self.released = True
                with self._cond:
                    self._ended = True
                    self._cond.notify_all()

    def read(self) -> Frame | None:
        start = time.monotonic()
        with self._cond:
            # short waits: Ctrl-C reaches the main thread between them
            while self._latest is None and not self._ended:
                self._cond.wait(0.1)
                if self.delivered == 0 and time.monotonic() - start > self.first_frame_timeout:
                    raise DemoError(f"{self.description} opened but sent no frame in "
                                    f"{self.first_frame_timeout:.0f} s: is another program using it?")
            if self._error is not None:
                text = str(self._error).strip().splitlines()
                raise DemoError(f"reading {self.description} failed: {type(self._error).__name__}"
                                + (f": {text[0]}" if text else ""))
            if self._latest is None:
                if self.delivered == 0:
                    raise DemoError(f"{self.description} opened but sent no frame; "
                                    "check that it works in another program")
                return None
            frame, self._latest = self._latest, None
            self.delivered += 1
            return frame

    def close(self, timeout: float = 2.0) -> None:
        """Stop the thread; the capture is released when its current ``read()`` returns."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


_END = object()


class FileSource(FrameSource):
    """Frames of ``produce()`` in order, decoded ``prefetch`` ahead by a thread; none dropped."""

    def __init__(self, produce: Callable[[threading.Event], Iterator[Frame]], description: str,
                 fps: float | None = None, prefetch: int = 4):
        self.description = description
        self.fps = fps
        self.delivered = 0
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(produce,), name="vizoo-decode", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, produce: Callable[[threading.Event], Iterator[Frame]]) -> None:
        frames = produce(self._stop)
        try:
            for frame in frames:
                if not self._put(frame):
                    return
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised by read() in the main thread
            self._put(e)
        finally:
            frames.close()          # the generator's own cleanup (a video's capture released) now

    def read(self) -> Frame | None:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return None
        if item is _END:
            self._queue.put(_END)   # later reads see the end again
            return None
        if isinstance(item, BaseException):
            raise item
        self.delivered += 1
        return item

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        while True:   # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive():
            self._thread.join(timeout)


def _video_frames(cap: Any, description: str) -> Callable[[threading.Event], Iterator[Frame]]:
    def produce(stop: threading.Event) -> Iterator[Frame]:
        i = 0
        try:
            while not stop.is_set():
                ok, image = cap.read()
                if not ok or image is None:
                    break
                yield Frame(i, f"frame_{i:06d}.png", image)
                i += 1
        finally:
            cap.release()
        if i == 0 and not stop.is_set():
            raise DemoError(f"{description} opened but no frame could be decoded: the file is damaged "
                            "or its codec is missing from this OpenCV build; re-encode it "
                            "(ffmpeg -i IN -c:v libx264 out.mp4) or pass its frames as images")
    return produce


def _image_frames(files: list[Path]) -> Callable[[threading.Event], Iterator[Frame]]:
    def produce(stop: threading.Event) -> Iterator[Frame]:
        cv2 = import_cv2()
        for i, f in enumerate(files):
            if stop.is_set():
                return
            with opencv_quiet(cv2):
                image = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if image is None:
                raise DemoError(f"cannot decode the image {f}: not an image OpenCV reads, or a damaged file; "
                                f"remove it or convert it to PNG/JPEG")
            yield Frame(i, f.name, image, still=True)
    return produce


def _open_capture(cv2: Any, target: int | str) -> Any:
    with opencv_quiet(cv2):
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            return None
    return cap


def _cap_fps(cv2: Any, cap: Any) -> float | None:
    fps = cap.get(cv2.CAP_PROP_FPS)
    return float(fps) if fps and 0 < fps < 1000 else None


def open_source(source: str | int, first_frame_timeout: float = 10.0, prefetch: int = 4) -> FrameSource:
    """The source ``--source`` names; a :class:`DemoError` when it cannot be opened."""
    cv2 = import_cv2()
    text = str(source).strip()
    if text.isdigit() or text.startswith("/dev/video"):
        target: int | str = int(text) if text.isdigit() else text
        cap = _open_capture(cv2, target)
        if cap is None:
            other = "another index (--source 1)" if text in ("0", "/dev/video0") else "--source 0"
            raise DemoError(f"camera {text} did not open: no camera with that index, or another program "
                            f"is using it, or no permission (Linux: the video group; macOS: Privacy & "
                            f"Security > Camera for this terminal); try {other}, or a video file, an image "
                            f"folder or a stream URL")
        return LiveSource(cap, f"camera {text}", _cap_fps(cv2, cap), first_frame_timeout)
    if "://" in text:
        cap = _open_capture(cv2, text)
        if cap is None:
            raise DemoError(f"cannot open the stream {text}: check the URL and the network (does "
                            f"`ffplay {text}` play it?); OpenCV reads streams through its FFmpeg backend")
        return LiveSource(cap, f"stream {text}", _cap_fps(cv2, cap), first_frame_timeout)
    path = Path(text).expanduser()
    if not path.exists():
        raise DemoError(f"{text}: no such file or folder; {SOURCE_HELP}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DemoError(f"no images ({' '.join(IMAGE_SUFFIXES)}) in the folder {path}; {SOURCE_HELP}")
        return FileSource(_image_frames(files), f"{len(files)} images in {path}", None, prefetch)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return FileSource(_image_frames([path]), f"image {path}", None, prefetch)
    cap = _open_capture(cv2, str(path))
    if cap is None:
        raise DemoError(f"cannot read {path} as a video: not a format OpenCV's FFmpeg reads, or a damaged "
                        f"file; re-encode it (ffmpeg -i {path.name} out.mp4) or pass images")
    description = f"video {path}"
    return FileSource(_video_frames(cap, description), description, _cap_fps(cv2, cap), prefetch)

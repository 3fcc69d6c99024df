"""The demos' one error type, and OpenCV imported only when a demo runs."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

INSTALL_DEMO = "pip install 'vizoo[demo]'"


class DemoError(RuntimeError):
    """Bad input or environment: its message is one line saying what failed and what to try."""


def import_cv2() -> Any:
    """``cv2``, or a :class:`DemoError` saying how to install it. FFmpeg's own log lines
    (``[tcp @ 0x...] Connection refused``) are hidden unless ``--verbose``: the demo reports
    what failed in one line (read by OpenCV when FFmpeg is first used)."""
    from vizoo.quiet import is_verbose

    if not is_verbose():
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")   # AV_LOG_QUIET
    try:
        import cv2
    except ModuleNotFoundError:
        raise DemoError(f"the demos need OpenCV: {INSTALL_DEMO}") from None
    except ImportError as e:   # installed, but a system library of its GUI build is missing
        missing = str(e).split(":")[0].strip()
        raise DemoError(f"OpenCV is installed but does not load ({missing} missing): on Debian/Ubuntu "
                        "apt-get install libgl1 libglib2.0-0 (what opencv-python's windows need)") from None
    return cv2


@contextlib.contextmanager
def opencv_quiet(cv2: Any) -> Iterator[None]:
    """OpenCV's own log lines (camera probing, FFmpeg) hidden: the demo reports failures itself."""
    log = getattr(getattr(cv2, "utils", None), "logging", None)
    if log is None:
        yield
        return
    level = log.getLogLevel()
    log.setLogLevel(log.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        log.setLogLevel(level)

"""What the demos draw (top-k labels, boxes, FPS and latency) and the window they draw it in.

The window is checked before anything is loaded: an OpenCV without GUI support (the ``-headless``
wheels) or no reachable display is one line saying to pass ``--headless`` or what to install;
OpenCV's Qt build would otherwise abort the whole process on the first ``imshow``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import socket
import sys
from typing import Any, Sequence

import numpy as np

from .errors import DemoError, import_cv2

FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX
#: one colour per class (BGR), bright on photos and cycled for more classes
PALETTE: tuple[tuple[int, int, int], ...] = (
    (56, 56, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72), (23, 204, 146),
    (134, 219, 61), (187, 212, 0), (255, 194, 0), (255, 115, 100), (255, 56, 132), (255, 56, 203),
    (200, 149, 255), (199, 55, 255), (168, 153, 44), (52, 147, 26))
PANEL_SHADE = 0.35          # the text panels keep this fraction of the frame's brightness
TEXT_COLOUR = (255, 255, 255)
BAR_COLOUR = (80, 220, 80)


def class_colour(index: int) -> tuple[int, int, int]:
    """The BGR colour of class ``index``'s boxes."""
    return PALETTE[int(index) % len(PALETTE)]


def font_scale(image: np.ndarray) -> float:
    """Text size for a frame: readable on 240 px frames and on 1080p ones."""
    return max(0.4, min(image.shape[:2]) / 900)


def _thickness(scale: float) -> int:
    return max(1, round(scale * 1.6))


def _shade(image: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
    h, w = image.shape[:2]
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 > x0 and y1 > y0:
        image[y0:y1, x0:x1] = (image[y0:y1, x0:x1] * PANEL_SHADE).astype(np.uint8)


def panel_lines(image: np.ndarray, lines: Sequence[str], bars: Sequence[float] | None = None,
                corner: str = "top") -> tuple[int, int, int, int]:
    """Lines of text on a shaded panel at the top- or bottom-left corner, each with an optional
    bar (a fraction 0-1, e.g. a probability); returns the panel's box (x0, y0, x1, y1)."""
    cv2 = import_cv2()
    s = font_scale(image)
    t = _thickness(s)
    sizes = [cv2.getTextSize(line, FONT, s, t)[0] for line in lines]
    line_h = max((sz[1] for sz in sizes), default=0) + int(10 * s) + 4
    pad = int(8 * s) + 2
    bar_w = int(90 * s) if bars else 0
    width = max((sz[0] for sz in sizes), default=0) + 2 * pad + (bar_w + pad if bars else 0)
    height = line_h * len(lines) + pad
    y0 = 0 if corner == "top" else image.shape[0] - height
    _shade(image, 0, y0, width, y0 + height)
    for i, line in enumerate(lines):
        base = y0 + pad + line_h * i + (line_h - int(10 * s) - 4)
        if bars:
            frac = float(np.clip(bars[i], 0.0, 1.0))
            cv2.rectangle(image, (pad, base - line_h + int(8 * s) + 4), (pad + max(1, int(bar_w * frac)), base),
                          BAR_COLOUR, -1)
            x = pad + bar_w + pad
        else:
            x = pad
        cv2.putText(image, line, (x, base), FONT, s, TEXT_COLOUR, t, cv2.LINE_AA)
    return 0, max(0, y0), min(width, image.shape[1]), min(y0 + height, image.shape[0])


def draw_status(image: np.ndarray, text: str) -> tuple[int, int, int, int]:
    """The status line (backend, input size, FPS, latency) at the bottom left."""
    return panel_lines(image, [text], corner="bottom")


def draw_box(image: np.ndarray, box: Sequence[float], text: str, colour: tuple[int, int, int]) -> None:
    """One detection: its rectangle and a filled label ("circle 0.91") above it (inside at the top edge)."""
    cv2 = import_cv2()
    s = font_scale(image) * 0.85
    t = _thickness(s)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    cv2.rectangle(image, (x0, y0), (x1, y1), colour, t + 1)
    (tw, th), base = cv2.getTextSize(text, FONT, s, t)
    ty = y0 - th - base - 2 if y0 - th - base - 2 >= 0 else y0 + t + 1
    cv2.rectangle(image, (x0, ty), (x0 + tw + 4, ty + th + base + 2), colour, -1)
    luma = 0.114 * colour[0] + 0.587 * colour[1] + 0.299 * colour[2]
    cv2.putText(image, text, (x0 + 2, ty + th + 1), FONT, s, (0, 0, 0) if luma > 140 else (255, 255, 255),
                t, cv2.LINE_AA)


# --- the window -----------------------------------------------------------------------------------

def gui_backend(cv2: Any) -> str:
    """OpenCV's window toolkit (QT, GTK, WIN32, COCOA, ...), or NONE for a build without one."""
    current = getattr(cv2, "currentUIFramework", None)
    if current is not None:
        try:
            return (current() or "NONE").upper()
        except Exception:  # noqa: BLE001 - fall back to the build information
            pass
    for line in cv2.getBuildInformation().splitlines():
        key, _, value = line.strip().partition(":")
        if key in ("GUI", "QT", "GTK+", "GTK+ 3.x", "Win32 UI", "Cocoa") and value.strip():
            word = value.strip().split()[0].upper()
            if key == "GUI" and word != "YES":
                return word
            if word.startswith("YES"):
                return key.upper()
    return "NONE"


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def gui_fix() -> str:
    """The pip command that gives OpenCV windows, from what is installed."""
    headless = [d for d in ("opencv-python-headless", "opencv-contrib-python-headless") if _installed(d)]
    gui = [d for d in ("opencv-python", "opencv-contrib-python") if _installed(d)]
    if headless:   # both wheels install cv2: the headless one must go, the GUI one be reinstalled
        return f"pip uninstall -y {' '.join(headless + gui)} && pip install {gui[0] if gui else 'opencv-python'}"
    return "pip install opencv-python"


def _x_display_reachable(display: str) -> bool:
    """Whether an X client can connect to ``display`` (libxcb, as OpenCV's Qt does; else a socket)."""
    name = ctypes.util.find_library("xcb")
    if name:
        try:
            xcb = ctypes.CDLL(name)
            xcb.xcb_connect.restype = ctypes.c_void_p
            xcb.xcb_connect.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
            xcb.xcb_connection_has_error.argtypes = [ctypes.c_void_p]
            xcb.xcb_disconnect.argtypes = [ctypes.c_void_p]
            conn = xcb.xcb_connect(display.encode(), None)
            error = xcb.xcb_connection_has_error(conn)
            xcb.xcb_disconnect(conn)
            return error == 0
        except (OSError, AttributeError):
            pass
    host, _, rest = display.rpartition(":")
    number = rest.split(".")[0]
    if not number.isdigit():
        return False
    try:
        if host in ("", "unix"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1.0)
                s.connect(f"/tmp/.X11-unix/X{number}")
        else:
            socket.create_connection((host, 6000 + int(number)), timeout=1.0).close()
        return True
    except OSError:
        return False


def display_problem(cv2: Any | None = None) -> str | None:
    """Why no window can open here (one line with what to do), or None when one can."""
    cv2 = cv2 or import_cv2()
    ui = gui_backend(cv2)
    if ui in ("NONE", ""):
        return ("this OpenCV has no GUI support (a -headless wheel), so it cannot open a window: pass "
                f"--headless (with --save out.mp4 to keep the annotated video), or for windows: {gui_fix()}")
    if sys.platform.startswith("linux"):
        display = os.environ.get("DISPLAY", "")
        if not display:
            if ui.startswith("GTK") and os.environ.get("WAYLAND_DISPLAY"):
                return None
            return ("no display to open a window on (DISPLAY is not set): pass --headless (with --save "
                    "out.mp4 to keep the annotated video), or run it in a desktop session")
        if not _x_display_reachable(display):
            return (f"cannot connect to the X display {display!r}: pass --headless (with --save out.mp4 "
                    "to keep the annotated video), or fix DISPLAY (ssh -X, xhost)")
    return None


def check_display() -> None:
    """Raise a one-line :class:`DemoError` when no window can open (see :func:`display_problem`)."""
    problem = display_problem()
    if problem:
        raise DemoError(problem)


class Window:
    """One OpenCV window: ``show`` a frame, poll q / Esc, notice the window being closed."""

    QUIT_KEYS = (ord("q"), ord("Q"), 27)

    def __init__(self, title: str = "vizoo demo (q or Esc quits)"):
        self.cv2 = import_cv2()
        self.title = title
        self._seen = False
        self.cv2.namedWindow(title, self.cv2.WINDOW_AUTOSIZE | getattr(self.cv2, "WINDOW_GUI_NORMAL", 0))

    def closed(self) -> bool:
        """The user closed the window (its close button)."""
        try:
            visible = self.cv2.getWindowProperty(self.title, self.cv2.WND_PROP_VISIBLE) >= 1
        except self.cv2.error:
            return True
        self._seen = self._seen or visible
        return self._seen and not visible

    def show(self, image: np.ndarray) -> bool:
        """Show ``image`` and poll the keyboard once; False when the user quits."""
        self.cv2.imshow(self.title, image)
        key = self.cv2.waitKey(1)
        return not ((key != -1 and (key & 0xFF) in self.QUIT_KEYS) or self.closed())

    def wait(self) -> bool:
        """Wait for a key (after a still image): False for q / Esc or a closed window."""
        while True:
            key = self.cv2.waitKey(50)
            if key != -1:
                return (key & 0xFF) not in self.QUIT_KEYS
            if self.closed():
                return False

    def close(self) -> None:
        try:
            self.cv2.destroyWindow(self.title)
            self.cv2.waitKey(1)
        except self.cv2.error:
            pass

    def __enter__(self) -> "Window":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["DemoError", "PALETTE", "class_colour", "panel_lines", "draw_status", "draw_box",
           "display_problem", "check_display", "gui_backend", "Window"]

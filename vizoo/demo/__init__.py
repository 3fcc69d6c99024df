"""Live demos: classify or detect what a camera, a video, images or a stream shows.

``vizoo demo classify|detect`` and ``demos/webcam_*.py`` are the same code (this package):

- :mod:`.sources`: frames from a camera index, a video or image file, a folder or a stream URL;
  live sources are read by a capture thread that keeps only the newest frame, so a slow model
  drops frames instead of lagging behind the camera;
- :mod:`.runners`: the model behind the demo (PyTorch, an exported .tflite run by ai-edge-litert,
  or a CoreML package) with the pre- and post-processing an app does; reading an exported file's
  metadata (:func:`read_export_metadata`) is public so apps and scripts can do the same;
- :mod:`.overlay`: top-k labels / boxes, FPS and latency drawn on the frame, and the window;
- :mod:`.classify`, :mod:`.detect`: the two tasks; :mod:`.loop`: capture -> infer -> draw -> show/save.

OpenCV comes with ``pip install 'vizoo[demo]'``; nothing here imports it before it is needed.

    >>> from vizoo.demo import DetectTask, load_backend, run_demo
    >>> backend = load_backend(tflite="stageinteractor_tiny_fp32.tflite")
    >>> stats = run_demo(DetectTask(topk=20, threshold=0.3), backend, "shapes.mp4", save="out.mp4")
    >>> stats.fps, stats.dropped
"""
from __future__ import annotations

from .classify import ClassifyTask
from .detect import DetectTask
from .errors import DemoError
from .loop import DemoStats, run_demo
from .runners import Backend, Preprocessing, load_backend, read_export_metadata
from .sources import open_source

__all__ = ["ClassifyTask", "DetectTask", "DemoError", "DemoStats", "run_demo", "Backend", "Preprocessing",
           "load_backend", "read_export_metadata", "open_source"]

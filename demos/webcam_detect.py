"""Detect objects in a camera, a video, images or a stream with a zoo detector or an exported file, live.

    python demos/webcam_detect.py --checkpoint runs/stageinteractor_tiny/best.safetensors --source shapes.mp4
    python demos/webcam_detect.py --tflite runs/stageinteractor_tiny/export/stageinteractor_tiny_fp32.tflite \\
        --source shapes.mp4 --headless --save out.mp4 --labels circle,square,triangle,ellipse,cross

The same command as `vizoo demo detect` (code in vizoo/demo/; --help lists the options): top-k
over the raw (query, class) scores above --score-threshold, boxes mapped back to the frame; the
--tflite path is the reference for app code (vizoo/demo/runners.py, vizoo/demo/detect.py).
"""
import sys

from vizoo.demo.cli import run_script

if __name__ == "__main__":
    sys.exit(run_script("detect"))

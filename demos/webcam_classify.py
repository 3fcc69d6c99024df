"""Classify a camera, a video, images or a stream with a zoo model or an exported file, live.

    python demos/webcam_classify.py --checkpoint runs/quickstart/train/best.safetensors          # camera 0
    python demos/webcam_classify.py --tflite runs/quickstart/export/mobilenetv2_100_evos0_fp32.tflite \\
        --source clip.mp4 --headless --save out.mp4
    python demos/webcam_classify.py --model resnetv2_50d_evos.ah_in1k --pretrained true --source photos/

The same command as `vizoo demo classify` (code in vizoo/demo/; --help lists the options). The
--tflite path preprocesses from the file's sidecar exactly as an app does: see
vizoo/demo/runners.py (TFLiteBackend) for the reference.
"""
import sys

from vizoo.demo.cli import run_script

if __name__ == "__main__":
    sys.exit(run_script("classify"))

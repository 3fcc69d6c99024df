"""int8 on trained weights: each checkpoint exported to TFLite int8 (calibrated on training digits;
``int8_mode`` auto by default: full integer where it passes, else mixed, else dynamic range) and
CoreML int8 (8-bit weights), verified on held-out digits with their labels.

Random weights are a harsh test for calibrated int8 (activation ranges no data shaped), so the
export matrix runs dynamic-range int8. This measures the realistic case: the accuracy of each int8
file beside PyTorch's, its parity, and which int8 mode each model takes.

    vizoo train --config configs/ulsam/mobilenetv1_050_ulsam_digits.yaml        # -> runs/...
    python benchmarks/int8_trained.py runs/mobilenetv1_050_ulsam_digits/best.safetensors \\
        runs/quickstart/train/best.safetensors --img-size 64 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
INT8_KINDS = {"full": "full integer", "mixed": "mixed (weight layers int8, calibrated)",
              "dynamic": "dynamic range (int8 weights)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="vizoo checkpoints trained on the bundled digits")
    p.add_argument("--img-size", nargs="+", type=int, required=True, help="one per checkpoint")
    p.add_argument("--calibration", type=int, default=256, help="training digits for calibration")
    p.add_argument("--out-dir", default="exports/int8_trained")
    p.add_argument("--int8-mode", default="auto", choices=("auto", "full", "mixed", "dynamic"))
    p.add_argument("--results", default=str(RESULTS / "int8_trained.md"))
    args = p.parse_args(argv)
    if len(args.img_size) != len(args.checkpoints):
        p.error("give one --img-size per checkpoint")

    import vizoo
    from vizoo.data.digits import digits_split_tensors
    from vizoo.hub import load_model
    from vizoo.io import write_text_atomic

    lines = ["| checkpoint | model | size | format | int8 | status | PyTorch acc. | file acc. | worst cosine "
             "| top-1 agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ckpt, size in zip(args.checkpoints, args.img_size):
        model = load_model(ckpt).eval()
        chans = model.pretrained_cfg["input_size"][0]
        calib, _ = digits_split_tensors("train", size, chans)
        images, labels = digits_split_tensors("val", size, chans)
        report = vizoo.export(model, formats=("tflite", "coreml"), precision="int8", input_size=(chans, size, size),
                              out_dir=Path(args.out_dir) / Path(ckpt).parent.name,
                              calibration_data=calib[:args.calibration], verify_data=(images, labels),
                              verify_images=len(images), latency=False, name=getattr(model, "vizoo_name", None),
                              int8_mode=args.int8_mode)
        for r in report.results:
            mode = r.int8_mode
            kind = INT8_KINDS.get(mode, "?") if r.format == "tflite" else "8-bit weights"
            if len(r.details.get("int8_attempts", [])) > 1:  # the modes auto tried and left
                kind += " (auto; " + ", ".join(f"{a['int8_mode']} failed" for a in r.details["int8_attempts"][:-1]) + ")"
            for fn in r.verification.get("functions", {}).values():
                par = fn["parity"]
                acc, ref = par.get("accuracy"), par.get("reference_accuracy")
                accuracy = f"{ref:.2%} | {acc:.2%}" if acc is not None else " | "
                lines.append(f"| {ckpt} | {report.model} | {size} | {r.format} ({fn['input']}) | {kind} | {r.status} | "
                             f"{accuracy} | {par['cosine_min']:.4f} | {par['top1_agreement']:.1%} |")
            if not r.verification.get("functions"):
                lines.append(f"| {ckpt} | {report.model} | {size} | {r.format} | {kind} | {r.status}: "
                             f"{r.reason[:120]} | | | | |")
    text = ("# int8 on trained weights (digits)\n\n" + "\n".join(lines) + "\n\nCalibration: "
            f"{args.calibration} training digits; verification: the held-out digits with labels.\n")
    write_text_atomic(args.results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How often fp16 changes which tokens an EViT keeps, on real images and trained weights.

EViT's top-k over class attention is a hard decision: a rounding change can swap two tokens whose
attention is nearly tied. This measures it for the two fp16 settings the exporter offers:

- ``fp16 weights`` (the TFLite fp16 file: weights stored in fp16, arithmetic in fp32): the weights
  rounded to fp16 and back, the model run in fp32;
- ``fp16 compute`` (CoreML ``compute_precision=FLOAT16``, what the Neural Engine/GPU run): the whole
  model in half precision (PyTorch CPU fp16 kernels).

Both are compared with the fp32 model through `kept_patch_masks` (kept tokens traced back to their
patch, so later blocks are comparable even after an earlier swap). Reported per reorganising block:
the share of images whose kept set changed, and the share of kept patches that changed; then the
top-1 agreement of the logits. Default: the digits EViT trained by
``vizoo train --config configs/evit/evit_vit_tiny_digits.yaml``, on the 359 held-out digits.

    python benchmarks/evit_fp16_kept_tokens.py --checkpoint runs/evit_vit_tiny_digits/best.safetensors
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from vizoo.data.bundled import normalize
from vizoo.data.digits import digits_split_tensors
from vizoo.hub import load_model
from vizoo.io import write_text_atomic
from vizoo.models.evit_visualize import kept_patch_masks

RESULTS = Path(__file__).resolve().parent / "results"


def fp16_weights(model: torch.nn.Module) -> torch.nn.Module:
    """fp32 model whose floating parameters/buffers were rounded to fp16 (TFLite fp16 weights)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for t in list(out.parameters()) + list(out.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return out


@torch.no_grad()
def compare(reference: torch.nn.Module, other: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype,
            batch: int = 64) -> dict:
    changed_images, changed_patches, kept_patches, agree = None, None, None, 0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        ref_masks = kept_patch_masks(reference, xb)
        masks = kept_patch_masks(other, xb.to(dtype))
        diff = (ref_masks ^ masks).flatten(2)  # (B, blocks, patches)
        per_block_img = diff.any(-1).sum(0)
        per_block_patch = diff.sum((0, 2)) / 2  # a swap changes one kept patch (and one dropped)
        per_block_kept = ref_masks.flatten(2).sum((0, 2))
        changed_images = per_block_img if changed_images is None else changed_images + per_block_img
        changed_patches = per_block_patch if changed_patches is None else changed_patches + per_block_patch
        kept_patches = per_block_kept if kept_patches is None else kept_patches + per_block_kept
        agree += int((reference(xb).argmax(1) == other(xb.to(dtype)).float().argmax(1)).sum())
    return {"images_changed": (changed_images.float() / len(x)).tolist(),
            "patches_changed": (changed_patches / kept_patches).tolist(),
            "top1_agreement": agree / len(x)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/evit_vit_tiny_digits/best.safetensors",
                   help="a trained EViT (vizoo checkpoint); train one with the config above")
    p.add_argument("--out", default=str(RESULTS / "evit_fp16_kept_tokens.md"))
    args = p.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        p.error(f"{args.checkpoint} not found: train it first with "
                "`vizoo train --config configs/evit/evit_vit_tiny_digits.yaml`")
    model = load_model(args.checkpoint).eval()
    cfg = model.pretrained_cfg
    size = model.patch_embed.img_size[0]
    images, _ = digits_split_tensors("val", size, model.patch_embed.proj.in_channels)
    x = normalize(images, cfg["mean"], cfg["std"])
    rows = {"fp16 weights, fp32 arithmetic (TFLite fp16)": compare(model, fp16_weights(model), x, torch.float32),
            "fp16 arithmetic (CoreML FLOAT16)": compare(model, copy.deepcopy(model).half(), x, torch.float16)}
    blocks = [i + 1 for i, b in enumerate(model.blocks) if b.reorganizes]
    lines = [f"# fp16 and EViT's kept tokens: {Path(args.checkpoint)} ({type(model).__name__}, "
             f"keep rate {model.keep_rate}, {len(x)} held-out digits at {size} px)", "",
             "Share of images whose kept patch set differs from fp32 / share of kept patches that differ, "
             "per reorganising block; then top-1 agreement with fp32.", "",
             "| setting | " + " | ".join(f"block {b}: images / patches" for b in blocks) + " | top-1 agreement |",
             "|---|" + "---|" * (len(blocks) + 1)]
    for name, r in rows.items():
        cells = [f"{a:.1%} / {b:.2%}" for a, b in zip(r["images_changed"], r["patches_changed"])]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['top1_agreement']:.1%} |")
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

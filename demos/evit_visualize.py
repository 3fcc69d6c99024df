"""Draw which patches an EViT model keeps after each reorganising block (the paper's Figure 1).

    python demos/evit_visualize.py cat.jpg dog.jpg --pretrained /path/to/evit.pth --out kept.png
    python demos/evit_visualize.py --photos 4 --checkpoint runs/x/best.safetensors
    python demos/evit_visualize.py --photos 4 --keep-rate 0.5   # any rate at run time

Without weights the kept patches are those of a random network: pass --pretrained or
--checkpoint for a meaningful picture.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import vizoo
from vizoo.data.bundled import photo_images
from vizoo.models.evit_visualize import save_kept_patches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", help="image files (any size; resized and centre-cropped)")
    p.add_argument("--model", default="evit_deit_small_patch16_224.r0p7_fuse")
    p.add_argument("--pretrained", default=None, help="weights: 'true' (configured source), a path or a URL")
    p.add_argument("--checkpoint", default=None, help="a vizoo checkpoint (.safetensors + .json sidecar)")
    p.add_argument("--keep-rate", type=float, default=None, help="override the keep rate")
    p.add_argument("--photos", type=int, default=0, help="also use N bundled photographs")
    p.add_argument("--out", default="evit_kept_patches.png")
    args = p.parse_args(argv)
    if not args.images and not args.photos:
        p.error("give image files or --photos N")

    if args.checkpoint:
        from vizoo.hub import load_model

        model = load_model(args.checkpoint, name=None if args.model == p.get_default("model") else args.model)
    else:
        pretrained = True if args.pretrained == "true" else (args.pretrained or False)
        model = vizoo.create_model(args.model, pretrained=pretrained)
        if not pretrained:
            warnings.warn("no weights given: showing the choices of randomly initialised weights", stacklevel=1)
    model.eval()
    size = model.patch_embed.img_size[0]
    paths = list(args.images)
    written = []
    if paths:
        written.append(save_kept_patches(model, paths, args.out, args.keep_rate))
    if args.photos:
        out = args.out if not paths else args.out.replace(".png", "_photos.png")
        written.append(save_kept_patches(model, photo_images(args.photos, size), out, args.keep_rate))
    for w in written:
        print(f"written: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

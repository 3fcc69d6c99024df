"""`vizoo visualize`: draw which patches each EViT reorganising block kept (the paper's Figure 1).

    vizoo visualize evit_deit_small_patch16_224.r0p7_fuse cat.jpg dog.jpg --pretrained weights.pth
    vizoo visualize --checkpoint runs/evit/best.safetensors --photos 4 --keep-rate 0.5 --out kept.png
    vizoo visualize cat.jpg --photos 2 --out figures/     # a folder: evit_kept_patches*.png in it

Without weights the kept patches are those of a randomly initialised network (a warning says so).
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

DEFAULT_MODEL = "evit_deit_small_patch16_224.r0p7_fuse"
DEFAULT_OUT = "evit_kept_patches.png"


def output_png(out: str | Path) -> Path:
    """The PNG to write for ``--out``: a folder (existing, ending in a separator, or without a
    suffix) gets the default name inside it.

    Why: ``--out some/folder`` is the natural thing to type, and PIL would otherwise refuse it
    with "unknown file extension" only after the model has run.
    """
    from PIL import Image

    text = str(out)
    path = Path(out)
    if path.is_dir() or text.endswith(("/", os.sep)) or not path.suffix:
        return path / DEFAULT_OUT
    if path.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {text}: {path.suffix!r} is not an image type; give a .png file or a folder")
    return path


def _load(name: str | None, checkpoint: str | None, pretrained: str | None):
    import vizoo
    from vizoo.hub import load_model

    if checkpoint:
        return load_model(checkpoint, name=name)
    weights = True if pretrained == "true" else (pretrained or False)
    model = vizoo.create_model(name or DEFAULT_MODEL, pretrained=weights)
    if not weights:
        warnings.warn("no weights given (--pretrained/--checkpoint): these are the choices of a randomly "
                      "initialised network", stacklevel=2)
    return model


def visualize_kept_patches(name: str | None, images: list[str], out: str | Path, photos: int = 0,
                           checkpoint: str | None = None, pretrained: str | None = None,
                           keep_rate: float | None = None) -> list[Path]:
    """Write one PNG for the image files and one for ``photos`` bundled photographs; returns paths.

    ``out``: the PNG, or a folder to write ``evit_kept_patches.png`` (and ``..._photos.png``) into.
    """
    from vizoo.data.bundled import photo_images
    from vizoo.models.evit import EViT
    from vizoo.models.evit_visualize import save_kept_patches

    if not images and not photos:
        raise ValueError("give image files or --photos N (bundled photographs)")
    out = output_png(out)  # before the model is built: a bad --out fails at once
    model = _load(name, checkpoint, pretrained).eval()
    if not isinstance(model, EViT):
        raise ValueError(f"{type(model).__name__} does not reorganise tokens: use an EViT model "
                         "(`vizoo list 'evit*'`)")
    written = []
    if images:
        written.append(save_kept_patches(model, images, out, keep_rate))
    if photos:
        target = out if not images else out.with_name(out.stem + "_photos" + out.suffix)
        size = model.patch_embed.img_size
        shots = photo_images(photos, tuple(size), in_chans=model.patch_embed.proj.in_channels)
        written.append(save_kept_patches(model, shots, target, keep_rate))
    return written


def _cmd_visualize(args: argparse.Namespace) -> int:
    from vizoo.registry import is_model

    name, images = args.model_name, list(args.images)
    if name is not None and not is_model(name) and Path(name).is_file():  # `vizoo visualize cat.jpg --checkpoint ..`
        name, images = None, [name, *images]
    for path in visualize_kept_patches(name, images, args.out, args.photos, args.checkpoint,
                                       args.pretrained, args.keep_rate):
        print(f"written: {path}")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize", help="PNG of the patches each EViT reorganising block kept",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_name", nargs="?", default=None, metavar="NAME",
                   help=f"EViT model (default {DEFAULT_MODEL}, or the checkpoint's)")
    p.add_argument("images", nargs="*", help="image files (resized and centre-cropped as DeiT evaluates)")
    p.add_argument("--checkpoint", help="a vizoo checkpoint (.safetensors with its .json sidecar)")
    p.add_argument("--pretrained", help="'true' (the configured source), a path or a URL")
    p.add_argument("--keep-rate", type=float, default=None, help="keep rate to show (default: the model's)")
    p.add_argument("--photos", type=int, default=0, help="also draw N bundled photographs")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"PNG to write, or a folder (a {DEFAULT_OUT} in it)")
    p.set_defaults(func=_cmd_visualize)

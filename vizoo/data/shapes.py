"""Procedural shapes on real photos: a detection dataset that ships as code, not as files.

Why: the zoo's detectors must train and be scored (COCO AP) on a CPU with no download, so the
data is drawn from a seed: 1-6 shapes of 5 classes (circle, square, triangle, ellipse, cross),
12-56 px, in colours picked to stand out from the spot they cover, on random crops of
scikit-image's bundled photos and textures (sometimes blurred or dimmed so shapes stay visible).

Labels are learnable by construction: each box is the tight box of the shape's own drawn pixels
(shapes lie wholly inside the image), and a shape is only placed if every shape under it keeps
at least ``MIN_VISIBLE`` of its pixels, so no labelled object is hidden and no unlabelled
fragment is left in an image. Every image draws from its own generator, seeded by
(seed, split, index), so any image can be re-rendered alone (the tests do) and the output does
not depend on the order of generation.

The dataset is written once, atomically, as COCO json + PNGs, and reused while ``meta.json``
records the same parameters.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ("circle", "square", "triangle", "ellipse", "cross")
#: bump when a change to the drawing changes the images: old caches are then regenerated
GENERATOR_VERSION = 1
MIN_SIZE, MAX_SIZE = 12, 56
MAX_OBJECTS = 6
MIN_VISIBLE = 0.4  # fraction of a shape's pixels that later shapes must leave visible
#: scikit-image's bundled pictures that load offline (any that need a download are skipped)
BACKGROUND_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "horse", "brick",
                    "grass", "gravel", "camera", "cat", "coins", "moon", "clock", "hubble_deep_field",
                    "immunohistochemistry", "colorwheel", "cell", "page", "text")
_SPLIT_CODES = {"train": 0, "val": 1}


@dataclass
class ShapeObject:
    """One drawn shape: its COCO fields and its full (unoccluded) pixel mask."""

    category_id: int  # 1..5, the index in CATEGORIES plus one
    bbox: tuple[int, int, int, int]  # x, y, w, h: tight around the shape's pixels (pixel edges)
    mask: np.ndarray  # (H, W) bool: every pixel the shape covers, hidden or not
    visible: np.ndarray  # (H, W) bool: the pixels no later shape covers

    @property
    def area(self) -> int:
        """Visible pixels: COCO's ``area`` is that of the visible segment."""
        return int(self.visible.sum())


@dataclass
class ShapesSample:
    image: np.ndarray  # (H, W, 3) uint8
    background: np.ndarray  # (H, W, 3) uint8: the image before any shape was drawn
    objects: list[ShapeObject]


# ----------------------------------------------------------------------------- backgrounds
@functools.lru_cache(maxsize=1)
def _backgrounds() -> tuple[tuple[str, Image.Image], ...]:
    """(name, RGB PIL image) of the bundled pictures that load here (loaded once per process)."""
    import skimage.data

    out = []
    for name in BACKGROUND_NAMES:
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception:  # absent from this scikit-image, or needs pooch to download
            continue
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            arr = (np.clip(arr / max(float(arr.max()), 1e-8), 0, 1) * 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        out.append((name, Image.fromarray(np.ascontiguousarray(arr[..., :3]))))
    if not out:
        raise RuntimeError("none of scikit-image's bundled pictures loads; `pip install scikit-image`")
    return tuple(out)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of a bundled picture, resized to ``size``, as float32 (H, W, 3)."""
    photos = _backgrounds()
    photo = photos[int(rng.integers(len(photos)))][1]
    w, h = photo.size
    side = max(16, int(min(w, h) * rng.uniform(0.2, 0.75)))
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    bg = photo.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    if rng.random() < 0.5:
        bg = bg.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.4:  # soften texture so edges of shapes dominate
        bg = bg.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 2.5))))
    arr = np.asarray(bg, dtype=np.float32)
    if rng.random() < 0.5:  # lower contrast and darken
        mean = arr.mean()
        arr = ((arr - mean) * rng.uniform(0.35, 0.8) + mean) * rng.uniform(0.5, 1.0)
    return arr


# ----------------------------------------------------------------------------- shapes
def _shape_mask(rng: np.random.Generator, category_id: int, size: int) -> np.ndarray:
    """A bool (size, size) mask of one shape of the class, at a random place and scale."""
    s = int(round(np.exp(rng.uniform(np.log(MIN_SIZE), np.log(MAX_SIZE)))))
    name = CATEGORIES[category_id - 1]
    if name == "ellipse":  # elongated, so it is never mistaken for a circle
        short = max(5, int(round(s * rng.uniform(0.4, 0.6))))
        w, h = (s, short) if rng.random() < 0.5 else (short, s)
    elif name == "triangle":
        w, h = s, max(MIN_SIZE, int(round(s * rng.uniform(0.85, 1.15))))
    else:
        w = h = s
    w, h = min(w, size), min(h, size)
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    x1, y1 = x0 + w - 1, y0 + h - 1  # inclusive, as PIL draws
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if name in ("circle", "ellipse"):
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif name == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif name == "triangle":
        apex = x0 + rng.uniform(0.3, 0.7) * (w - 1)
        if rng.random() < 0.5:
            pts = [(x0, y1), (x1, y1), (apex, y0)]  # pointing up
        else:
            pts = [(x0, y0), (x1, y0), (apex, y1)]  # pointing down
        draw.polygon(pts, fill=255)
    else:  # cross: a plus sign whose arms are about a third of its side
        t = max(3, int(round(w * rng.uniform(0.25, 0.38))))
        off = (w - t) // 2
        draw.rectangle((x0 + off, y0, x0 + off + t - 1, y1), fill=255)
        draw.rectangle((x0, y0 + off, x1, y0 + off + t - 1), fill=255)
    return np.asarray(canvas) > 0


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,) hue, saturation, value in [0, 1] -> (N, 3) float32 RGB in [0, 255]."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(c, axis=1) for c in
                      ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])  # (6, N, 3)
    return (table[i, np.arange(len(h))] * 255).astype(np.float32)


def _colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A saturated colour far (in RGB and in brightness) from the mean of the pixels it covers."""
    rgb = _hsv_to_rgb(rng.uniform(0, 1, 12), rng.uniform(0.45, 1, 12), rng.uniform(0.25, 1, 12))
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    score = np.linalg.norm(rgb - under, axis=1) + 1.5 * np.abs((rgb - under) @ luma)
    good = np.flatnonzero(score >= 160)
    return rgb[int(rng.choice(good))] if len(good) else rgb[int(score.argmax())]


def render_sample(seed: int, split: str, index: int, img_size: int = 128) -> ShapesSample:
    """Image ``index`` of ``split``: exactly what :func:`generate_shapes` writes for it."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    canvas = _background(rng, img_size)
    background = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    objects: list[ShapeObject] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        for _try in range(20):  # re-place a shape that would hide too much of one below it
            cat = int(rng.integers(1, len(CATEGORIES) + 1))
            mask = _shape_mask(rng, cat, img_size)
            if all((o.visible & ~mask).sum() >= MIN_VISIBLE * o.mask.sum() for o in objects):
                break
        else:
            continue
        for o in objects:
            o.visible = o.visible & ~mask
        fill = _colour(rng, canvas[mask].mean(axis=0))
        noise = rng.normal(0.0, 6.0, size=(int(mask.sum()), 3)).astype(np.float32)
        canvas[mask] = fill + noise
        objects.append(ShapeObject(cat, _tight_box(mask), mask, mask.copy()))
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return ShapesSample(image, background, objects)


# ----------------------------------------------------------------------------- writing
def _params(num_train: int, num_val: int, img_size: int, seed: int) -> dict[str, int]:
    return {"generator_version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "img_size": int(img_size), "seed": int(seed)}


def _paths(root: Path) -> dict[str, Path]:
    return {"root": root, "train_images": root / "train", "val_images": root / "val",
            "train_ann": root / "annotations" / "instances_train.json",
            "val_ann": root / "annotations" / "instances_val.json"}


def _is_complete(root: Path, params: dict[str, int]) -> bool:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("params") != params:
        return False
    p = _paths(root)
    counts = {"train": params["num_train"], "val": params["num_val"]}
    return all(p[f"{s}_ann"].is_file() and p[f"{s}_images"].is_dir()
               and sum(1 for _ in os.scandir(p[f"{s}_images"])) == n for s, n in counts.items())


@contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Serialise generators of one folder (e.g. every process of a torchrun job)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone still keeps the folder whole
        yield
        return
    with open(root.parent / f".{root.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_split(dest: Path, split: str, n: int, img_size: int, seed: int, bar) -> dict:
    (dest / split).mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        sample = render_sample(seed, split, i, img_size)
        name = f"{i:06d}.png"
        Image.fromarray(sample.image).save(dest / split / name, compress_level=1)
        image_id = i + 1
        images.append({"id": image_id, "file_name": name, "width": img_size, "height": img_size})
        for o in sample.objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": o.category_id,
                                "bbox": [float(v) for v in o.bbox], "area": float(o.area), "iscrowd": 0})
        bar.update(1)
    return {"info": {"description": f"vizoo procedural shapes, {split} split",
                     "version": str(GENERATOR_VERSION), "seed": seed},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CATEGORIES)]}


def generate_shapes(out_dir: str | os.PathLike, num_train: int = 3000, num_val: int = 400,
                    img_size: int = 128, seed: int = 0, progress: bool = True) -> dict[str, Path]:
    """Write (or reuse) the shapes dataset in ``out_dir``; returns its paths.

    Keys: ``root``, ``train_images``, ``val_images`` (folders of PNGs), ``train_ann``, ``val_ann``
    (COCO json). A folder holding a complete dataset of the same parameters is reused as is; one
    of other parameters is replaced; a folder holding anything else is an error (never deleted).
    """
    from tqdm.auto import tqdm

    from vizoo.io import atomic_path

    root = Path(out_dir).expanduser()
    params = _params(num_train, num_val, img_size, seed)
    if img_size < MAX_SIZE or num_train < 0 or num_val < 0:
        raise ValueError(f"img_size must be at least {MAX_SIZE} and counts non-negative, got {params}")
    with _lock(root):
        if _is_complete(root, params):
            return _paths(root)
        if root.exists() and any(root.iterdir()) and not (root / "meta.json").is_file():
            raise FileExistsError(f"{root} holds files that are not a shapes dataset; choose an empty folder")
        with atomic_path(root) as tmp:
            (tmp / "annotations").mkdir(parents=True)
            with tqdm(total=num_train + num_val, desc="generating shapes", unit="img",
                      disable=not progress, leave=False) as bar:
                for split, n in (("train", num_train), ("val", num_val)):
                    coco = _write_split(tmp, split, n, img_size, seed, bar)
                    (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
            backgrounds = [name for name, _ in _backgrounds()]
            (tmp / "meta.json").write_text(json.dumps({"params": params, "categories": list(CATEGORIES),
                                                       "backgrounds": backgrounds}, indent=2) + "\n")
    return _paths(root)


def default_shapes_root(num_train: int = 3000, num_val: int = 400, img_size: int = 128, seed: int = 0) -> Path:
    """Where the dataset of these parameters is cached: ``$VIZOO_DATA/shapes-<hash>``, with
    ``VIZOO_DATA`` defaulting to ``$XDG_CACHE_HOME/vizoo`` (``~/.cache/vizoo``)."""
    base = os.environ.get("VIZOO_DATA")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vizoo"
    digest = hashlib.sha1(json.dumps(_params(num_train, num_val, img_size, seed), sort_keys=True).encode())
    return Path(base).expanduser() / f"shapes-{digest.hexdigest()[:10]}"


def ensure_shapes(root: str | os.PathLike | None = None, num_train: int = 3000, num_val: int = 400,
                  img_size: int = 128, seed: int = 0, progress: bool = True) -> dict[str, Path]:
    """The dataset's paths, generating it on first use (``root`` defaults to the cache)."""
    root = Path(root) if root is not None else default_shapes_root(num_train, num_val, img_size, seed)
    return generate_shapes(root, num_train, num_val, img_size, seed, progress)

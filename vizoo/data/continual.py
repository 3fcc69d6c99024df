"""A small task-incremental benchmark that ships as code: six tasks from different domains.

Why: continual-learning methods such as CLR (channel-wise lightweight reprogramming) are judged
by an accuracy matrix over a *sequence* of tasks, and the zoo must build that matrix on a CPU with
no download. Every task is therefore generated here from data inside installed packages
(scikit-learn's handwritten digits, scikit-image's bundled photos) or drawn procedurally:

==================  =========================================================  =======
task                what a label means                                          classes
==================  =========================================================  =======
``digits_0_4``      the handwritten digit, 0-4 only                             5
``textures``        which of 8 texture photos a tile crop comes from            8
``shapes``          the kind of a drawn shape (any colour, cluttered ground)    5
``colours``         the colour name of a drawn shape (any kind)                 8
``digits_5_9``      the handwritten digit, 5-9 only                             5
``digits_rot_inv``  the digit, all ten, rotated 90 degrees and inverted         10
==================  =========================================================  =======

:func:`proxy_task` is the data a backbone is pretrained on *once*, outside the sequence:
self-supervised rotation prediction on photos and procedural scenes that no task uses (no digits,
none of the texture photos).

Determinism: a generated image draws from its own generator, seeded by (seed, task, split,
class, index), so the tensors are the same bit for bit on every call, a smaller
``train_per_class`` gives a subset of each class's train images, and ``seed`` changes sampling,
augmentation and the split but never what a class is. Splits never share an image: the digits are
split by image index (stratified, seeded), texture crops of different splits come from disjoint
tiles of their photo, and drawn images are independent draws. Nothing is cached to disk.
"""
from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from .bundled import _photo, digits_arrays

VAL_FRACTION, TEST_FRACTION = 0.15, 0.20
_SPLITS = ("train", "val", "test")
#: the texture task's classes: grey or colour photos with no up or down, read as textures
TEXTURE_PHOTOS = {"brick": "brick", "grass": "grass", "gravel": "gravel", "moon": "moon", "coins": "coins",
                  "galaxies": "hubble_deep_field", "tissue": "immunohistochemistry", "retina": "retina"}
#: photos with a clear "up" (people, animals, objects): the proxy's, used by no task
PROXY_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse")
SHAPE_KINDS = ("circle", "square", "triangle", "star", "cross")
#: colour name -> hue in degrees (HSV); neighbours are 28 degrees or more apart, jitter is +-9
COLOUR_HUES = {"red": 0.0, "orange": 30.0, "yellow": 58.0, "green": 120.0, "cyan": 180.0, "blue": 225.0,
               "purple": 275.0, "pink": 325.0}
_TILE_GRID = 5  # texture photos are cut into 5 x 5 tiles: 16 for train, 4 for val, 5 for test
_TILE_SPLIT = (16, 4, 5)


@dataclass(repr=False)
class ContinualSplit:
    """One task of the sequence: its classes and its train/val/test tensors.

    ``x`` is float32 (N, 3, S, S) in [0, 1] (normalisation is the model's business), ``y`` int64
    in ``range(len(classes))``. ``val`` is for best-epoch selection, ``test`` for the accuracy
    matrix, so the reported numbers are never those a checkpoint was chosen on.
    """

    name: str
    domain: str
    classes: list[str]
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:  # the dataclass default would print every tensor
        n = ", ".join(f"{s}={len(getattr(self, s)[1])}" for s in _SPLITS)
        return f"ContinualSplit({self.name!r}, {self.domain!r}, classes={len(self.classes)}, {n})"


# ----------------------------------------------------------------------------- shared helpers
def _split_sizes(train: int) -> tuple[int, int]:
    """Val and test images per class that go with ``train`` (roughly 65/15/20 %)."""
    scale = train / (1.0 - VAL_FRACTION - TEST_FRACTION)
    return max(2, round(scale * VAL_FRACTION)), max(2, round(scale * TEST_FRACTION))


def _to_tensor(images: list[np.ndarray]) -> Tensor:
    """(H, W, 3) float arrays -> contiguous float32 (N, 3, H, W) in [0, 1]."""
    x = np.stack(images).astype(np.float32, copy=False)
    np.clip(x, 0.0, 1.0, out=x)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _generated(render: Callable[[np.random.Generator, int, int], np.ndarray], n_classes: int, code: int,
               seed: int, train: int, train_cap: int | None) -> dict[str, tuple[Tensor, Tensor]]:
    """Train/val/test of a drawn task: image j of class c in split s is ``render(rng, c, s)`` with
    its own generator, so it is independent of the order of generation and of the other sizes."""
    val, test = _split_sizes(train)
    counts = (train if train_cap is None else min(train, train_cap), val, test)
    out = {}
    for s, (split, per_class) in enumerate(zip(_SPLITS, counts)):
        images, labels = [], []
        for j in range(per_class):  # classes interleaved: any prefix is balanced
            for c in range(n_classes):
                images.append(render(np.random.default_rng([seed, code, s, c, j]), c, s))
                labels.append(c)
        out[split] = (_to_tensor(images), torch.tensor(labels, dtype=torch.int64))
    return out


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


@functools.lru_cache(maxsize=None)
def _pil_photo(name: str) -> Image.Image:
    """A bundled photo as RGB PIL (loaded once per process; PIL images are not mutated here)."""
    img = _photo(name)
    if name == "retina":  # keep the fundus itself: the corners are black
        h, w = img.shape[:2]
        img = img[int(0.2 * h):int(0.8 * h), int(0.2 * w):int(0.8 * w)]
    return Image.fromarray(np.ascontiguousarray(img))


# ----------------------------------------------------------------------------- digits
def _digits_task(keep: Sequence[int], transform: Callable[[Tensor], Tensor] | None, code: int, seed: int,
                 img_size: int, train_cap: int | None) -> dict[str, tuple[Tensor, Tensor]]:
    """A stratified, seeded split of sklearn's digits by image index (each image in one split)."""
    x, y = digits_arrays(img_size, 1)
    if transform is not None:
        x = transform(x)
    x = x.expand(-1, 3, -1, -1)
    rng = np.random.default_rng([seed, code])
    parts: dict[str, list[np.ndarray]] = {s: [] for s in _SPLITS}
    targets = y.numpy()
    for c in keep:
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        n_test, n_val = round(len(idx) * TEST_FRACTION), round(len(idx) * VAL_FRACTION)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:][:train_cap])
    lut = torch.full((10,), -1, dtype=torch.int64)
    lut[torch.tensor(list(keep))] = torch.arange(len(keep))
    out = {}
    for split, chunks in parts.items():
        idx = torch.from_numpy(np.sort(np.concatenate(chunks)))
        out[split] = (x[idx].contiguous(), lut[y[idx]])
    return out


def rotate_invert(x: Tensor) -> Tensor:
    """``digits_rot_inv``'s domain shift: 90 degrees counter-clockwise, then 1 - x."""
    return 1.0 - torch.rot90(x, 1, dims=(-2, -1))


# ----------------------------------------------------------------------------- textures
def _tiles(photo: Image.Image) -> list[tuple[float, float, float, float]]:
    w, h = photo.size
    tw, th = w / _TILE_GRID, h / _TILE_GRID
    return [(i * tw, j * th, (i + 1) * tw, (j + 1) * th) for j in range(_TILE_GRID) for i in range(_TILE_GRID)]


def _texture_renderer(seed: int, code: int, img_size: int) -> Callable[[np.random.Generator, int, int], np.ndarray]:
    photos = [_pil_photo(n) for n in TEXTURE_PHOTOS.values()]
    split_tiles = []  # per class: the tiles of each split (a seeded, disjoint assignment)
    for c, photo in enumerate(photos):
        tiles = _tiles(photo)
        perm = np.random.default_rng([seed, code, 99, c]).permutation(len(tiles))
        bounds = np.cumsum((0,) + _TILE_SPLIT)
        split_tiles.append([[tiles[t] for t in perm[bounds[s]:bounds[s + 1]]] for s in range(3)])

    def render(rng: np.random.Generator, c: int, s: int) -> np.ndarray:
        tiles = split_tiles[c][s]
        x0, y0, x1, y1 = tiles[int(rng.integers(len(tiles)))]
        side = rng.uniform(0.5, 1.0) * min(x1 - x0, y1 - y0)  # scale varies 2x
        bx, by = rng.uniform(x0, x1 - side), rng.uniform(y0, y1 - side)
        crop = photos[c].resize((img_size, img_size), Image.BILINEAR, box=(bx, by, bx + side, by + side),
                              reducing_gap=2.0)
        a = np.rot90(np.asarray(crop, dtype=np.float32) / 255.0, int(rng.integers(4)))
        if rng.random() < 0.5:
            a = a[:, ::-1]
        mean = a.mean()  # brightness and contrast jitter: the class is the texture, not its grey level
        return (a - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.75, 1.25)

    return render


# ----------------------------------------------------------------------------- shapes and colours
def _unit_polygon(kind: str) -> np.ndarray:
    """(K, 2) vertices of a shape of circumradius about 1, centred on the origin."""
    if kind == "square":
        a = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "triangle":
        a = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(a), np.sin(a)], 1)
    if kind == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if kind == "cross":  # a plus sign, arms 0.6 wide reaching 1 from the centre
        w = 0.3
        return np.array([(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                         (-1, -w), (-w, -w), (-w, -1)], dtype=np.float64)
    raise ValueError(kind)


#: area of each unit shape, so every kind is drawn with the same area distribution (size is no cue)
_UNIT_AREA = {"circle": math.pi, "square": 2.0, "triangle": 3 * math.sqrt(3) / 4,
              "star": 5 * 0.45 * math.sin(math.pi / 5), "cross": 8 * 0.3 - 4 * 0.3 ** 2}
_SS = 4  # supersampling of drawn scenes, for anti-aliased edges


def _layers(S: int, n: int) -> tuple[list[Image.Image], list[ImageDraw.ImageDraw]]:
    """``n`` blank "L" layers at ``_SS`` times the size, and their pens."""
    layers = [Image.new("L", (S * _SS, S * _SS), 0) for _ in range(n)]
    return layers, [ImageDraw.Draw(layer) for layer in layers]


def _down(layer: Image.Image) -> np.ndarray:
    """A supersampled layer averaged down to (S, S, 1) float32 in [0, 1]."""
    return (np.asarray(layer.reduce(_SS), dtype=np.float32) / 255.0)[..., None]


def _draw_scene(rng: np.random.Generator, kind: str, colour: np.ndarray, img_size: int) -> np.ndarray:
    """One shape of ``kind`` in ``colour`` on a cluttered, low-saturation ground, (S, S, 3) in [0, 1].

    The ground's brightness is set 0.25-0.5 away from the shape's so the shape is always visible;
    grey lines (some over the shape) and pixel noise are the clutter. Edges are anti-aliased:
    each layer's coverage is drawn at ``_SS`` times the size and averaged down.
    """
    S = img_size
    lum = _luma(colour)
    d = rng.uniform(0.25, 0.5)
    options = [v for v in (lum + d, lum - d) if 0.05 <= v <= 0.95]
    bg_lum = options[int(rng.integers(len(options)))] if options else (0.95 if lum < 0.5 else 0.05)
    # ground: a linear gradient between two near-grey colours around bg_lum
    c1, c2 = (_rgb(rng.uniform(), rng.uniform(0, 0.25), min(1.0, max(0.0, bg_lum + rng.uniform(-0.08, 0.08))))
              for _ in range(2))
    theta = rng.uniform(0, 2 * np.pi)
    g = (np.arange(S, dtype=np.float32) + 0.5) / S - 0.5
    t = np.clip(0.5 + g[None, :] * np.cos(theta) + g[:, None] * np.sin(theta), 0, 1)[..., None]
    img = c1 * (1 - t) + c2 * t

    def lines(img: np.ndarray, n: int) -> np.ndarray:
        """Grey lines over ``img``: coverage and premultiplied grey drawn on two layers."""
        if n == 0:
            return img
        (cov, val), (dc, dv) = _layers(S, 2)
        for _ in range(n):
            p = rng.uniform(0, S * _SS, 4).tolist()
            v = min(1.0, max(0.0, bg_lum + (1 if rng.random() < 0.5 else -1) * rng.uniform(0.1, 0.3)))
            width = int(rng.integers(1, 3)) * _SS // 2  # half a pixel or one pixel at S
            dc.line([(p[0], p[1]), (p[2], p[3])], fill=255, width=width)
            dv.line([(p[0], p[1]), (p[2], p[3])], fill=round(v * 255), width=width)
        return img * (1 - _down(cov)) + _down(val)

    img = lines(img, int(rng.integers(2, 6)))
    area = np.pi * (S * rng.uniform(0.14, 0.27)) ** 2  # the same area law for every kind
    radius = math.sqrt(area / _UNIT_AREA[kind])
    if kind == "circle":
        extent = radius
    else:
        pts = _unit_polygon(kind)
        a = rng.uniform(0, 2 * np.pi)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        pts = pts @ rot.T * radius
        extent = float(np.abs(pts).max())
    cx, cy = (rng.uniform(extent + 1, S - 1 - extent) if S - 2 > 2 * extent else S / 2 for _ in range(2))
    (mask,), (draw,) = _layers(S, 1)
    if kind == "circle":
        draw.ellipse([(cx - radius) * _SS, (cy - radius) * _SS, (cx + radius) * _SS, (cy + radius) * _SS], fill=255)
    else:
        draw.polygon([((cx + px) * _SS, (cy + py) * _SS) for px, py in pts], fill=255)
    alpha = _down(mask)
    img = img * (1 - alpha) + colour * alpha
    img = lines(img, int(rng.integers(0, 2)))  # clutter over the shape too
    return img + rng.normal(0.0, rng.uniform(0.01, 0.06), img.shape).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _rgb(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))


def _named_colour(rng: np.random.Generator, name: str) -> np.ndarray:
    hue = (COLOUR_HUES[name] + rng.uniform(-9, 9)) / 360.0
    return _rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))


# ----------------------------------------------------------------------------- the registry
def _build_digits_0_4(img_size, seed, cap):
    return [str(c) for c in range(5)], _digits_task(range(5), None, 1, seed, img_size, cap)


def _build_digits_5_9(img_size, seed, cap):
    return [str(c) for c in range(5, 10)], _digits_task(range(5, 10), None, 5, seed, img_size, cap)


def _build_digits_rot_inv(img_size, seed, cap):
    cap = 100 if cap is None else min(cap, 100)  # 1,000 train images, like the other tasks
    return [str(c) for c in range(10)], _digits_task(range(10), rotate_invert, 6, seed, img_size, cap)


def _build_textures(img_size, seed, cap):
    return list(TEXTURE_PHOTOS), _generated(_texture_renderer(seed, 2, img_size), len(TEXTURE_PHOTOS), 2,
                                            seed, 100, cap)


def _build_shapes(img_size, seed, cap):
    def render(rng, c, s):
        return _draw_scene(rng, SHAPE_KINDS[c], _random_colour(rng), img_size)
    return list(SHAPE_KINDS), _generated(render, len(SHAPE_KINDS), 3, seed, 140, cap)


def _build_colours(img_size, seed, cap):
    names = list(COLOUR_HUES)

    def render(rng, c, s):
        kind = SHAPE_KINDS[int(rng.integers(len(SHAPE_KINDS)))]
        img = _draw_scene(rng, kind, _named_colour(rng, names[c]), img_size)
        return img * rng.uniform(0.9, 1.1, 3).astype(np.float32)  # a mild colour cast of the whole scene
    return names, _generated(render, len(names), 4, seed, 100, cap)


_TASKS: dict[str, tuple[str, Callable]] = {
    "digits_0_4": ("handwritten digits 0-4", _build_digits_0_4),
    "textures": ("texture crops of 8 photos", _build_textures),
    "shapes": ("drawn shapes on clutter, by kind", _build_shapes),
    "colours": ("drawn shapes on clutter, by colour", _build_colours),
    "digits_5_9": ("handwritten digits 5-9", _build_digits_5_9),
    "digits_rot_inv": ("digits 0-9 rotated 90 degrees and inverted", _build_digits_rot_inv),
}
TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def _check_args(img_size: int, seed: int) -> None:
    if not isinstance(img_size, int) or img_size < 16:
        raise ValueError(f"img_size must be an int of at least 16, got {img_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def continual_tasks(names: Sequence[str] | None = None, img_size: int = 32, seed: int = 0,
                    train_per_class: int | None = None) -> list[ContinualSplit]:
    """The tasks ``names`` (default :data:`TASK_NAMES`, in that order), built in memory.

    ``train_per_class`` caps each class's train images (val and test keep their size, so small
    runs are scored on the same images as full ones); the capped train set is a subset of the full
    one (for drawn tasks, its prefix). Unknown names raise ``ValueError`` before anything is built.
    """
    names = TASK_NAMES if names is None else ([names] if isinstance(names, str) else list(names))
    unknown = [n for n in names if n not in _TASKS]
    if unknown:
        raise ValueError(f"unknown continual task(s) {unknown}; valid names: {', '.join(TASK_NAMES)}")
    _check_args(img_size, seed)
    if train_per_class is not None and train_per_class < 1:
        raise ValueError(f"train_per_class must be at least 1, got {train_per_class}")
    out = []
    for name in names:
        domain, build = _TASKS[name]
        classes, splits = build(img_size, int(seed), train_per_class)
        out.append(ContinualSplit(name, domain, classes, splits["train"], splits["val"], splits["test"]))
    return out


# ----------------------------------------------------------------------------- the proxy task
def _scene(rng: np.random.Generator, S: int) -> np.ndarray:
    """A procedural outdoor-like scene with an up: bright sky gradient over a darker ground with a
    wavy horizon, and some of perspective stripes, lit blobs resting on the horizon and strokes
    rising from the ground. (S, S, 3) in [0, 1]."""
    g = (np.arange(S, dtype=np.float32) + 0.5) / S
    yy, xx = np.meshgrid(g, g, indexing="ij")
    top = _rgb(rng.uniform(0.5, 0.7), rng.uniform(0, 0.6), rng.uniform(0.7, 1.0))
    low = _rgb(rng.uniform(), rng.uniform(0, 0.4), rng.uniform(0.5, 0.9))
    horizon = rng.uniform(0.35, 0.7) + rng.uniform(0, 0.08) * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * g
                                                                                    + rng.uniform()))
    hy = horizon[None, :]
    t = np.clip(yy / hy, 0, 1)[..., None]
    img = top * (1 - t) + low * t
    ground = _rgb(rng.uniform(), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.5))
    depth = np.clip(yy - hy, 0, None)
    shade = np.ones_like(yy)
    if rng.random() < 0.5:  # fields: stripes that crowd towards the horizon
        phase = rng.uniform(0.05, 0.2) / (depth + 0.02) + rng.uniform(0, 2 * np.pi)
        shade = 0.75 + 0.25 * np.sign(np.sin(phase))
    shade = shade * (1 + 0.3 * depth)
    ground_img = ground * shade[..., None] + rng.normal(0, 0.03, (S, S, 3))
    alpha = np.clip((yy - hy) * S + 0.5, 0, 1)[..., None]
    img = img * (1 - alpha) + ground_img * alpha
    for _ in range(int(rng.integers(0, 4))):  # blobs on the horizon, lit from above
        cx = rng.uniform(0.1, 0.9)
        rx, ry = rng.uniform(0.05, 0.18, 2)
        cy = np.interp(cx, g, horizon) - ry * rng.uniform(0.2, 0.8)
        r = np.sqrt(((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2)
        a = np.clip((1 - r) * min(rx, ry) * S + 0.5, 0, 1)[..., None]
        col = _rgb(rng.uniform(), rng.uniform(0.2, 0.9), rng.uniform(0.3, 0.8))
        lit = col * np.clip(1 + 0.6 * (cy - yy) / ry, 0.3, 1.8)[..., None]
        img = img * (1 - a) + lit * a
    for _ in range(int(rng.integers(0, 5))):  # strokes rising from the ground (trees, poles)
        x0 = rng.uniform(0.05, 0.95)
        y0 = np.interp(x0, g, horizon) + rng.uniform(0, 0.15)
        x1, y1 = x0 + rng.uniform(-0.1, 0.1), y0 - rng.uniform(0.15, 0.5)
        dx, dy = x1 - x0, y1 - y0
        u = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        dist = np.hypot(xx - x0 - u * dx, yy - y0 - u * dy) * S
        a = np.clip(rng.uniform(0.5, 1.5) - dist + 0.5, 0, 1)[..., None]
        img = img * (1 - a) + _rgb(rng.uniform(), rng.uniform(0, 0.7), rng.uniform(0.05, 0.4)) * a
    if rng.random() < 0.4:  # a sun
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25), rng.uniform(0.04, 0.1)
        a = np.clip((r - np.hypot(xx - cx, yy - cy)) * S + 0.5, 0, 1)[..., None]
        img = img * (1 - a) + _rgb(rng.uniform(0.1, 0.17), rng.uniform(0, 0.6), 1.0) * a
    return img.astype(np.float32)


def _proxy_base(rng: np.random.Generator, S: int) -> np.ndarray:
    """An upright image: half crops of photos with an up (none the tasks use), half scenes."""
    if rng.random() < 0.5:
        return _scene(rng, S)
    photo = _pil_photo(PROXY_PHOTOS[int(rng.integers(len(PROXY_PHOTOS)))])
    w, h = photo.size
    side = rng.uniform(0.3, 1.0) * min(w, h)
    bx, by = rng.uniform(0, w - side), rng.uniform(0, h - side)
    a = np.asarray(photo.resize((S, S), Image.BILINEAR, box=(bx, by, bx + side, by + side),
                              reducing_gap=2.0), dtype=np.float32)
    a = a / 255.0
    return a[:, ::-1] if rng.random() < 0.5 else a  # a mirror keeps the up


#: channel orders of the proxy's colour pretext (index p: the image's channels become x[perm])
PROXY_PERMUTATIONS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))
PROXY_CLASSES = [f"{90 * k}_{''.join('rgb'[c] for c in perm)}" for k in range(4) for perm in PROXY_PERMUTATIONS]


def proxy_label(rotation: int, permutation: int) -> int:
    """Class index of (quarter turns counter-clockwise, index into `PROXY_PERMUTATIONS`)."""
    return rotation * len(PROXY_PERMUTATIONS) + permutation


def proxy_task(img_size: int = 32, seed: int = 0, n: int = 4000) -> ContinualSplit:
    """Self-supervised rotation x colour-order prediction, to pretrain a backbone once before the sequence.

    Two pretexts in one label (24 classes): how far the image was turned (0/90/180/270 degrees,
    ``torch.rot90(x, k, dims=(-2, -1))``) and which order its RGB channels were put in (one of
    `PROXY_PERMUTATIONS`) -- so the features must see orientation *and* colour. Each upright
    image appears four times in one split, once per rotation, each with its own seeded channel
    order; undoing a sample's label gives the same upright image for all four. ``n`` is the
    number of train images (a multiple of 4 is used); val and test get an eighth of that each.
    No digit and no texture-task photo is used.
    """
    _check_args(img_size, seed)
    if n < 4:
        raise ValueError(f"n must be at least 4 (one upright image in four rotations), got {n}")
    n_base = n // 4
    n_held = max(2, round(n_base / 8))
    n_perm = len(PROXY_PERMUTATIONS)
    splits = {}
    for s, (split, count) in enumerate(zip(_SPLITS, (n_base, n_held, n_held))):
        images, labels = [], []
        for i in range(count):
            rng = np.random.default_rng([seed, 7, s, i])
            base = _proxy_base(rng, img_size)
            # for each rotation the channel order cycles over the base images: every class as often
            perms = [(i + k) % n_perm for k in range(4)]
            for k in range(4):  # np.rot90 over (H, W) turns the same way as torch.rot90 over dims (-2, -1)
                images.append(np.rot90(base, k, axes=(0, 1))[..., list(PROXY_PERMUTATIONS[perms[k]])])
                labels.append(proxy_label(k, perms[k]))
        splits[split] = (_to_tensor(images), torch.tensor(labels, dtype=torch.int64))
    return ContinualSplit("proxy_rotation_colour", "rotation and colour-order prediction on photos and drawn "
                          "scenes (self-supervised)", list(PROXY_CLASSES), splits["train"], splits["val"], splits["test"])

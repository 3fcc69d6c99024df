"""A user's own images: one folder per class (torchvision's ImageFolder layout).

Two layouts are understood:

    root/train/<class>/*.jpg  and  root/val/<class>/*.jpg     (also ``validation`` or ``test``)
    root/<class>/*.jpg                                          (split by a fixed seed)

Files that are not images, or that PIL cannot open, are skipped when the folder is scanned and
counted in one warning; an image that still fails to decode later is replaced by the next one
(with a warning naming the file) so a single bad file never kills a long run. A missing or empty
folder is an error that says what layout is expected.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .digits import stratified_split

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
TRAIN_DIRS = ("train",)
VAL_DIRS = ("val", "validation", "valid", "test")
_LAYOUT_HINT = ("expected one sub-folder per class (root/<class>/*.jpg), or root/train/<class>/... "
                "with root/val/<class>/...")


class DatasetError(ValueError):
    """A dataset is missing, empty or does not fit the model; the message says what to do."""


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS):
                out.append(Path(dirpath) / f)
    return out


def _readable(path: Path) -> str | None:
    """None if PIL can open and verify the file, else the reason it cannot."""
    try:
        with Image.open(path) as img:
            img.verify()
        return None
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        return f"{type(e).__name__}: {e}"


def scan_image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None,
                      verify: bool = True) -> tuple[list[tuple[Path, int]], list[str]]:
    """``[(path, class_index)]`` and the class names of one ``root/<class>/...`` tree.

    ``classes`` fixes the name -> index mapping (e.g. the training run's labels); a class folder
    not in it is an error, since the model has no output for it.
    """
    root = Path(root)
    names = _class_dirs(root)
    if not names:
        raise DatasetError(f"no class folders in {root}; {_LAYOUT_HINT}")
    if classes is None:
        classes = names
    else:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DatasetError(f"{root} has class folders the model does not know: {unknown[:8]}; "
                               f"the model's classes are {list(classes)[:20]}")
    index = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[Path, int]] = []
    bad: list[tuple[Path, str]] = []
    files = [(p, index[c]) for c in names for p in _image_files(root / c)]
    iterator = files
    if verify and len(files) > 2000:
        from tqdm import tqdm

        iterator = tqdm(files, desc=f"checking images in {root.name}", unit="img", leave=False)
    for path, target in iterator:
        reason = _readable(path) if verify else None
        if reason is None:
            samples.append((path, target))
        else:
            bad.append((path, reason))
    if bad:
        warnings.warn(f"skipped {len(bad)} of {len(files)} files in {root} that are not readable images "
                      f"(first: {bad[0][0]}: {bad[0][1][:120]})", stacklevel=2)
    if not samples:
        raise DatasetError(f"no readable images under {root} (extensions {', '.join(IMG_EXTENSIONS)}); "
                           f"{_LAYOUT_HINT}")
    return samples, list(classes)


class ImageFolderDataset(Dataset):
    """``(PIL image, class index)`` pairs from a list of samples; bad files are skipped."""

    def __init__(self, samples: list[tuple[Path, int]], classes: Sequence[str], root: str | os.PathLike = ""):
        self.samples = list(samples)
        self.targets = [t for _, t in self.samples]
        self.classes = list(classes)
        self.root = str(root)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        for attempt in range(min(len(self.samples), 16)):
            path, target = self.samples[(i + attempt) % len(self.samples)]
            try:
                with Image.open(path) as img:
                    img.load()
                    return img.copy() if img.mode in ("L", "RGB") else img.convert("RGB"), target
            except Exception as e:
                warnings.warn(f"could not decode {path} ({type(e).__name__}: {str(e)[:100]}); "
                              "using the next image instead", stacklevel=2)
        raise DatasetError(f"16 consecutive images from index {i} in {self.root} failed to decode; "
                           "the dataset looks corrupt")

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={self.root!r}, n={len(self)}, classes={len(self.classes)})"


def _find_subdir(root: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def image_folder_splits(root: str | os.PathLike, val_fraction: float = 0.2, split_seed: int = 0,
                        classes: Sequence[str] | None = None,
                        verify: bool = True) -> dict[str, ImageFolderDataset]:
    """``{"train", "val", "all"}`` datasets of a folder in either supported layout."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist; pass --data digits for the bundled "
                           f"digits, or a folder of your images ({_LAYOUT_HINT})")
    if not root.is_dir():
        raise DatasetError(f"--data {root} is a file, not a folder; {_LAYOUT_HINT}")
    train_dir, val_dir = _find_subdir(root, TRAIN_DIRS), _find_subdir(root, VAL_DIRS)
    if train_dir is not None:
        train_samples, classes = scan_image_folder(train_dir, classes, verify)
        if val_dir is None:
            raise DatasetError(f"{root} has a train/ folder but no val/ (or validation/, test/) folder")
        val_samples, _ = scan_image_folder(val_dir, classes, verify)
        return {"train": ImageFolderDataset(train_samples, classes, train_dir),
                "val": ImageFolderDataset(val_samples, classes, val_dir),
                "all": ImageFolderDataset(train_samples + val_samples, classes, root)}
    if val_dir is not None and len(_class_dirs(root)) == 1:  # only root/val/<class>: evaluation data
        samples, classes = scan_image_folder(val_dir, classes, verify)
        ds = ImageFolderDataset(samples, classes, val_dir)
        return {"val": ds, "all": ds}
    samples, classes = scan_image_folder(root, classes, verify)
    targets = np.array([t for _, t in samples])
    if len(samples) < 2:
        raise DatasetError(f"{root} holds {len(samples)} image; at least 2 are needed to train and validate")
    train_idx, val_idx = stratified_split(targets, val_fraction, split_seed)
    return {"train": ImageFolderDataset([samples[i] for i in train_idx], classes, root),
            "val": ImageFolderDataset([samples[i] for i in val_idx], classes, root),
            "all": ImageFolderDataset(samples, classes, root)}

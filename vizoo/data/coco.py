"""COCO-json detection data: a reader that survives real-world folders, its transforms, its batches.

Why each rule: a user's COCO export is often slightly wrong, and a long run must not die on it.
So the reader checks everything once, at construction, and reports each kind of problem in one
warning line: a missing image file is skipped (not a crash mid-epoch), a box reaching outside
its image is clipped, a box with no area left (w or h < 1 px) is dropped, crowd regions are not
training targets. Broken JSON is one ``ValueError`` naming the file and the JSON error.

Class indices are contiguous (0..K-1, in COCO category-id order) because a detector's head is
sized by K; ``cat_ids`` maps them back to the COCO ids that results files must use, and
:meth:`CocoDetection.ground_truth` gives the cleaned annotations to score against.

Transforms are torchvision's ``transforms.v2`` (boxes travel as ``tv_tensors.BoundingBoxes`` and
are resized/flipped with the image); their random draws use torch's default generator, so the
engine's per-sample seeding makes augmentation reproducible.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

Target = dict[str, Any]


def load_coco_json(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed file, or one clear error: which file, and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"cannot read the COCO annotation file {path}: {e.strerror or e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise ValueError(f"{path} is not a COCO detection file: it needs 'images' and 'categories' lists")
    return data


class CocoDetection(Dataset):
    """``(image float [3, H, W] in [0, 1], target)`` pairs of a COCO-json detection dataset.

    ``target``: ``boxes`` float (M, 4) xyxy in pixels of the returned image, ``labels`` long (M,)
    contiguous class indices, ``image_id`` (the COCO id), ``orig_size`` (h, w) of the file,
    ``img_size`` (h, w) after ``transforms``. ``transforms(image, target)`` receives a
    ``tv_tensors.Image`` (uint8) and ``target["boxes"]`` as ``tv_tensors.BoundingBoxes``.
    Counts of what was skipped or fixed are in ``stats``.
    """

    def __init__(self, images_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 transforms: Callable | None = None):
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        data = load_coco_json(self.ann_file)
        try:
            self._index(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.ann_file} has a malformed entry ({type(e).__name__}: {e}); COCO needs "
                             "images with id/file_name, annotations with image_id/category_id/bbox, "
                             "categories with id") from None
        self._warn(self.stats)

    def _index(self, data: dict[str, Any]) -> None:
        """Check every image and annotation once (see the module docstring for the rules)."""
        cats = sorted(data["categories"], key=lambda c: int(c["id"]))
        self.cat_ids: list[int] = [int(c["id"]) for c in cats]
        self.categories: list[str] = [str(c.get("name", c["id"])) for c in cats]
        index_of = {cid: k for k, cid in enumerate(self.cat_ids)}

        anns_of: dict[int, list[dict]] = {}
        for a in data.get("annotations", []):
            anns_of.setdefault(int(a["image_id"]), []).append(a)
        stats = dict(images=len(data["images"]), missing_images=0, unreadable_images=0, annotations=0, clipped_boxes=0,
                     degenerate_boxes=0, crowd=0, unknown_category=0)
        self._records: list[dict[str, Any]] = []
        self._crowd: list[dict] = []  # kept for scoring: COCO ignores detections on crowd regions
        for img in data["images"]:
            path = self.images_dir / img["file_name"]
            if not path.is_file():
                stats["missing_images"] += 1
                continue
            if "width" in img and "height" in img:
                w, h = int(img["width"]), int(img["height"])
            else:  # reads the header only
                try:
                    with Image.open(path) as im:
                        w, h = im.size
                except OSError:
                    stats["unreadable_images"] += 1
                    continue
            boxes, labels, anns = [], [], []
            for a in anns_of.get(int(img["id"]), []):
                if a.get("iscrowd", 0):
                    stats["crowd"] += 1
                    self._crowd.append(a)
                    continue
                if int(a["category_id"]) not in index_of:
                    stats["unknown_category"] += 1
                    continue
                x, y, bw, bh = (float(v) for v in a["bbox"])
                x0, y0 = min(max(x, 0.0), w), min(max(y, 0.0), h)
                x1, y1 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
                if x1 - x0 < 1 or y1 - y0 < 1:
                    stats["degenerate_boxes"] += 1
                    continue
                if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
                    stats["clipped_boxes"] += 1
                boxes.append((x0, y0, x1, y1))
                labels.append(index_of[int(a["category_id"])])
                anns.append({**a, "bbox": [x0, y0, x1 - x0, y1 - y0]})
            stats["annotations"] += len(boxes)
            self._records.append({"path": path, "image": {**img, "width": w, "height": h}, "anns": anns,
                                  "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                                  "labels": np.asarray(labels, dtype=np.int64)})
        self.stats = stats

    def _warn(self, s: dict[str, int]) -> None:
        if s["missing_images"]:
            warnings.warn(f"skipped {s['missing_images']} of {s['images']} images: file missing under "
                          f"{self.images_dir}", stacklevel=3)
        if s["unreadable_images"]:
            warnings.warn(f"skipped {s['unreadable_images']} of {s['images']} images: not a readable image "
                          f"under {self.images_dir}", stacklevel=3)
        fixes = [f"{s[k]} {what}" for k, what in (("clipped_boxes", "boxes clipped to their image"),
                                                   ("degenerate_boxes", "boxes with no area skipped"),
                                                   ("unknown_category", "annotations of unknown categories skipped"))
                 if s[k]]
        if fixes:
            warnings.warn(f"{self.ann_file}: {', '.join(fixes)}", stacklevel=3)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def image_ids(self) -> list[int]:
        return [int(r["image"]["id"]) for r in self._records]

    def ground_truth(self) -> dict[str, Any]:
        """The annotations this dataset trains on, as a COCO dict with the original category ids
        (plus crowd regions, which COCO scoring ignores): what detections should be scored against."""
        kept = set(self.image_ids)
        anns = [a for r in self._records for a in r["anns"]] + [a for a in self._crowd if int(a["image_id"]) in kept]
        anns = copy.deepcopy(anns)
        for a in anns:
            a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
            a.setdefault("iscrowd", 0)
        for k, a in enumerate(anns):
            a["id"] = k + 1
        return {"info": {"description": f"ground truth of {self.ann_file}"}, "licenses": [],
                "images": [copy.deepcopy(r["image"]) for r in self._records], "annotations": anns,
                "categories": [{"id": cid, "name": n} for cid, n in zip(self.cat_ids, self.categories)]}

    def _load(self, i: int) -> torch.Tensor:
        with Image.open(self._records[i]["path"]) as im:
            rgb = im.convert("RGB")
        return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        for attempt in range(len(self)):  # a file that broke after construction: take the next one
            j = (i + attempt) % len(self)
            try:
                pixels = self._load(j)
                break
            except (OSError, ValueError) as e:
                warnings.warn(f"could not decode {self._records[j]['path']} ({type(e).__name__}: "
                              f"{str(e)[:100]}); using the next image instead", stacklevel=2)
        else:
            raise RuntimeError(f"no image of {self.images_dir} can be decoded")
        rec = self._records[j]
        h, w = pixels.shape[-2:]
        boxes = torch.from_numpy(rec["boxes"].copy())
        boxes[:, 0::2].clamp_(0, w)  # the file may be smaller than the JSON said
        boxes[:, 1::2].clamp_(0, h)
        target: Target = {"boxes": boxes, "labels": torch.from_numpy(rec["labels"].copy()),
                          "image_id": int(rec["image"]["id"]), "orig_size": (int(h), int(w))}
        image: torch.Tensor = pixels
        if self.transforms is not None:
            from torchvision import tv_tensors

            target["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
            image, target = self.transforms(tv_tensors.Image(pixels), target)
            image = image.as_subclass(torch.Tensor)
            target["boxes"] = target["boxes"].as_subclass(torch.Tensor)
        image = image.float().div(255) if image.dtype == torch.uint8 else image.float()
        H, W = image.shape[-2:]
        b = target["boxes"].float()
        b[:, 0::2] = b[:, 0::2].clamp(0, W)
        b[:, 1::2] = b[:, 1::2].clamp(0, H)
        keep = ((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)  # a crop may cut a box away
        target["boxes"], target["labels"] = b[keep], target["labels"][keep]
        target["img_size"] = (int(H), int(W))
        return image, target


def detection_transforms(size: int | tuple[int, int] | None = None, hflip: float = 0.0) -> Callable:
    """Resize to a fixed ``size`` (h, w) and/or flip horizontally with probability ``hflip``;
    boxes follow the image. Training: ``hflip=0.5``; evaluation: ``hflip=0``."""
    from torchvision.transforms import v2

    steps: list[Callable] = []
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    if size is not None:
        steps.append(v2.Resize((size, size) if isinstance(size, int) else tuple(size), antialias=True))
    return v2.Compose(steps) if steps else v2.Identity()


def scale_boxes(boxes: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> torch.Tensor:
    """xyxy boxes of an image of ``from_size`` (h, w) in pixels of the same image at ``to_size``:
    predictions on a resized input back in the original image (``img_size`` -> ``orig_size``)."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def detection_collate(batch: Sequence[tuple[torch.Tensor, Target]]) -> tuple[torch.Tensor, list[Target]]:
    """``(images [B, 3, H, W], [targets])``: equal sizes are stacked; otherwise every image is
    padded with zeros at the bottom/right to the largest H and W (boxes stay valid; each target's
    ``img_size`` tells the real extent)."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    if all(im.shape == images[0].shape for im in images):
        return torch.stack(images), targets
    H = max(im.shape[-2] for im in images)
    W = max(im.shape[-1] for im in images)
    out = images[0].new_zeros((len(images), images[0].shape[0], H, W))
    for k, im in enumerate(images):
        out[k, :, :im.shape[-2], :im.shape[-1]] = im
    return out, targets

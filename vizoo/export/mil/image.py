"""Image inputs as Core ML feeds them to an ML Program.

An ``ImageType`` input reaches the program as a float tensor [1, C, H, W] holding the raw
pixel values (0..255) in the declared channel order (RGB or BGR); the scale and bias are
ordinary ``mul``/``add`` ops at the start of ``main``. So the executor only converts the
picture the app would pass into that tensor and runs the program as usual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ExecutionError


@dataclass(frozen=True)
class ImageSpec:
    """What the model description says about an image input."""

    color_space: str  # "RGB", "BGR", "GRAYSCALE" or "GRAYSCALE_FLOAT16"
    width: int
    height: int
    sizes: tuple[tuple[int, int], ...] = ()  # enumerated (width, height) choices, if flexible
    width_range: tuple[int, int] | None = None  # (lower, upper); upper -1 means unbounded
    height_range: tuple[int, int] | None = None

    @property
    def channels(self) -> int:
        return 3 if self.color_space in ("RGB", "BGR") else 1

    def accepts(self, width: int, height: int) -> bool:
        if self.sizes:
            return (width, height) in self.sizes
        if self.width_range and self.height_range:
            (wl, wu), (hl, hu) = self.width_range, self.height_range
            return wl <= width and (wu < 0 or width <= wu) and hl <= height and (hu < 0 or height <= hu)
        return (width, height) == (self.width, self.height)

    def describe(self) -> str:
        if self.sizes:
            return " or ".join(f"{w}x{h}" for w, h in self.sizes)
        if self.width_range and self.height_range:
            return f"width in {self.width_range}, height in {self.height_range}"
        return f"{self.width}x{self.height}"


def image_spec_from_feature(feature: Any) -> ImageSpec | None:
    """ImageSpec of a FeatureDescription proto, or None when the input is not an image."""
    if feature.type.WhichOneof("Type") != "imageType":
        return None
    img = feature.type.imageType
    space = type(img).ColorSpace.Name(img.colorSpace)
    sizes: tuple[tuple[int, int], ...] = ()
    wr = hr = None
    kind = img.WhichOneof("SizeFlexibility")
    if kind == "enumeratedSizes":
        sizes = tuple((int(s.width), int(s.height)) for s in img.enumeratedSizes.sizes)
    elif kind == "imageSizeRange":
        r = img.imageSizeRange
        wr = (int(r.widthRange.lowerBound), int(r.widthRange.upperBound))
        hr = (int(r.heightRange.lowerBound), int(r.heightRange.upperBound))
    return ImageSpec(space, int(img.width), int(img.height), sizes, wr, hr)


def image_to_tensor(name: str, value: Any, spec: ImageSpec, dtype: np.dtype) -> np.ndarray:
    """Turn a PIL image, a uint8 HWC array or a float array into the program's [1, C, H, W].

    - PIL images and uint8 arrays are pictures: HWC (or HW) in RGB order, as an app passes
      them; BGR models get their channels swapped here, as Core ML does.
    - Float arrays shaped [1, C, H, W] or [C, H, W] are taken as the pixel tensor itself
      (already in the model's channel order, values 0..255); other float arrays are pictures.
    """
    tensor = _as_tensor(name, value, spec)
    chw = tensor if tensor is not None else _hwc_to_chw(name, _as_picture(name, value, spec), spec)
    height, width = chw.shape[1:]
    if not spec.accepts(width, height):
        raise ExecutionError(
            f"image input '{name}' is {width}x{height} but the model takes {spec.describe()}; "
            "resize the picture first (Core ML does not resize image inputs)"
        )
    return chw[None].astype(dtype)


def _as_tensor(name: str, value: Any, spec: ImageSpec) -> np.ndarray | None:
    """The float array as a [C, H, W] tensor, or None when it is a picture."""
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
        return None
    c = spec.channels
    if value.ndim == 4:
        if value.shape[:2] != (1, c):
            raise ExecutionError(
                f"image input '{name}': a 4-D array must be [1, {c}, H, W], got {value.shape}"
            )
        return value[0].astype(np.float32)
    if value.ndim == 3 and value.shape[0] == c:
        if value.shape[-1] != c or value.shape[1:] == (spec.height, spec.width):
            return value.astype(np.float32)
    return None


def _as_picture(name: str, value: Any, spec: ImageSpec) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with coremltools
        Image = None
    if Image is not None and isinstance(value, Image.Image):
        if spec.color_space == "GRAYSCALE_FLOAT16" and value.mode == "F":
            return np.asarray(value, dtype=np.float32)
        return np.asarray(value.convert("RGB" if spec.channels == 3 else "L"))
    if not isinstance(value, np.ndarray):
        raise ExecutionError(
            f"image input '{name}' must be a PIL image or a NumPy array, got {type(value).__name__}"
        )
    if value.dtype != np.uint8 and not np.issubdtype(value.dtype, np.floating):
        raise ExecutionError(f"image input '{name}': unsupported array dtype {value.dtype}")
    return value


def _hwc_to_chw(name: str, pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3:
        raise ExecutionError(f"image input '{name}': expected an HxWxC picture, got shape {pixels.shape}")
    if spec.channels == 1:
        if pixels.shape[-1] == 3:
            raise ExecutionError(
                f"image input '{name}' is grayscale; pass an HxW (or PIL 'L') picture, not RGB"
            )
    elif pixels.shape[-1] == 4:
        pixels = pixels[..., :3]  # RGBA: Core ML ignores alpha
    elif pixels.shape[-1] != 3:
        raise ExecutionError(f"image input '{name}': expected 3 channels (RGB), got {pixels.shape[-1]}")
    chw = np.transpose(pixels, (2, 0, 1)).astype(np.float32)
    if spec.color_space == "BGR":
        chw = chw[::-1]
    return chw

"""The model behind a demo, with the pre- and post-processing an app does.

A backend takes the frame after its geometry step (an RGB ``uint8`` image of the model's input
size, see :func:`center_crop` / :func:`letterbox`) and returns named float outputs:
``{"logits"}`` or ``{"probs"}`` for a classifier, ``{"scores": [1, N, C], "boxes": [1, N, 4]}``
for a detector (sigmoid scores; ``x0, y0, x1, y1`` in the input's pixels).

- :class:`TorchBackend`: a zoo model (``--model`` / ``--checkpoint``); detectors run
  ``forward_export``, the very function the exporter converts.
- :class:`TFLiteBackend`: an exported ``.tflite`` run by ai-edge-litert exactly as an Android
  app would: the sidecar (or the metadata embedded in the file) gives mean/std, layout, labels and
  output names; the input is NHWC float32, or int8 quantized with the file's scale and zero point.
  Reading it is the reference for app code.
- :class:`CoreMLBackend`: an exported ``.mlpackage``: Core ML on macOS; elsewhere vizoo's NumPy
  MIL executor (slow; for checking the file, not for live video).
"""
from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DemoError, import_cv2

CLASSIFY, DETECT = "classify", "detect"
_TASK_WORDS = {CLASSIFY: "a classifier", DETECT: "a detector"}


# --- what a frame becomes -------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocessing:
    """How a frame becomes the model's input: size, normalisation, resize rule."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @property
    def size_text(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Geometry:
    """Maps the model input's pixel coordinates back to the frame: ``frame = input / scale + offset``."""

    scale: float
    offset_x: float = 0.0
    offset_y: float = 0.0

    def to_frame(self, boxes: np.ndarray) -> np.ndarray:
        out = np.asarray(boxes, dtype=np.float32) / self.scale
        out[..., 0::2] += self.offset_x
        out[..., 1::2] += self.offset_y
        return out


_INTERPOLATION = {"bilinear": "INTER_LINEAR", "bicubic": "INTER_CUBIC", "nearest": "INTER_NEAREST",
                  "area": "INTER_AREA", "lanczos": "INTER_LANCZOS4"}


def _resize(cv2: Any, image: np.ndarray, width: int, height: int, interpolation: str) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == (width, height):
        return image
    shrink = width < image.shape[1] and height < image.shape[0]
    # shrinking: area averaging (no aliasing, as Android's filtered Bitmap scaling or vImage)
    flag = cv2.INTER_AREA if shrink else getattr(cv2, _INTERPOLATION.get(interpolation, "INTER_LINEAR"))
    return cv2.resize(image, (width, height), interpolation=flag)


def _to_model_pixels(cv2: Any, bgr: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1:
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)[..., None]
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def center_crop(bgr: np.ndarray, pre: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """Classification: resize so the input (enlarged by ``1 / crop_pct``) fits the short side,
    crop the centre; returns RGB (or gray) uint8 ``(H, W, C)`` and the mapping back."""
    cv2 = import_cv2()
    h, w = pre.height, pre.width
    H, W = bgr.shape[:2]
    scale = max(h, w) / pre.crop_pct / min(H, W)
    nw, nh = max(w, round(W * scale)), max(h, round(H * scale))
    img = _resize(cv2, bgr, nw, nh, pre.interpolation)
    top, left = (nh - h) // 2, (nw - w) // 2
    img = img[top:top + h, left:left + w]
    return _to_model_pixels(cv2, img, pre.channels), Geometry(scale, left / scale, top / scale)


def letterbox(bgr: np.ndarray, pre: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """Detection: the whole frame scaled to fit the input, top-left, the rest filled with the
    mean colour (0 after normalisation, as detectors pad); returns the pixels and the mapping back."""
    cv2 = import_cv2()
    h, w = pre.height, pre.width
    H, W = bgr.shape[:2]
    scale = min(h / H, w / W)
    nw, nh = min(w, max(1, round(W * scale))), min(h, max(1, round(H * scale)))
    img = _to_model_pixels(cv2, _resize(cv2, bgr, nw, nh, pre.interpolation), pre.channels)
    if (nh, nw) == (h, w):
        return img, Geometry(scale)
    fill = np.round(np.asarray(pre.mean[:pre.channels], np.float32) * 255).astype(np.uint8)
    canvas = np.empty((h, w, pre.channels), np.uint8)
    canvas[:] = fill
    canvas[:nh, :nw] = img
    return canvas, Geometry(scale)


def normalize(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """``(pixel / 255 - mean) / std`` per channel, float32, same layout (HWC)."""
    mean = np.asarray(pre.mean[:pre.channels], np.float32)
    std = np.asarray(pre.std[:pre.channels], np.float32)
    return pixels.astype(np.float32) * (1.0 / (255.0 * std)) - mean / std


# --- exported files' metadata ---------------------------------------------------------------------

def _tflite_metadata(path: Path) -> dict[str, Any]:
    from vizoo.export.tflite import read_metadata, sidecar_path

    side = sidecar_path(path)
    if side.is_file():
        try:
            return json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise DemoError(f"the sidecar {side} is not valid JSON ({e}); delete it (the file's "
                            "embedded metadata is then used) or re-export") from e
    try:
        return read_metadata(path)
    except ImportError as e:
        raise DemoError(f"reading {path.name}'s embedded metadata needs ai-edge-litert ({e}): "
                        "pip install 'vizoo[export]'") from None
    except Exception:  # noqa: BLE001 - a file without readable metadata
        return {}


def _coreml_metadata(path: Path) -> dict[str, Any]:
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    user = dict(mlmodel.user_defined_metadata)

    def get(key: str, default: Any = None) -> Any:
        value = user.get(f"vizoo.{key}")
        if value is None:
            return default
        try:
            return json.loads(value)
        except (json.JSONDecodeError, TypeError):
            return value

    meta: dict[str, Any] = {"format": "coreml", "model": get("model"), "precision": get("precision"),
                            "input_layout": "NCHW", "functions": get("functions")}
    shapes = get("input_shapes")
    if shapes:
        meta["inputs"] = [{"shape": s} for s in shapes]
    if get("output_names"):
        meta["output_names"] = get("output_names")
    if get("labels") is not None:
        meta["labels"] = get("labels")
    pre = get("preprocessing")
    if isinstance(pre, dict):
        meta["preprocessing"] = {"mean": pre.get("mean"), "std": pre.get("std"),
                                 "resize": {"interpolation": pre.get("interpolation", "bilinear"),
                                            "crop_pct": pre.get("crop_pct", 1.0)}}
    return {k: v for k, v in meta.items() if v is not None}


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """What an app needs to feed an exported file and read its answer, as vizoo wrote it.

    ``.tflite``: the ``<file>.json`` sidecar, else the ``vizoo`` metadata embedded in the file
    (the same JSON). ``.mlpackage`` / ``.mlmodel``: the ``vizoo.*`` user-defined metadata, in the
    same keys (``inputs``, ``input_layout``, ``output_names``, ``labels``, ``preprocessing`` with
    ``mean``, ``std`` and ``resize``). ``{}`` for a file vizoo did not write.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() == ".tflite":
        return _tflite_metadata(path)
    if path.suffix.lower() in (".mlpackage", ".mlmodel"):
        return _coreml_metadata(path)
    raise ValueError(f"{path}: not an exported file vizoo knows (.tflite, .mlpackage, .mlmodel)")


def _preprocessing_from(meta: dict[str, Any], chw: tuple[int, int, int]) -> Preprocessing:
    pre = meta.get("preprocessing") or {}
    c, h, w = chw
    resize = pre.get("resize") or {}
    return Preprocessing(channels=c, height=h, width=w,
                         mean=tuple(pre.get("mean") or (0.0,) * c), std=tuple(pre.get("std") or (1.0,) * c),
                         interpolation=resize.get("interpolation", "bilinear"),
                         crop_pct=float(resize.get("crop_pct") or 1.0))


def _task_from_names(names: Sequence[str]) -> str | None:
    names = [str(n).lower() for n in names]
    if "scores" in names and "boxes" in names:
        return DETECT
    if len(names) == 1 and names[0] in ("logits", "probs", "classlabel_probs"):
        return CLASSIFY
    return None


def parse_labels(text: str | None) -> list[str] | None:
    """``--labels``: a comma-separated list, or a text file with one label per line."""
    if not text:
        return None
    path = Path(text)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if "," not in text and (path.suffix or "/" in text):
        raise DemoError(f"--labels {text}: no such file; give a file with one label per line, "
                        "or the labels separated by commas (circle,square,...)")
    return [s.strip() for s in text.split(",")]


def parse_input_size(text: str | int | None) -> tuple[int, int] | None:
    """``--img-size``: ``224`` or ``HxW`` -> (H, W)."""
    if text is None:
        return None
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise DemoError(f"--img-size {text}: give one number (224) or HxW (192x256)") from None
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 8:
        raise DemoError(f"--img-size {text}: give one number (224) or HxW (192x256), at least 8")
    return size  # type: ignore[return-value]


# --- backends -------------------------------------------------------------------------------------

@dataclass
class Backend:
    """A model that turns the geometry-done pixels into named outputs (see the module docstring)."""

    name: str                     # what the overlay and the summary call it
    task: str                     # "classify" or "detect"
    pre: Preprocessing
    labels: list[str] | None = None
    notes: list[str] = field(default_factory=list)   # lines for the user (e.g. no labels)

    def prepare(self, pixels: np.ndarray) -> Any:
        """The model's input from ``(H, W, C)`` uint8 pixels (normalised, laid out, quantized)."""
        raise NotImplementedError

    def run(self, feed: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __call__(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        return self.run(self.prepare(pixels))

    def close(self) -> None:
        """Free the runtime (nothing to do for most)."""

    def check_task(self, task: str, source: str) -> None:
        if self.task != task:
            other = "detect" if task == CLASSIFY else "classify"
            raise DemoError(f"{source} is {_TASK_WORDS[self.task]} "
                            f"({'scores + boxes' if self.task == DETECT else 'class logits'}), not "
                            f"{_TASK_WORDS[task]}: run `vizoo demo {other}` (demos/webcam_{other}.py) with it")


class TorchBackend(Backend):
    """A PyTorch model in eval mode; detectors through ``forward_export``."""

    def __init__(self, model: Any, pre: Preprocessing, labels: list[str] | None, task: str, name: str,
                 threads: int = 2):
        import torch

        super().__init__(name=name, task=task, pre=pre, labels=labels)
        self.model = model.eval()
        self._torch = torch
        if threads:
            torch.set_num_threads(threads)

    def prepare(self, pixels: np.ndarray) -> Any:
        x = normalize(pixels, self.pre).transpose(2, 0, 1)[None]
        return self._torch.from_numpy(np.ascontiguousarray(x))

    def run(self, feed: Any) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            if self.task == DETECT:
                scores, boxes = self.model.forward_export(feed)
                return {"scores": scores.float().numpy(), "boxes": boxes.float().numpy()}
            out = self.model(feed)
        if not hasattr(out, "dim") or out.dim() != 2:
            raise DemoError(f"{self.name} does not return class logits (got "
                            f"{type(out).__name__}{tuple(out.shape) if hasattr(out, 'shape') else ''}); "
                            "the classification demo needs a classifier")
        return {"logits": out.float().numpy()}


def torch_task(model: Any) -> str | None:
    """``detect`` for zoo detectors (``forward_export`` / ``export_task``), ``classify`` for models
    with a classification head, None otherwise."""
    if getattr(model, "export_task", None) == "detection" or hasattr(model, "forward_export"):
        return DETECT
    if getattr(model, "num_classes", None) or (getattr(model, "pretrained_cfg", None) or {}).get("num_classes"):
        return CLASSIFY
    return None


def imagenet_labels() -> list[str] | None:
    """ImageNet-1k class names (timm ships them), shortened to their first synonym."""
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(info.num_classes())]
    except Exception:  # noqa: BLE001 - an older timm: classes are shown by index
        return None


def load_torch(model_name: str | None, checkpoint: str | None, pretrained: Any = False,
               input_size: tuple[int, int] | None = None, labels: list[str] | None = None,
               threads: int = 2) -> TorchBackend:
    """A zoo model by name (``pretrained``: False, True, a path or URL) or from a vizoo checkpoint."""
    import vizoo
    from vizoo.hub import load_model

    if checkpoint:
        path = Path(checkpoint)
        if not path.exists():
            raise DemoError(f"{checkpoint}: no such checkpoint; pass the .safetensors a training run "
                            "wrote (e.g. runs/quickstart/train/best.safetensors)")
        model = load_model(path, name=model_name)
        what = f"{getattr(model, 'vizoo_name', model_name) or path.stem} ({path.name})"
    else:
        model = vizoo.create_model(model_name, pretrained=pretrained)
        what = f"{model_name}" + ("" if pretrained else " (random weights)")
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    c, h, w = (list(cfg.get("input_size") or (3, 224, 224)) + [224, 224])[:3]
    if input_size:
        h, w = input_size
    pre = Preprocessing(channels=int(c), height=int(h), width=int(w),
                        mean=tuple(cfg.get("mean") or (0.485, 0.456, 0.406)),
                        std=tuple(cfg.get("std") or (0.229, 0.224, 0.225)),
                        interpolation=cfg.get("interpolation") or "bilinear",
                        crop_pct=float(cfg.get("crop_pct") or 1.0))
    task = torch_task(model)
    if task is None:
        raise DemoError(f"{what} has no classification or detection head (a features_only model?); "
                        "the demos need a classifier or a detector")
    labels = labels or getattr(model, "labels", None)
    if labels is None and task == CLASSIFY and pretrained and getattr(model, "num_classes", None) == 1000:
        labels = imagenet_labels()
    backend = TorchBackend(model, pre, labels, task, name=f"pytorch {what}", threads=threads)
    if backend.labels is None:
        backend.notes.append(f"{what} has no class labels: classes are shown by index (--labels names them)")
    return backend


class TFLiteBackend(Backend):
    """An exported .tflite run by ai-edge-litert as an app runs it (see the module docstring)."""

    def __init__(self, path: str | Path, threads: int = 2, input_size: tuple[int, int] | None = None,
                 labels: list[str] | None = None):
        from vizoo.export.tflite import interpreter_class

        path = Path(path)
        if not path.is_file():
            raise DemoError(f"{path}: no such .tflite file; `vizoo export NAME --format tflite` writes one")
        Interpreter, runtime = interpreter_class()   # a one-line error when ai-edge-litert is missing
        meta = read_export_metadata(path)
        try:
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
        except (ValueError, RuntimeError) as e:
            raise DemoError(f"{path} is not a TFLite model the runtime can load "
                            f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        signatures = list(interpreter.get_signature_list())
        self._runner = interpreter.get_signature_runner(signatures[0]) if signatures else None
        if self._runner is not None:
            in_details = self._runner.get_input_details()
            self._in_name, self._input = next(iter(in_details.items()))
            self._outputs = self._runner.get_output_details()
        else:  # a file without signatures: the graph's own input/output order
            self._interpreter = interpreter
            self._input = interpreter.get_input_details()[0]
            self._in_name = self._input["name"]
            self._outputs = {d["name"]: d for d in interpreter.get_output_details()}
        shape = [int(v) for v in self._input["shape"]]
        if len(shape) != 4:
            raise DemoError(f"{path} takes a {len(shape)}-D input {shape}, not an image (1, H, W, C)")
        layout = str(meta.get("input_layout") or ("NCHW" if shape[1] in (1, 3) and shape[3] not in (1, 3)
                                                  else "NHWC")).upper()
        self.nhwc = layout == "NHWC"
        b, c, h, w = (shape[0], shape[3], shape[1], shape[2]) if self.nhwc else shape
        declared = (meta.get("inputs") or [{}])[0].get("shape")
        if declared and [int(v) for v in declared] != shape:
            raise DemoError(f"{path}: its metadata ({path.name}.json) describes an input {declared} but "
                            f"the file takes {shape}: the sidecar belongs to another export; delete it "
                            f"or export again")
        if b != 1:
            raise DemoError(f"{path} was exported for batches of {b}; the demo feeds one frame: export "
                            f"with batch 1 (`vizoo export NAME --batch 1`)")
        if input_size and tuple(input_size) != (h, w):
            size = f"{input_size[0]}" if input_size[0] == input_size[1] else f"{input_size[0]}x{input_size[1]}"
            raise DemoError(f"{path} takes {w}x{h} inputs (a TFLite file has a fixed input size), not "
                            f"--img-size {size}: drop --img-size, or export at that size "
                            f"(`vizoo export {meta.get('model', 'NAME')} --format tflite --img-size {size}`)")
        self._out_names = self._output_names(meta)
        task = _task_from_names(self._out_names.values())
        if task is None:
            raise DemoError(f"{path} has outputs {list(self._out_names.values())}: neither class logits "
                            "nor detection scores + boxes")
        pre = _preprocessing_from(meta, (c, h, w))
        file_labels = meta.get("labels")
        super().__init__(name=f"tflite {meta.get('precision', '')} ({runtime})".replace("  ", " "),
                         task=task, pre=pre, labels=labels or file_labels)
        if not meta:
            self.notes.append(f"{path.name} has no vizoo metadata: no normalisation (mean 0, std 1), no labels")
        elif self.labels is None:
            self.notes.append(f"{path.name} carries no class labels: classes are shown by index "
                              "(--labels circle,square,... names them)")
        self.path = path
        self._in_scale, self._in_zero = self._input.get("quantization", (0.0, 0))
        self._in_dtype = self._input["dtype"]

    def _output_names(self, meta: dict[str, Any]) -> dict[str, str]:
        """Runtime output name -> the model's (``scores``, ``boxes``, ``logits``), from the metadata."""
        names = meta.get("output_names") or []
        described = [o.get("name") for o in meta.get("outputs") or []]
        if len(names) == len(described) == len(self._outputs) and set(described) <= set(self._outputs):
            return dict(zip(described, names))
        runtime = sorted(self._outputs, key=lambda n: (int("".join(ch for ch in n if ch.isdigit()) or 0), n))
        if len(runtime) == 1:
            return {runtime[0]: "logits"}
        shapes = [list(self._outputs[n]["shape"]) for n in runtime]
        if len(runtime) == 2:
            box = [i for i, s in enumerate(shapes) if s[-1] == 4]
            if len(box) == 1:
                return {runtime[box[0]]: "boxes", runtime[1 - box[0]]: "scores"}
        return {n: n for n in runtime}

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        x = normalize(pixels, self.pre)                      # (H, W, C) float32
        x = x[None] if self.nhwc else x.transpose(2, 0, 1)[None]
        if self._in_scale:                                   # int8 input: q = x / scale + zero point
            info = np.iinfo(self._in_dtype)
            x = np.clip(np.round(x / self._in_scale) + self._in_zero, info.min, info.max)
        return np.ascontiguousarray(x.astype(self._in_dtype))

    def run(self, feed: np.ndarray) -> dict[str, np.ndarray]:
        if self._runner is not None:
            raw = self._runner(**{self._in_name: feed})
        else:
            it = self._interpreter
            it.set_tensor(self._input["index"], feed)
            it.invoke()
            raw = {n: it.get_tensor(d["index"]) for n, d in self._outputs.items()}
        out = {}
        for runtime_name, name in self._out_names.items():
            y = raw[runtime_name]
            scale, zero = self._outputs[runtime_name].get("quantization", (0.0, 0))
            out[name] = (y.astype(np.float32) - zero) * scale if scale else y.astype(np.float32)
        return out


class CoreMLBackend(Backend):
    """An exported CoreML package: Core ML on macOS, vizoo's NumPy MIL executor elsewhere."""

    def __init__(self, path: str | Path, input_size: tuple[int, int] | None = None,
                 labels: list[str] | None = None):
        path = Path(path)
        if not path.exists():
            raise DemoError(f"{path}: no such CoreML package; `vizoo export NAME --format coreml` writes one")
        try:
            import coremltools as ct
        except ImportError:
            raise DemoError("--coreml needs coremltools: pip install 'vizoo[export]'") from None
        meta = read_export_metadata(path)
        desc = ct.models.MLModel(str(path), skip_model_load=True).get_spec().description
        functions = [(f.name, f) for f in desc.functions] or [("main", desc)]
        # the image function (what an app feeds a camera frame through Vision) when there is one
        fname, fdesc = next(((n, f) for n, f in functions
                             if f.input and f.input[0].type.WhichOneof("Type") == "imageType"), functions[0])
        multi = len(functions) > 1
        feature = fdesc.input[0]
        self._input_name = feature.name
        self._image = feature.type.WhichOneof("Type") == "imageType"
        if self._image:
            c = 1 if feature.type.imageType.colorSpace == feature.type.imageType.GRAYSCALE else 3
            h, w = int(feature.type.imageType.height), int(feature.type.imageType.width)
        else:
            shape = [int(v) for v in feature.type.multiArrayType.shape]
            if len(shape) != 4:
                raise DemoError(f"{path} takes a {len(shape)}-D input {shape}, not an image (1, C, H, W)")
            c, h, w = shape[1:]
        if input_size and tuple(input_size) != (h, w):
            raise DemoError(f"{path} takes {w}x{h} inputs (fixed when exported), not --img-size "
                            f"{input_size[0]}x{input_size[1]}: drop --img-size, or export at that size")
        self._probs = fdesc.predictedProbabilitiesName or None
        out_names = meta.get("output_names") or [o.name for o in fdesc.output]
        task = CLASSIFY if self._probs else _task_from_names(out_names)
        if task is None:
            raise DemoError(f"{path} has outputs {out_names}: neither class logits nor detection scores + boxes")
        self._out_names = [o.name for o in fdesc.output]
        self._prob_kind = "logits" if list(meta.get("output_names") or ["logits"]) == ["logits"] else "probs"
        on_mac = sys.platform == "darwin" and platform.mac_ver()[0] != ""
        if on_mac:
            model = ct.models.MLModel(str(path), function_name=fname if multi else None)
            self._predict = model.predict
            runtime = "Core ML"
        else:
            from vizoo.export import mil

            program = mil.load_program(path, fname if multi else None)
            missing = mil.unsupported_ops(program)
            if missing:
                raise DemoError(f"Core ML runs only on macOS, and vizoo's NumPy MIL executor cannot run "
                                f"{path.name} here (ops {', '.join(sorted(missing))}); use the model's "
                                ".tflite with --tflite")
            self._predict = lambda feeds: mil.run_program(program, feeds)
            runtime = "vizoo MIL executor, NumPy: Core ML itself runs on macOS only"
        super().__init__(name=f"coreml {meta.get('precision', '')} ({runtime})".replace("  ", " "), task=task,
                         pre=_preprocessing_from(meta, (c, h, w)), labels=labels or meta.get("labels"))
        if task == DETECT and self.labels is None:
            self.notes.append(f"{path.name} carries no class labels: classes are shown by index "
                              "(--labels circle,square,... names them)")
        if not on_mac:
            self.notes.append("Core ML runs on macOS only: this runs the package with vizoo's NumPy MIL "
                              "executor (slow, for checking the file)")

    def prepare(self, pixels: np.ndarray) -> dict[str, Any]:
        if self._image:   # the package normalises inside: it takes the RGB picture as is
            from PIL import Image

            img = Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")
            return {self._input_name: img}
        return {self._input_name: np.ascontiguousarray(normalize(pixels, self.pre).transpose(2, 0, 1)[None])}

    def run(self, feed: dict[str, Any]) -> dict[str, np.ndarray]:
        result = self._predict(feed)
        if self._probs:
            probs = result[self._probs]
            if isinstance(probs, dict):
                keys = list(probs)
                if self.labels is None:
                    self.labels = [str(k) for k in keys]
                lookup = {str(k): v for k, v in probs.items()}
                probs = [lookup.get(str(label), 0.0) for label in self.labels]
            # a vizoo classifier's package reports its logits there (the model has no softmax)
            return {self._prob_kind: np.asarray(probs, np.float32).reshape(1, -1)}
        names = dict(zip(self._out_names, self._out_names))
        return {names[n]: np.asarray(result[n], np.float32) for n in self._out_names}


def load_backend(model: str | None = None, checkpoint: str | None = None, tflite: str | None = None,
                 coreml: str | None = None, pretrained: Any = False, input_size: tuple[int, int] | None = None,
                 labels: list[str] | None = None, threads: int = 2) -> Backend:
    """The backend the arguments name (exactly one of model/checkpoint, tflite, coreml)."""
    chosen = [bool(model or checkpoint), bool(tflite), bool(coreml)]
    if sum(chosen) != 1:
        raise DemoError("name one model: --model NAME (and/or --checkpoint FILE), --tflite FILE or --coreml FILE")
    if tflite:
        return TFLiteBackend(tflite, threads=threads, input_size=input_size, labels=labels)
    if coreml:
        return CoreMLBackend(coreml, input_size=input_size, labels=labels)
    return load_torch(model, checkpoint, pretrained=pretrained, input_size=input_size, labels=labels,
                      threads=threads)

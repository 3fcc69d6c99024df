"""What is exported: the model with its static input shapes, preprocessing, labels and outputs.

Everything a converter, a verifier or an app needs to know about the model is resolved here once,
and the input size is checked by running the model before any converter starts.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..layers.export_mode import ExportAware, export_mode
from .errors import ExportError, InputSizeError
from .inputs import is_diffusion


class ForwardExport(nn.Module):
    """Exports ``model.forward_export`` (e.g. a detector's raw scores and boxes) when defined."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model.forward_export(*args)


class ImageInput(nn.Module):
    """Takes an image in [0, 1] and applies the model's mean/std (exact, one op more than the
    model): CoreML's ImageType has ONE scale, so a per-channel std cannot be folded into it."""

    def __init__(self, module: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> Any:
        return self.module((x - self.mean) / self.std)


@dataclass
class ModelSpec:
    name: str
    model: nn.Module              # the user's model, eval mode
    module: nn.Module             # what is converted (model, or its forward_export)
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    output_shapes: list[tuple[int, ...]]
    input_size: tuple[int, ...]   # (C, H, W) of the image input, or the model's input_size
    batch_size: int
    image_input: bool             # first input is an image with known mean/std
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classifier: bool              # one (B, K) output of class logits
    num_classes: int | None
    labels: list[str] | None
    license: str
    cfg: dict[str, Any] = field(default_factory=dict)
    export_aware: list[str] = field(default_factory=list)
    #: converter intermediates shared by the precisions of one export (fp32 flatbuffer, ...)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    #: a detector whose ``forward_export`` gives (scores[B, N, C], boxes[B, N, 4]): parity also
    #: compares the top-k detections, which is what an app shows
    detector: bool = False
    #: several entry points in one file (a continual model's tasks): name -> that function's spec;
    #: the fields above are the first function's. Empty: one function.
    functions: dict[str, "ModelSpec"] = field(default_factory=dict)
    #: "diffusion" for a denoising model (sample, timestep[, class_labels]): verified on noisy
    #: samples over the whole schedule, not photographs (``vizoo.export.inputs``)
    task: str | None = None
    #: the inputs were given to ``export_model(example_inputs=...)``: parity draws resemble them
    #: instead of calling the model's ``example_inputs`` hook
    explicit_inputs: bool = False
    #: what verification compares a file with when that is not ``module`` itself (a quantized
    #: file is judged against the fake-quant model; ``module`` is the graph that was converted)
    reference_module: nn.Module | None = field(default=None, repr=False)

    @property
    def stem(self) -> str:
        return re.sub(r"[^\w.\-]+", "_", self.name).strip("_") or "model"

    @property
    def camera_input(self) -> bool:
        """One batch-1 image input: a file can take a camera frame directly."""
        return self.image_input and len(self.example_inputs) == 1 and self.batch_size == 1

    @property
    def input_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(x.shape) for x in self.example_inputs]

    def class_labels(self) -> list[str]:
        """The labels an app shows; class indices as text when the model has none."""
        if self.labels:
            return list(self.labels)
        return [str(i) for i in range(self.num_classes or 0)]

    @torch.no_grad()
    def reference(self, samples: Sequence[tuple[torch.Tensor, ...]], export_form: bool = True,
                  chunk: int = 16) -> list[np.ndarray]:
        """PyTorch outputs for batch-1 samples, stacked per output: ``[(N, ...), ...]``.

        ``export_form`` selects the ExportAware layers' exportable form (what was converted);
        False runs the model exactly as in training/eval code.
        """
        outs: list[list[np.ndarray]] = [[] for _ in self.output_names]
        module = self.reference_module if self.reference_module is not None else self.module
        # a diffusion model's samples have one timestep each (a quantized UNet picks its
        # activation set per call): one call per sample
        one_at_a_time = self.task == "diffusion"
        with export_mode(self.model, enabled=export_form):
            if not one_at_a_time:
                try:
                    batches = [module(*(torch.cat([s[k] for s in samples[i:i + chunk]])
                                        for k in range(len(samples[0]))))
                               for i in range(0, len(samples), chunk)]
                except Exception:  # noqa: BLE001 - a layer tied to the exported batch: one at a time
                    one_at_a_time = True
            if one_at_a_time:
                batches = [module(*s) for s in samples]
        for out in batches:
            for k, y in enumerate(flatten_outputs(out)):
                outs[k].append(y.detach().float().numpy())
        return [np.concatenate(o) for o in outs]


    def references(self, samples: Sequence[tuple[torch.Tensor, ...]]) -> tuple[Any, Any]:
        """(export-form, eager) references for verification; with several functions, dicts by
        function name (eager None when no layer has an export form)."""
        if self.functions:
            eager = {k: s.reference(samples, export_form=False) for k, s in self.functions.items() if s.export_aware}
            return {k: s.reference(samples) for k, s in self.functions.items()}, eager or None
        return (self.reference(samples, export_form=True),
                self.reference(samples, export_form=False) if self.export_aware else None)


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flatten_outputs(v)]
    raise ExportError(f"the model returns {type(out).__name__}; an exported model must return "
                         "tensors (or tuples/dicts of tensors)")


def _output_names(out: Any, classifier: bool, detector: bool = False) -> list[str]:
    if classifier:
        return ["logits"]
    if detector:
        return ["scores", "boxes"]
    if isinstance(out, dict):
        return [re.sub(r"\W+", "_", str(k)) for k in out]
    return [f"output_{i}" for i in range(len(flatten_outputs(out)))]


def _cfg_dict(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if not isinstance(cfg, dict):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    return dict(cfg)


def _normalize_input_size(input_size: Any, cfg_size: Sequence[int] | None) -> tuple[int, int, int]:
    """int -> (C, s, s); (H, W) -> (C, H, W); (C, H, W) as is; C from the model's config."""
    chans = int(cfg_size[0]) if cfg_size else 3
    if input_size is None:
        if not cfg_size:
            raise InputSizeError("this model has no pretrained_cfg['input_size']: pass "
                                 "input_size=(C, H, W), e.g. input_size=(3, 224, 224)")
        size = tuple(cfg_size)
    elif isinstance(input_size, (int, np.integer)):
        size = (chans, int(input_size), int(input_size))
    else:
        try:
            size = () if isinstance(input_size, str) else tuple(input_size)
        except TypeError:  # not a shape at all (e.g. a float): the error below says what to give
            size = ()
        if len(size) == 2:
            size = (chans, *size)
    if len(size) != 3 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in size):
        raise InputSizeError(f"input size {input_size!r} is not valid: give an int (square side), "
                             "(H, W), (C, H, W) or (B, C, H, W) of positive integers, e.g. 224, "
                             "(3, 224, 224) or (1, 3, 224, 224)")
    return tuple(int(v) for v in size)  # type: ignore[return-value]


def split_batch(input_size: Any, batch_size: int = 1) -> tuple[Any, int]:
    """``(B, C, H, W)`` -> ``((C, H, W), B)``; any other input size comes back unchanged.

    Why: users naturally write the shape of the tensor they feed (``x.shape``); the batch is
    ``batch_size`` everywhere else, so the two must not disagree (``batch_size`` left at 1 takes B).
    """
    if input_size is None or isinstance(input_size, (int, np.integer, str)):
        return input_size, batch_size
    try:
        size = tuple(input_size)
    except TypeError:  # not a shape: _normalize_input_size says what to give
        return input_size, batch_size
    if len(size) != 4:
        return input_size, batch_size
    b = size[0]
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
        raise InputSizeError(f"input size {input_size!r}: the batch B of (B, C, H, W) must be a "
                             "positive int, e.g. (1, 3, 224, 224)")
    if batch_size not in (1, int(b)):
        raise InputSizeError(f"input size {input_size!r} has batch {int(b)} but batch_size is "
                             f"{batch_size}: give the batch once (input_size=(C, H, W) with "
                             "batch_size, or (B, C, H, W) alone)")
    return size[1:], int(b)


def _first_conv_in_chans(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _check_example_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple of tensors sharing one batch size, or a one-line error."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    try:
        inputs = tuple(example_inputs)
    except TypeError:
        inputs = ()
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise InputSizeError("example_inputs must be a tuple of tensors, one per forward argument, "
                             "e.g. (torch.randn(1, 1, 16, 16), torch.tensor([500]))")
    if any(x.dim() == 0 for x in inputs):
        raise InputSizeError("example_inputs must have a batch dimension (a timestep is shape [B], "
                             "not a scalar): exported files have static shapes")
    batches = {int(x.shape[0]) for x in inputs}
    if len(batches) != 1:
        raise InputSizeError(f"example_inputs disagree on the batch size (first dims "
                             f"{[int(x.shape[0]) for x in inputs]}); give every input the same batch")
    return tuple(x.detach().contiguous() for x in inputs)


def _forward_arg_names(model: nn.Module, n: int) -> list[str] | None:
    """The first ``n`` parameter names of ``model.forward`` (``sample``, ``timestep``): the names
    a file's inputs get when they are not one image."""
    import inspect

    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params[:n]]
    ok = len(names) == n and len(set(names)) == n and all(re.fullmatch(r"[A-Za-z_]\w*", v) for v in names)
    return names if ok else None


def resolve_spec(model: nn.Module, input_size: Any = None, name: str | None = None,
                 batch_size: int = 1, example_inputs: Sequence[torch.Tensor] | None = None) -> ModelSpec:
    """Resolve shapes, preprocessing and labels, and check the input size by running the model.

    ``input_size``: int, (H, W), (C, H, W) or (B, C, H, W) (B then sets ``batch_size``).
    ``example_inputs``: the tensors of one forward call, for models with several inputs (a
    diffusion UNet's sample and timestep); they fix the shapes (batch = their first dim) and take
    precedence over the model's ``example_inputs`` hook.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a registered model name, got {type(model).__name__}")
    if hasattr(model, "export_functions"):
        if example_inputs is not None:
            raise ExportError("example_inputs cannot be given for a model with several functions "
                              "(export_functions): each function resolves its own inputs")
        return _resolve_functions(model, input_size, name, batch_size)
    explicit = example_inputs is not None
    if explicit:
        given = _check_example_inputs(example_inputs)
        if batch_size not in (1, int(given[0].shape[0])):
            raise InputSizeError(f"batch_size={batch_size} but example_inputs have batch "
                                 f"{int(given[0].shape[0])}: the example inputs fix the batch")
        batch_size = int(given[0].shape[0])
        if input_size is None and given[0].dim() == 4:
            input_size = tuple(given[0].shape[1:])
    input_size, batch_size = split_batch(input_size, batch_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputSizeError(f"batch_size must be a positive int, got {batch_size!r}")
    model.eval()
    cfg = _cfg_dict(model)
    if explicit and input_size is None and not cfg.get("input_size"):
        # (C, H, W) describes an image input; inputs that are not images get a placeholder
        input_size = tuple(given[0].shape[1:]) if given[0].dim() == 4 else (1, 8, 8)
    size = _normalize_input_size(input_size, cfg.get("input_size"))
    has_custom_inputs = hasattr(model, "example_inputs") or explicit
    if not explicit and (size[1] < 8 or size[2] < 8):
        raise InputSizeError(f"input size {size} is too small to export (minimum 8x8)")

    if explicit:
        inputs = given
    elif has_custom_inputs:
        inputs = tuple(model.example_inputs(batch_size=batch_size, input_size=size))
    else:
        inputs = (torch.rand(batch_size, *size),)
    inputs = tuple(x.contiguous() for x in inputs)  # torch.export needs contiguous examples
    module = ForwardExport(model) if hasattr(model, "forward_export") else model
    try:
        with torch.no_grad(), export_mode(model):
            out = module(*inputs)
    except Exception as e:  # noqa: BLE001 - any failure here means the size does not fit
        first_conv = _first_conv_in_chans(model)
        if not has_custom_inputs and first_conv is not None and first_conv != size[0]:
            raise InputSizeError(
                f"input size {size} has {size[0]} channels but the model's first conv takes "
                f"{first_conv}; use input_size=({first_conv}, {size[1]}, {size[2]})") from e
        default = cfg.get("input_size")
        hint = (f"; this model's default input size is {tuple(default)}" if default else "")
        raise InputSizeError(
            f"the model cannot run at input size {size} ({type(e).__name__}: {str(e)[:200]}){hint}. "
            "Models with fixed-size parts (position embeddings, precomputed DFT matrices) export "
            "only at the size they were built for: rebuild the model for the new size or pass "
            "its default input_size.") from e
    outs = flatten_outputs(out)

    task = "diffusion" if is_diffusion(model) else None
    image_input = (inputs[0].dim() == 4 and tuple(inputs[0].shape[1:]) == size
                   and inputs[0].is_floating_point() and task is None)
    mean = tuple(float(v) for v in cfg.get("mean") or ())
    std = tuple(float(v) for v in cfg.get("std") or ())
    if image_input:
        mean = _per_channel(mean or (0.0,), size[0])
        std = _per_channel(std or (1.0,), size[0])
    num_classes = getattr(model, "num_classes", None) or cfg.get("num_classes")
    classifier = (len(outs) == 1 and outs[0].dim() == 2 and outs[0].shape[1] > 1
                  and (not isinstance(num_classes, int) or outs[0].shape[1] == num_classes))
    if classifier:
        num_classes = int(outs[0].shape[1])
    detector = (getattr(model, "export_task", None) == "detection" and len(outs) == 2
                and outs[0].dim() == 3 and outs[1].dim() == 3 and outs[1].shape[-1] == 4)
    if detector:
        num_classes = int(outs[0].shape[-1])
    labels = getattr(model, "labels", None) or cfg.get("label_names")
    if labels is not None and (not (classifier or detector) or len(labels) != num_classes):
        labels = None
    return ModelSpec(
        name=name or getattr(model, "vizoo_name", None) or cfg.get("architecture")
        or type(model).__name__,
        model=model, module=module, example_inputs=inputs,
        input_names=_input_names(model, inputs, named=explicit or task is not None),
        output_names=_output_names(out, classifier, detector),
        output_shapes=[tuple(o.shape) for o in outs],
        input_size=size, batch_size=batch_size, image_input=image_input, mean=mean, std=std,
        classifier=classifier, num_classes=num_classes if classifier or detector else None,
        labels=[str(v) for v in labels] if labels is not None else None,
        license=str(cfg.get("license") or "unknown"),
        cfg={k: cfg[k] for k in ("architecture", "tag", "input_size", "mean", "std", "interpolation",
                                 "crop_pct", "num_classes", "paper", "paper_url") if k in cfg},
        export_aware=[n or "<root>" for n, m in model.named_modules() if isinstance(m, ExportAware)],
        detector=detector, task=task, explicit_inputs=explicit,
    )


def _input_names(model: nn.Module, inputs: Sequence[torch.Tensor], named: bool) -> list[str]:
    """``input`` / ``input_<i>``; the forward's argument names (``sample``, ``timestep``) for models
    given explicit inputs or whose inputs are not an image, so an app can tell them apart."""
    names = _forward_arg_names(model, len(inputs)) if named else None
    if names:
        return names
    return ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]


def _resolve_functions(model: nn.Module, input_size: Any, name: str | None, batch_size: int) -> ModelSpec:
    """A model with ``export_functions()`` (name -> module; e.g. one per task of a continual model)
    becomes one file with a function/signature per entry: each entry is resolved as a model of its
    own, and they must agree on their inputs."""
    modules = model.export_functions()
    if not modules:
        raise ExportError(f"{type(model).__name__}.export_functions() returned nothing to export")
    base = name or getattr(model, "vizoo_name", None) or _cfg_dict(model).get("architecture") or type(model).__name__
    subs = {fname: resolve_spec(m, input_size, name=f"{base}:{fname}", batch_size=batch_size)
            for fname, m in modules.items()}
    first = next(iter(subs.values()))
    for fname, sub in subs.items():
        if sub.input_shapes != first.input_shapes or (sub.mean, sub.std) != (first.mean, first.std):
            raise ExportError(f"function {fname!r} takes {sub.input_shapes} (mean {sub.mean}, std {sub.std}) but "
                              f"the first takes {first.input_shapes} (mean {first.mean}): one file needs one input")
    return dataclasses.replace(first, name=base, functions=subs, cache={})


def _per_channel(values: tuple[float, ...], chans: int) -> tuple[float, ...]:
    if len(values) == chans:
        return values
    if len(values) == 1:
        return values * chans
    if chans == 1:  # a grayscale model with an RGB config: use the first channel's statistics
        return values[:1]
    raise InputSizeError(f"mean/std have {len(values)} values but the input has {chans} channels")

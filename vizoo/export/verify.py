"""Parity: does the exported file compute what the PyTorch model computes, on real images?

The file is run by its own runtime (ai-edge-litert for TFLite; the MIL executor or Core ML for
CoreML) on bundled photographs, and compared with the PyTorch model run in export form (what was
converted) and in its normal eager form. Bounds depend on the precision. When a file is off, the
verifier tries the usual suspects (normalisation, layout, channel order, fp16 rounding, the
export form of a layer) and names the one that explains the numbers.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.bundled import normalize, photo_images
from ..layers.export_mode import export_mode
from .inputs import draw_inputs
from .spec import ModelSpec, flatten_outputs

class Unverifiable(Exception):
    """The file could not be run here (an op the reference executor lacks, no runtime
    installed); the report says "unverified" with this reason, never a silent pass."""


@dataclass(frozen=True)
class Bounds:
    """Parity a file of a given precision must reach on the parity images."""

    rel_max_abs: float | None  # max |file - torch| / (max - min of torch outputs)
    cosine_min: float          # worst per-image cosine similarity
    top1_min: float | None     # fraction of images with the same arg-max class (classifiers)

    def failures(self, p: "Parity") -> list[str]:
        out = []
        if self.rel_max_abs is not None and not p.rel_max_abs_diff <= self.rel_max_abs:
            out.append(f"max abs diff {p.max_abs_diff:.3g} is {p.rel_max_abs_diff:.3g} of the output "
                       f"range (bound {self.rel_max_abs:g})")
        if not p.cosine_min >= self.cosine_min:
            out.append(f"worst cosine similarity {p.cosine_min:.6f} (bound {self.cosine_min:g})")
        if self.top1_min is not None and p.top1_agreement is not None and not p.top1_agreement >= self.top1_min:
            out.append(f"top-1 agreement {p.top1_agreement:.1%} (bound {self.top1_min:.0%})")
        if (self.top1_min is not None and p.topk_detections_agreement is not None
                and not p.topk_detections_agreement >= self.top1_min):
            out.append(f"top-{p.topk} detections agreement {p.topk_detections_agreement:.1%} "
                       f"(bound {self.top1_min:.0%})")
        return out


#: Bounds per precision. fp32: the issue's bound. fp16: weights (TFLite) or weights and
#: activations (CoreML) rounded to half precision. int8: full-integer files are compared by
#: cosine and top-1, never allclose; CoreML weight compression (8- or 4-bit) is judged by these
#: too (measured in benchmarks/export_matrix.py; see README).
BOUNDS: dict[str, Bounds] = {
    "fp32": Bounds(rel_max_abs=1e-4, cosine_min=0.99999, top1_min=1.0),
    "fp16": Bounds(rel_max_abs=1e-2, cosine_min=0.999, top1_min=0.95),
    "int8": Bounds(rel_max_abs=None, cosine_min=0.95, top1_min=0.75),
}

#: Low-bit files of a QuantUNet computed in float32 (CoreML W4A8/W8A8 with quantize/dequantize
#: ops, fake-quant W4A4 graphs), judged against the fake-quant model: the fp32 bounds, widened to
#: QUANT_NOISE_FACTOR times what float32 rounding alone does to that model (its own float32 run
#: against a float64 run on the same samples, :func:`quant_noise_floor`). Why: an activation
#: on a rounding boundary goes to either neighbour under a 1e-7 change, and a 4-bit step is 1/15
#: of a channel's range, so no float32 file can be closer to the model than the model is to itself
#: in float64 (measured on a small random-weight UNet: W4A8 worst sample 1.8e-2 of the output
#: range, median 1e-7; W4A4 worst 0.22, median 0.07; the trained ddpm_digits16 at W4A8: worst
#: 2e-3, and its CoreML file 2.4e-3). At 4-bit activations one flip cascades: traced through a
#: small W4A4 UNet, a single activation exactly on a .5 boundary became 11, 38, 109, then thousands
#: of flipped codes in later layers (one sample off by 12 % of the range, the next equal to 1e-7).
#: The median sample's difference is reported, not bounded: on
#: the trained UNet every sample crosses some boundary (the file's median 1.6e-3, the float64
#: run's 2e-4 to 9e-4 depending on the calibration), so it says how widespread the noise is,
#: not whether the file is right.
QUANT_PRECISIONS = ("quant", "fakequant")
QUANT_NOISE_FACTOR = 4.0


@dataclass
class Parity:
    n_samples: int
    max_abs_diff: float
    output_range: float
    rel_max_abs_diff: float
    mean_abs_diff: float
    cosine_min: float
    cosine_mean: float
    top1_agreement: float | None = None
    #: median over samples of the per-sample max abs diff / output range
    rel_max_abs_median: float | None = None
    accuracy: float | None = None            # the file's top-1 on labelled inputs, when given
    reference_accuracy: float | None = None  # PyTorch's on the same inputs
    per_output: list[dict[str, Any]] = field(default_factory=list)
    #: detectors: share of PyTorch's top-k (query, class) detections that the file also ranks in
    #: its top k with a box IoU >= 0.9 (what an app draws), over every image
    topk_detections_agreement: float | None = None
    topk: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite numbers become the strings "inf"/"nan" (strict JSON has none)."""
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, list):
                return [{k: clean(x) for k, x in d.items()} for d in v]
            return v

        return {k: clean(v) for k, v in dataclasses.asdict(self).items() if v != [] and v is not None}


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, cos)


def topk_detections_agreement(ref_scores: np.ndarray, ref_boxes: np.ndarray, got_scores: np.ndarray,
                               got_boxes: np.ndarray, k: int = 10, iou_min: float = 0.9) -> float:
    """Share of the reference's top-k detections (query, class) that the file also ranks in its top
    k, with the two boxes of that query overlapping by IoU >= ``iou_min``; images are rows."""
    from torchvision.ops import box_iou

    ref_scores = ref_scores.reshape(len(ref_scores), -1)
    got_scores = got_scores.reshape(len(ref_scores), -1)
    n_cls = ref_scores.shape[1] // ref_boxes.reshape(len(ref_boxes), -1, 4).shape[1]
    k = min(k, ref_scores.shape[1])
    hits = 0
    for i in range(len(ref_scores)):
        ref_top = np.argsort(-ref_scores[i], kind="stable")[:k]
        got_top = set(np.argsort(-got_scores[i], kind="stable")[:k].tolist())
        rb = torch.as_tensor(ref_boxes.reshape(len(ref_scores), -1, 4)[i], dtype=torch.float64)
        gb = torch.as_tensor(got_boxes.reshape(len(ref_scores), -1, 4)[i], dtype=torch.float64)
        for idx in ref_top.tolist():
            q = idx // n_cls
            if idx in got_top and float(box_iou(rb[q:q + 1], gb[q:q + 1])) >= iou_min:
                hits += 1
    return hits / (k * len(ref_scores))


def parity(reference: Sequence[np.ndarray], exported: Sequence[np.ndarray], classifier: bool,
           detector: bool = False) -> Parity:
    """Compare stacked outputs (one array per output, first axis = image)."""
    if len(reference) != len(exported):
        raise ValueError(f"the file has {len(exported)} outputs, the model {len(reference)}")
    per = []
    for ref, got in zip(reference, exported):
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(got, dtype=np.float64).reshape(ref.shape)
        diff = np.abs(ref - got)
        rng = float(ref.max() - ref.min()) if ref.size else 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        cos = _cosine_rows(ref, got)
        rows = diff.reshape(len(diff), -1).max(1) if diff.size else np.zeros(1)
        item = {"max_abs_diff": max_abs, "output_range": rng,
                "rel_max_abs_median": float(np.median(rows)) / rng if rng > 0 else float(np.median(rows)),
                "rel_max_abs_diff": max_abs / rng if rng > 0 else (0.0 if max_abs == 0 else np.inf),
                "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
                "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
        if not np.isfinite(got).all():
            item.update(max_abs_diff=np.inf, rel_max_abs_diff=np.inf, rel_max_abs_median=np.inf,
                        cosine_min=-1.0, cosine_mean=-1.0)
        per.append(item)
    worst = {
        "max_abs_diff": max(p["max_abs_diff"] for p in per),
        "output_range": min(p["output_range"] for p in per),
        "rel_max_abs_diff": max(p["rel_max_abs_diff"] for p in per),
        "rel_max_abs_median": max(p["rel_max_abs_median"] for p in per),
        "mean_abs_diff": max(p["mean_abs_diff"] for p in per),
        "cosine_min": min(p["cosine_min"] for p in per),
        "cosine_mean": min(p["cosine_mean"] for p in per),
    }
    top1 = None
    if classifier:
        ref, got = np.asarray(reference[0]), np.asarray(exported[0]).reshape(np.shape(reference[0]))
        top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    det, k = None, None
    if detector:
        k = min(10, int(np.prod(np.shape(reference[0])[1:])))
        det = topk_detections_agreement(np.asarray(reference[0]), np.asarray(reference[1]),
                                        np.asarray(exported[0]), np.asarray(exported[1]), k=k)
    return Parity(n_samples=len(reference[0]), top1_agreement=top1,
                  per_output=per if len(per) > 1 else [], topk_detections_agreement=det, topk=k, **worst)


# --- real inputs ------------------------------------------------------------------------------
@dataclass
class ParityInputs:
    """Normalised tensor samples, and the same images in [0, 1] for image-input functions."""

    samples: list[tuple[torch.Tensor, ...]]
    images01: list[torch.Tensor] | None
    source: str
    labels: torch.Tensor | None = None  # one class per image: accuracy next to parity


def labelled_inputs(spec: ModelSpec, images01: torch.Tensor, labels: torch.Tensor | None = None,
                    source: str = "images you gave") -> ParityInputs:
    """Parity inputs from your own images (N, C, H, W) in [0, 1] at the model's input size, and
    optionally their labels, so the report shows each file's accuracy beside PyTorch's."""
    c, h, w = spec.input_size
    b = spec.batch_size
    if images01.ndim != 4 or tuple(images01.shape[1:]) != (c, h, w):
        raise ValueError(f"verification images must be (N, {c}, {h}, {w}) in [0, 1] to match the "
                         f"exported input; got {tuple(images01.shape)}")
    if labels is not None and len(labels) != len(images01):
        raise ValueError(f"{len(labels)} labels for {len(images01)} verification images")
    n = len(images01) // b
    if n == 0:
        raise ValueError(f"need at least {b} verification images (the exported batch)")
    x01 = torch.round(images01[:n * b].float().clamp(0, 1) * 255) / 255
    extra = spec.example_inputs[1:]
    images = [x01[i * b:(i + 1) * b].contiguous() for i in range(n)]
    samples = [(normalize(img, spec.mean, spec.std).contiguous(), *extra) for img in images]
    return ParityInputs(samples, images if len(spec.example_inputs) == 1 else None,
                        f"{n * b} {source}" + (" (labelled)" if labels is not None else ""),
                        labels[:n * b].long() if labels is not None else None)


def parity_inputs(spec: ModelSpec, n: int = 64, seed: int = 0) -> ParityInputs:
    """``n`` real bundled photographs at the model's input size (whole photos, then crops).

    Pixels are rounded to 8 bits first, so a camera-image function (uint8 pixels) and a tensor
    function see the very same picture.
    """
    n = max(1, int(n))
    if not spec.image_input:
        return _custom_inputs(spec, n, seed)
    b = spec.batch_size
    c, h, w = spec.input_size
    x01 = photo_images(n * b, (h, w), c, seed=seed)
    x01 = torch.round(x01 * 255) / 255
    extra = spec.example_inputs[1:]
    samples, images = [], []
    for i in range(n):
        img = x01[i * b:(i + 1) * b].contiguous()
        images.append(img)
        samples.append((normalize(img, spec.mean, spec.std).contiguous(), *extra))
    return ParityInputs(samples, images if len(spec.example_inputs) == 1 else None,
                        f"{n * b} bundled photographs (scikit-image), seed {seed}")


def tuple_inputs(spec: ModelSpec, data: Any, n: int = 64) -> ParityInputs:
    """Your own inputs for a model without one image input: a list of input tuples shaped like
    the exported ones, or a diffusion calibration set (``x``, ``t``: the sampler's trajectory)."""
    from .quantize import calibration_set_samples

    if hasattr(data, "x") and hasattr(data, "t"):
        return ParityInputs(calibration_set_samples(data, spec.batch_size, n, like=spec.example_inputs),
                            None, f"up to {n} inputs of the calibration set you gave")
    samples = [tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in data]
    want = spec.input_shapes
    for s in samples:
        if [tuple(x.shape) for x in s] != want:
            raise ValueError(f"verification inputs must be tuples shaped {want} (the exported inputs); "
                             f"got {[tuple(x.shape) for x in s]}")
    if not samples:
        raise ValueError("verify_data is empty")
    return ParityInputs([tuple(x.contiguous() for x in s) for s in samples], None,
                        f"{len(samples)} input tuples you gave")


def _custom_inputs(spec: ModelSpec, n: int, seed: int) -> ParityInputs:
    """Models without one image input: inputs drawn from what each input means (noisy samples
    over the whole schedule for a diffusion model, see :mod:`vizoo.export.inputs`)."""
    n = min(n, 16)
    samples, source = draw_inputs(spec.model, spec.example_inputs, n, seed, spec.batch_size,
                                  spec.input_size, hook=not spec.explicit_inputs)
    return ParityInputs(samples, None, source)


# --- running and judging a file ----------------------------------------------------------------
@dataclass
class RunFunction:
    """One callable entry point of an exported file (a TFLite signature, a CoreML function)."""

    name: str
    kind: str                                   # "tensor" (normalised input) or "image" ([0, 1])
    run: Callable[[tuple[torch.Tensor, ...]], list[np.ndarray]]


def run_all(fn: RunFunction, inputs: Sequence[tuple[torch.Tensor, ...]], desc: str = "") -> list[np.ndarray]:
    outs: list[list[np.ndarray]] = []
    for sample in tqdm(inputs, desc=desc or f"verify {fn.name}", leave=False, disable=len(inputs) < 8):
        got = fn.run(sample)
        if not outs:
            outs = [[] for _ in got]
        for k, y in enumerate(got):
            outs[k].append(np.asarray(y, dtype=np.float32))
    return [np.concatenate([o.reshape(1, *o.shape) if o.ndim == 0 else o for o in out]) for out in outs]


def _fn_inputs(fn: RunFunction, pin: ParityInputs) -> list[tuple[torch.Tensor, ...]]:
    if fn.kind == "image":
        if pin.images01 is None:
            raise Unverifiable("image function but no image inputs")
        return [(x,) for x in pin.images01]
    return pin.samples


def verify_functions(functions: Sequence[RunFunction], spec: ModelSpec, precision: str,
                     pin: ParityInputs, ref: list[np.ndarray], ref_eager: list[np.ndarray] | None,
                     image_samples: int = 16) -> dict[str, Any]:
    """Parity of every function of a file; status ok / failed (with the likely cause)."""
    floor = None
    if precision in QUANT_PRECISIONS:
        floor = quant_noise_floor(spec, pin.samples)
        bounds = quant_bounds(floor)
    else:
        bounds = BOUNDS[precision]
    result: dict[str, Any] = {"status": "ok", "reason": "", "bounds": dataclasses.asdict(bounds),
                              "inputs": pin.source, "functions": {}}
    if floor is not None:
        result["float32_noise_floor"] = floor
    problems = []
    for fn in functions:
        # a file with several functions (tasks): each is judged against its own PyTorch module
        # (a lone function may be renamed by its format: CoreML calls a one-function package's "main")
        key = fn.name if fn.name in spec.functions or len(spec.functions) != 1 else next(iter(spec.functions))
        fspec = spec.functions.get(key, spec)
        fref = ref.get(key) if isinstance(ref, dict) else ref
        fref_eager = ref_eager.get(key) if isinstance(ref_eager, dict) else ref_eager
        if fref is None:
            raise Unverifiable(f"the file has a function {fn.name!r} that the model does not export "
                               f"(it exports {', '.join(spec.functions) or 'one function'})")
        inputs = _fn_inputs(fn, pin)
        # A camera-image function beside a tensor function is spot-checked; alone, it gets them all.
        alone = len(functions) == 1
        n = len(inputs) if fn.kind == "tensor" or alone else min(len(inputs), image_samples)
        got = run_all(fn, inputs[:n])
        rows = n * spec.batch_size  # reference rows are images; a sample holds batch_size of them
        p = parity([r[:rows] for r in fref], got, fspec.classifier, fspec.detector)
        if pin.labels is not None and fspec.classifier:
            truth = pin.labels[:rows].numpy()
            p.accuracy = float((got[0].reshape(rows, -1).argmax(-1) == truth).mean())
            p.reference_accuracy = float((np.asarray(fref[0][:rows]).argmax(-1) == truth).mean())
        entry: dict[str, Any] = {"input": fn.kind, "parity": p.to_dict()}
        fails = bounds.failures(p)
        if fref_eager is not None:
            pe = parity([r[:rows] for r in fref_eager], got, fspec.classifier, fspec.detector)
            entry["parity_eager"] = pe.to_dict()
            eager_fails = bounds.failures(pe)
            if eager_fails and not fails:
                fails = [f"against the eager (non-export-mode) model: {f}" for f in eager_fails]
        if fails:
            cause = likely_cause(fn, fspec, precision, pin, fref, fref_eager, got)
            entry["cause"] = cause
            problems.append(f"{fn.name}: " + "; ".join(fails) + f". Likely cause: {cause}")
        result["functions"][fn.name] = entry
    if problems:
        result.update(status="failed", reason="parity out of bounds: " + " | ".join(problems))
    return result


def quant_noise_floor(spec: ModelSpec, samples: Sequence[tuple[torch.Tensor, ...]]) -> dict[str, float]:
    """How far the reference model's own float32 run is from its float64 run on ``samples``: worst
    and median per-sample max abs diff (relative to the output range) and worst cosine. For a
    quantized model this is the rounding-boundary noise every float32 implementation carries."""
    key = ("quant_noise_floor", len(samples))
    if key not in spec.cache:
        p = float64_parity(spec, samples)
        if p is None:
            raise Unverifiable("the fake-quant reference could not run in float64 to size its float32 noise")
        spec.cache[key] = {"rel_max_abs_diff": p.rel_max_abs_diff, "rel_max_abs_median": p.rel_max_abs_median,
                           "cosine_min": p.cosine_min}
    return spec.cache[key]


def quant_bounds(floor: dict[str, float], factor: float = QUANT_NOISE_FACTOR) -> Bounds:
    """The fp32 bounds widened to ``factor`` times the model's float32 noise (see :data:`QUANT_PRECISIONS`)."""
    fp32 = BOUNDS["fp32"]
    return Bounds(rel_max_abs=max(fp32.rel_max_abs, factor * floor["rel_max_abs_diff"]),
                  cosine_min=min(fp32.cosine_min, 1.0 - factor * (1.0 - floor["cosine_min"])),
                  top1_min=None)


def float64_parity(spec: ModelSpec, samples: Sequence[tuple[torch.Tensor, ...]]) -> Parity | None:
    """PyTorch's float32 reference against a float64 run of the same model (None if it cannot
    run in float64)."""
    try:
        module64 = copy.deepcopy(spec.reference_module if spec.reference_module is not None
                                 else spec.module).double()
        ref32 = spec.reference(samples)
        outs: list[list[np.ndarray]] = [[] for _ in ref32]
        with torch.no_grad(), export_mode(module64):
            for s in samples:
                args = tuple(x.double() if x.is_floating_point() else x for x in s)
                for k, y in enumerate(flatten_outputs(module64(*args))):
                    outs[k].append(y.double().numpy())
        ref64 = [np.concatenate(o) for o in outs]
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 gives no evidence
        return None
    return parity(ref64, ref32, classifier=False)


def float64_deviation(spec: ModelSpec, samples: Sequence[tuple[torch.Tensor, ...]]) -> float | None:
    """How far PyTorch's float32 output is from a float64 run of the same model, relative to the
    output range: the precision float32 arithmetic itself leaves for this model."""
    p = float64_parity(spec, samples)
    return None if p is None else p.rel_max_abs_diff


def likely_cause(fn: RunFunction, spec: ModelSpec, precision: str, pin: ParityInputs,
                 ref: list[np.ndarray], ref_eager: list[np.ndarray] | None,
                 got: list[np.ndarray], k: int = 4) -> str:
    """Name the most likely reason a file is off, by testing the usual suspects."""
    n = min(k, len(got[0]) // spec.batch_size)
    rows = n * spec.batch_size
    base = parity([r[:rows] for r in ref], [g[:rows] for g in got], spec.classifier, spec.detector)
    if ref_eager is not None:
        pe = parity([r[:rows] for r in ref_eager], [r[:rows] for r in ref], spec.classifier)
        if pe.rel_max_abs_diff > BOUNDS["fp32"].rel_max_abs * 10:
            return (f"the export form of the ExportAware layers ({', '.join(spec.export_aware) or '?'}) "
                    f"differs from their eager form (rel. diff {pe.rel_max_abs_diff:.2g}); fix the "
                    "layer's `exporting` branch")
    intrinsic = float64_deviation(spec, pin.samples[:n])
    if (intrinsic is not None and intrinsic > BOUNDS["fp32"].rel_max_abs / 2
            and base.rel_max_abs_diff < 20 * intrinsic):
        rng = float(max(r[:rows].max() - r[:rows].min() for r in ref))
        return (f"the model is numerically ill-conditioned at these weights: PyTorch's own float32 "
                f"output differs from a float64 run by {intrinsic:.2g} of the output range (range "
                f"{rng:.3g}; the file: {base.rel_max_abs_diff:.2g}), so no float32 file can match it "
                f"to {BOUNDS['fp32'].rel_max_abs:g}. Typical of untrained weights whose activations "
                "grow with depth; export trained weights")
    if spec.image_input and fn.kind == "tensor":
        c, h, w = spec.input_size
        suspects: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        if h == w:
            suspects["layout: the file reads height and width swapped (NHWC/NCHW mix-up)"] = \
                lambda x: x.transpose(-1, -2).contiguous()
        if c == 3:
            suspects["channel order: the file expects BGR where the model takes RGB"] = \
                lambda x: x.flip(1).contiguous()
        mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
        std = torch.tensor(spec.std).view(1, -1, 1, 1)
        suspects["normalisation: the file applies mean/std itself and expects [0, 1] pixels"] = \
            lambda x: x * std + mean
        suspects["normalisation: the file expects 0-255 pixels"] = lambda x: (x * std + mean) * 255
        for label, transform in suspects.items():  # the cause is the change that makes it pass
            try:
                alt = run_all(fn, [(transform(s[0]), *s[1:]) for s in pin.samples[:n]])
            except Exception:  # noqa: BLE001 - a suspect that does not even run is not the cause
                continue
            p = parity([r[:rows] for r in ref], alt, spec.classifier, spec.detector)
            bounds = BOUNDS.get(precision, BOUNDS["fp32"])
            if not bounds.failures(p) and p.rel_max_abs_diff < 0.1 * base.rel_max_abs_diff:
                return label
    cos = base.cosine_min
    if precision in QUANT_PRECISIONS:
        return ("the file's integer weights, scales or zero points differ from the fake-quant model's, or an "
                "activation grid is missing (beyond what float32 rounding at grid boundaries explains); compare "
                "the file's constexpr weights with the model's dequantized weights layer by layer")
    if precision == "fp32" and cos >= 0.99:
        return ("a uniform small error of half-precision size: some layer computes or stores "
                "weights in fp16; export with fp32 compute")
    if precision == "fp16" and cos >= 0.9:
        return ("fp16 rounding (values beyond fp16 range or accumulated error): export this "
                "model at fp32, or keep its sensitive layers in fp32")
    if precision == "int8" and cos >= 0.5:
        return ("int8 quantization error: calibrate on more representative images (your own "
                "data), use dynamic-range int8, or fp16")
    return ("the file's weights or an op's semantics differ from PyTorch (a corrupted file, or an op "
            "converted with other semantics); compare intermediate outputs layer by layer")

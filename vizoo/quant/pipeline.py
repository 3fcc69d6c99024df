"""From a float UNet to a quantized one: naive PTQ, the Q-Diffusion-style baseline, + TLA, QuEST.

The four methods of the benchmark build on each other (specs §3.4-3.5), so one progressive run
per (bits, seed) yields all of them:

==============  ===========================================================================
``naive``       round-to-nearest weights on their min-max range; min-max activation ranges,
                one set for all timesteps
``qdiff``       per-channel weight ranges + AdaRound (block reconstruction); one activation
                set per calibrated timestep (the paper's "Baseline")
``qdiff+te``    ``qdiff`` + stage 1 (TLA: time-embedding projections and their act Δ)
``quest``       ``qdiff+te`` + stage 2 (CMA: attention projections + all other act Δ)
==============  ===========================================================================

Weight ranges before AdaRound: min-max by default; ``weight_init="mse"`` is the official code's
per-channel L_2.4 search. Why not the search: on the bundled 16x16 UNet it clips weights whose
error reaches the output amplified (``conv_out``, a single output channel, so one range for all
its 288 weights; the last ResNet block's ``conv2``, before the output GroupNorm), and AdaRound
only chooses up or down, it cannot undo a clip. Measured on one seed, weights only at 4 bits,
ε-MSE x1e-3 vs FP: min-max nearest 2.59, L_2.4 nearest 3.66, L_2.4 + AdaRound 3.29, min-max +
AdaRound 0.92 (block losses after AdaRound are lower from the L_2.4 ranges, 3.69 vs 4.60: the
block-output MSE does not see the GroupNorm and output scaling that follow).

Every snapshot is saved as ``<out>/<method>.safetensors`` (the quantizer state included) and
reused on the next call, and the finetuning stages are engine runs that resume mid-way, so an
interrupted run continues where it stopped.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from .finetune import StageOptions, finetuned_weight_count, run_stage

METHODS = ("naive", "qdiff", "qdiff+te", "quest")
#: finetuning stages behind each method
METHOD_STAGES: dict[str, tuple[str, ...]] = {"naive": (), "qdiff": (), "qdiff+te": ("te",), "quest": ("te", "attn")}


@dataclass
class PipelineSettings:
    """The knobs of the PTQ + finetuning recipe (defaults: the bundled benchmark's scale)."""

    adaround_iters: int = 200          # per block (official: 20k; specs §3.10 scale: 500-2k per layer)
    adaround_batch: int = 16
    weight_init: str = "minmax"        # qdiff/QuEST weight ranges before AdaRound: "minmax" or "mse" (official)
    act_init: str = "minmax"           # qdiff/QuEST activation init: "minmax" or "percentile"
    act_samples: int = 64              # samples per calibrated step for the activation init
    single_act_set: bool = False       # the paper's variant: one activation set for all timesteps
    te_layers: str = "proj"            # C_TE: "proj" (code) or "mlp+proj"
    val_fraction: float = 0.25         # share of each step's calibration samples held out for the stages
    te: StageOptions = field(default_factory=lambda: StageOptions(stage="te", steps_per_t=32, batch_size=8))
    attn: StageOptions = field(default_factory=lambda: StageOptions(stage="attn", epochs=5, batch_size=32))

    def stage(self, name: str) -> StageOptions:
        return replace(self.te if name == "te" else self.attn, te_layers=self.te_layers)


@dataclass
class Snapshot:
    """One method's quantized model and what it took."""

    method: str
    model: nn.Module
    finetuned_params: int        # float weights changed by finetuning
    total_params: int            # parameters of the float model
    seconds: float

    @property
    def finetuned_fraction(self) -> float:
        return self.finetuned_params / max(self.total_params, 1)


def quant_config(method: str, w_bits: int, a_bits: int, settings: PipelineSettings) -> Any:
    """The `QuantConfig` of a method: naive is RTN + min-max with one set, the rest per-step."""
    from .config import QuantConfig

    if method == "naive":
        return QuantConfig(w_bits=w_bits, a_bits=a_bits, weight_init="minmax", act_init="minmax", per_step=False,
                           te_layers=settings.te_layers)
    return QuantConfig(w_bits=w_bits, a_bits=a_bits, weight_init=settings.weight_init, act_init=settings.act_init,
                       per_step=not settings.single_act_set, te_layers=settings.te_layers)


def split_calibration(calib: Any, val_fraction: float) -> tuple[Any, Any]:
    """(train, val): the last ``val_fraction`` of each step's samples held out (the stages' meter)."""
    n = calib.x.shape[1]
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    if n_val <= 0:
        return calib, calib
    return calib.subset(samples=slice(0, n - n_val)), calib.subset(samples=slice(n - n_val, n))


def _timesteps(calib: Any) -> list[int]:
    return [int(t) for t in calib.t]


def _new_quant(fp_model: nn.Module, method: str, w_bits: int, a_bits: int, calib: Any,
               settings: PipelineSettings) -> nn.Module:
    from .model import QuantUNet

    return QuantUNet(fp_model, quant_config(method, w_bits, a_bits, settings), _timesteps(calib))


def _set_mode(qmodel: nn.Module, method: str) -> nn.Module:
    qmodel.set_quant_state(weight=True, act=True)
    qmodel.set_weight_mode("nearest" if method == "naive" else "hard")
    qmodel.eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    return qmodel


def _naive(fp_model: nn.Module, w_bits: int, a_bits: int, calib: Any, settings: PipelineSettings) -> nn.Module:
    from .init import init_act_quantizers, init_weight_quantizers

    q = _new_quant(fp_model, "naive", w_bits, a_bits, calib, settings)
    init_weight_quantizers(q, "minmax")
    q.set_weight_mode("nearest")
    q.set_quant_state(weight=True, act=True)
    init_act_quantizers(q, calib, "minmax", max_samples=settings.act_samples)
    return q


def _qdiff(fp_model: nn.Module, w_bits: int, a_bits: int, calib: Any, settings: PipelineSettings,
           seed: int, progress: bool | str) -> nn.Module:
    from .adaround import reconstruct
    from .init import init_act_quantizers, init_weight_quantizers

    q = _new_quant(fp_model, "qdiff", w_bits, a_bits, calib, settings)
    init_weight_quantizers(q, settings.weight_init)
    q.set_quant_state(weight=True, act=False)  # BRECQ/Q-Diffusion: weights are reconstructed first
    reconstruct(q, fp_model, calib, iters=settings.adaround_iters, batch_size=settings.adaround_batch,
                progress=progress, seed=seed)
    q.set_weight_mode("hard")
    q.set_quant_state(weight=True, act=True)
    init_act_quantizers(q, calib, settings.act_init, max_samples=settings.act_samples)
    return q


def quantize_progressive(fp_model: nn.Module, w_bits: int, a_bits: int, calib: Any, seed: int = 0, *,
                         out: str | os.PathLike | None = None, methods: Sequence[str] = METHODS,
                         settings: PipelineSettings | None = None, val_calib: Any = None,
                         progress: bool | str = False) -> Iterator[Snapshot]:
    """Yield a `Snapshot` per method in ``methods`` (in `METHODS` order), building each on the last.

    ``out`` keeps the snapshots and stage runs (resumable); without it everything is in memory.
    ``val_calib``: held-out calibration-like inputs for the stages' meter (default: a split of
    ``calib``). The yielded model of ``qdiff+te`` is finetuned further in place once the caller
    asks for ``quest``: evaluate (or copy) a snapshot before advancing the iterator.
    """
    import time

    settings = settings or PipelineSettings()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    wanted = [m for m in METHODS if m in methods]
    if not wanted:
        raise ValueError(f"no method to run: choose from {', '.join(METHODS)}")
    train_calib = calib
    if val_calib is None:
        train_calib, val_calib = split_calibration(calib, settings.val_fraction)
    out = Path(out) if out is not None else None
    total = sum(p.numel() for p in fp_model.parameters())
    bar = _progress_bar(progress, len(wanted), f"W{w_bits}A{a_bits} seed {seed}")

    def snapshot_path(method: str) -> Path | None:
        return out / f"{method.replace('+', '_')}.safetensors" if out is not None else None

    def load(method: str) -> nn.Module | None:
        path = snapshot_path(method)
        if path is None or not path.is_file():
            return None
        q = _new_quant(fp_model, method, w_bits, a_bits, calib, settings)
        q.load_quant_state(path)
        return _set_mode(q, method)

    def save(method: str, q: nn.Module) -> None:
        path = snapshot_path(method)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            q.save_quant_state(path)

    chain = list(METHODS[1:METHODS.index(wanted[-1]) + 1]) if wanted[-1] != "naive" else []
    needed = set(wanted)  # a method to compute needs its predecessor, unless that is saved already
    for i in range(len(chain) - 1, 0, -1):
        if chain[i] in needed and not _exists(snapshot_path(chain[i])):
            needed.add(chain[i - 1])
    try:
        if "naive" in wanted:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            q = load("naive")
            if q is None:
                q = _set_mode(_naive(fp_model, w_bits, a_bits, train_calib, settings), "naive")
                save("naive", q)
            bar.update(1)
            yield Snapshot("naive", q, 0, total, time.perf_counter() - t0)
        current: nn.Module | None = None
        for method in (m for m in chain if m in needed):
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            q = load(method)
            if q is None:
                if method == "qdiff":
                    q = _qdiff(fp_model, w_bits, a_bits, train_calib, settings, seed, progress)
                else:  # finetune the previous snapshot in place (already yielded, so already used)
                    stage = METHOD_STAGES[method][-1]
                    q = _set_mode(current, method)
                    with _stage_dir(out, stage) as stage_out:
                        run_stage(q, fp_model, train_calib, val_calib, settings.stage(stage), out=stage_out,
                                  seed=seed, progress="off")
                q = _set_mode(q, method)
                save(method, q)
            current = q
            if method in wanted:
                bar.update(1)
                tuned = finetuned_weight_count(q, METHOD_STAGES[method], settings.te_layers)
                yield Snapshot(method, q, tuned, total, time.perf_counter() - t0)
    finally:
        bar.close()


def _exists(path: Path | None) -> bool:
    return path is not None and path.is_file()


@contextlib.contextmanager
def _stage_dir(out: Path | None, stage: str) -> Iterator[Path]:
    """``out/stage_<stage>`` (kept: it resumes), or a temporary folder when nothing is kept."""
    if out is not None:
        yield out / f"stage_{stage}"
        return
    with tempfile.TemporaryDirectory(prefix=f"quest_{stage}_") as tmp:
        yield Path(tmp)


def _progress_bar(progress: bool | str, total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="method", disable=not progress, leave=False)


def quantize_unet(fp_model: nn.Module, method: str, w_bits: int, a_bits: int, calib: Any, seed: int = 0, *,
                  out: str | os.PathLike | None = None, settings: PipelineSettings | None = None,
                  val_calib: Any = None, progress: bool | str = False) -> nn.Module:
    """A `QuantUNet` of ``fp_model`` quantized with ``method`` (one of `METHODS`) at W``w_bits``A``a_bits``.

    >>> calib = collect_calibration(fp, n_samples=64, seed=0)
    >>> q = quantize_unet(fp, "quest", 4, 8, calib, seed=0, out="runs/quest/w4a8_s0")
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    last = None
    for snap in quantize_progressive(fp_model, w_bits, a_bits, calib, seed, out=out, methods=[method],
                                     settings=settings, val_calib=val_calib, progress=progress):
        last = snap.model
    return last

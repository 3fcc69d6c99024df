"""The bundled QuEST benchmark (specs §3.10): four PTQ methods x three bit widths x seeds on a digit DDPM.

1. The FP model: `vizoo.diffusion.train.train_fp_model` (a DDPM UNet on the 16x16 digits, trained
   through the engine once and reused).
2. Shared evaluation data, fixed across seeds (so seeds vary only the quantization): held-out
   (x_t, t) from FP DDIM trajectories with their FP ε, and FP samples from fixed noise.
3. Per seed, a data-free calibration set (FP DDIM trajectories from noise) and a held-out
   calibration-like set for the finetuning stages' meter. Every sampler step but the last is
   calibrated (``keep_every=1``, ``skip_final_step``), as QuEST's 20-step DDIM setting (ImageNet:
   20 steps x 256 samples). Keeping every 2nd step instead makes the other steps run with the next
   higher timestep's activation set: measured on W4A4 (seed 0, an early FP checkpoint), their ε
   error was 1.5-3x that of the calibrated steps and per-step Q-Diffusion then sampled worse than
   one min-max set (PSNR 23.5 vs 24.7 dB; 28.4 vs 25.4 dB with every step calibrated), an artefact
   of the sampling schedule rather than of the methods. t = 0 is left out because its ε enters
   the image with weight √(1 − ᾱ_0) ≈ 0.01 while its FP target is ill-posed (ε-MSE ~100x the
   other steps'), so it would dominate the global loss and the metric; it runs with the t = 50 set.
4. Per (bits, seed), in parallel processes: one progressive run (`quantize_progressive`: naive,
   qdiff, qdiff+te, quest), each snapshot scored on ε-MSE vs FP, final-sample PSNR vs FP from
   the same noise (DDIM η = 0), Fréchet distance to the real digits in a digit classifier's
   feature space, and the fraction of parameters finetuned.
5. The table (mean ± std over seeds), ``quest.json``, ``quest.md`` and ``quest_samples.png``.

Everything lands in ``out`` and is resumable: finished units, snapshots, stage epochs and method
scores are reused on the next run.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Sequence

import torch

from .finetune import StageOptions
from .pipeline import METHODS, PipelineSettings, quantize_progressive

#: bit widths of the benchmark, "w<weight bits>a<activation bits>"
BITS = ("w8a8", "w4a8", "w4a4")
EVAL_SEED, SAMPLE_SEED = 10_001, 10_002   # the evaluation data: the same for every seed and method
FILES = ("quest.md", "quest.json", "quest_samples.png")


@dataclass
class BenchmarkSettings:
    """Scale of the benchmark; the defaults fit ``--jobs 2`` on 2 CPU cores in 40 minutes."""

    calib_samples: int = 64        # per calibrated step, for PTQ and finetuning (specs: 64-128)
    val_samples: int = 16          # per calibrated step, the finetuning stages' held-out meter
    eval_samples: int = 32         # per calibrated step, held-out (x_t, t) of the ε-MSE metric
    image_samples: int = 256       # final samples for PSNR and the Fréchet distance
    grid_samples: int = 16         # samples per cell of quest_samples.png
    num_steps: int = 20            # DDIM steps
    keep_every: int = 1            # calibrate every K-th sampler step (see the module docstring)
    skip_final_step: bool = True   # leave t = 0 uncalibrated (it reuses the t = 50 set)
    fp_dir: str = "runs/quest_fp"  # FP model run (`train_fp_model`'s default): trained there when absent
    fp_checkpoint: str | None = None  # an FP checkpoint to use as is (no training)
    model: str = "ddpm_digits16"   # the FP model's registered name ...
    model_kwargs: dict = field(default_factory=dict)  # ... and constructor arguments (tests: a tinier UNet)
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_bits(spec: str) -> tuple[int, int]:
    """``"w4a8"`` -> (4, 8)."""
    s = spec.lower().strip()
    if not (s.startswith("w") and "a" in s):
        raise ValueError(f"bit width {spec!r}: write it as w<bits>a<bits>, e.g. w4a8")
    w, a = s[1:].split("a", 1)
    try:
        return int(w), int(a)
    except ValueError:
        raise ValueError(f"bit width {spec!r}: write it as w<bits>a<bits>, e.g. w4a8") from None


# ---------------------------------------------------------------------------- shared data
def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from vizoo.io import save_safetensors_atomic

    save_safetensors_atomic(tensors, path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_fp_model(checkpoint: str | os.PathLike, name: str = "ddpm_digits16",
                  model_kwargs: dict[str, Any] | None = None) -> torch.nn.Module:
    """The benchmark's FP UNet from its checkpoint (eval mode, no gradients)."""
    from vizoo.factory import create_model
    from vizoo.hub import read_checkpoint

    model = create_model(name, **(model_kwargs or {}))
    model.load_state_dict(read_checkpoint(checkpoint))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _calibration(fp_model: torch.nn.Module, n: int, seed: int, s: BenchmarkSettings, path: Path) -> Any:
    """A calibration-like set (FP DDIM trajectories, FP ε attached), cached in ``path``."""
    from .calibrate import CalibrationSet, collect_calibration

    if path.is_file():
        return CalibrationSet.load(path)
    calib = collect_calibration(fp_model, n_samples=n, num_steps=s.num_steps, keep_every=s.keep_every, seed=seed)
    if s.skip_final_step and calib.num_steps > 1 and int(calib.t[-1]) == 0:
        calib = calib.subset(steps=list(range(calib.num_steps - 1)))
    calib.save(path)
    return calib


def prepare_shared(out: Path, fp_checkpoint: Path, s: BenchmarkSettings, seeds: Sequence[int],
                   progress: bool = True) -> dict[str, Any]:
    """FP-side data every unit reads (cached in ``out/data``): the ε-MSE eval set, FP samples from
    fixed noise, the real digits' features, and per seed a calibration and a validation set.
    Returns FP's own reference metrics (its Fréchet distance to the real digits)."""
    from vizoo.diffusion.metrics import digit_features, frechet_distance, load_feature_net, real_digit_features
    from vizoo.diffusion.sampling import ddim_sample

    from .calibrate import CalibrationSet

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    fp = load_fp_model(fp_checkpoint, s.model, s.model_kwargs)
    net = load_feature_net()
    _calibration(fp, s.eval_samples, EVAL_SEED, s, data / "eval.safetensors")
    samples_path = data / "fp_samples.safetensors"
    if not samples_path.is_file():
        shape = tuple(fp.pretrained_cfg["input_size"])
        noise = torch.randn(s.image_samples, *shape, generator=torch.Generator().manual_seed(SAMPLE_SEED))
        images = ddim_sample(fp, noise, num_steps=s.num_steps, progress="FP samples" if progress else False).images
        _save({"noise": noise, "images": images}, samples_path)
    real_path = data / "real_features.safetensors"
    if not real_path.is_file():
        _save({"features": real_digit_features(net)}, real_path)
    for seed in seeds:
        _calibration(fp, s.calib_samples, 1000 * seed + 1, s, data / f"calib_seed{seed}.safetensors")
        _calibration(fp, s.val_samples, 1000 * seed + 2, s, data / f"val_seed{seed}.safetensors")
    fp_feat = digit_features(_load(samples_path)["images"], net)
    timesteps = CalibrationSet.load(data / "eval.safetensors").t.tolist()
    return {"fd": float(frechet_distance(fp_feat, _load(real_path)["features"])), "timesteps": timesteps}


# ---------------------------------------------------------------------------- one unit
def score_snapshot(model: torch.nn.Module, shared: dict[str, Any], net: Any, num_steps: int,
                   grid_samples: int) -> dict[str, Any]:
    """ε-MSE vs FP, PSNR of the final samples vs FP's from the same noise, Fréchet distance to real digits."""
    from vizoo.diffusion.metrics import digit_features, eps_mse_by_timestep, frechet_distance, psnr
    from vizoo.diffusion.sampling import ddim_sample

    ev = shared["eval"]
    n = ev.x.shape[1]
    per_t = eps_mse_by_timestep(model, ev.fp_eps.flatten(0, 1), ev.x.flatten(0, 1), ev.t.repeat_interleave(n))
    images = ddim_sample(model, shared["noise"], num_steps=num_steps).images
    return {"eps_mse": statistics.mean(per_t.values()), "eps_mse_per_t": per_t,
            "psnr": float(psnr(images, shared["fp_images"])),
            "fd": float(frechet_distance(digit_features(images, net), shared["real_features"])),
            "grid": images[:grid_samples]}


def run_unit(bits: str, seed: int, out: str, fp_checkpoint: str, settings: dict[str, Any], threads: int = 1,
             queue: Any = None, verbose: bool = False) -> dict[str, Any]:
    """One (bits, seed): the progressive quantization run and every method's scores (resumable)."""
    from vizoo import quiet

    quiet.install(verbose)  # a worker process starts without the CLI's filters
    torch.set_num_threads(max(1, threads))
    from vizoo.diffusion.metrics import load_feature_net
    from vizoo.io import write_json_atomic

    from .calibrate import CalibrationSet

    s = _settings_from_dict(settings)
    root, data = Path(out), Path(out) / "data"
    unit = root / bits / f"seed{seed}"
    done = unit / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    unit.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    w_bits, a_bits = parse_bits(bits)
    fp = load_fp_model(fp_checkpoint, s.model, s.model_kwargs)
    net = load_feature_net()
    smp = _load(data / "fp_samples.safetensors")
    shared = {"eval": CalibrationSet.load(data / "eval.safetensors"), "noise": smp["noise"], "fp_images": smp["images"],
              "real_features": _load(data / "real_features.safetensors")["features"]}
    calib = CalibrationSet.load(data / f"calib_seed{seed}.safetensors")
    val_calib = CalibrationSet.load(data / f"val_seed{seed}.safetensors")
    methods: dict[str, Any] = {}
    for snap in quantize_progressive(fp, w_bits, a_bits, calib, seed, out=unit, settings=s.pipeline,
                                     val_calib=val_calib):
        scores_path = unit / f"scores_{snap.method.replace('+', '_')}.json"
        if scores_path.is_file():
            methods[snap.method] = json.loads(scores_path.read_text())
        else:
            t_eval = time.perf_counter()
            scores = score_snapshot(snap.model, shared, net, s.num_steps, s.grid_samples)
            _save({"images": scores.pop("grid")}, unit / f"grid_{snap.method.replace('+', '_')}.safetensors")
            scores.update(finetuned_params=snap.finetuned_params, total_params=snap.total_params,
                          finetuned_fraction=snap.finetuned_fraction, quantize_seconds=round(snap.seconds, 1),
                          eval_seconds=round(time.perf_counter() - t_eval, 1))
            write_json_atomic(scores_path, scores)
            methods[snap.method] = scores
        if queue is not None:
            queue.put((bits, seed, snap.method, methods[snap.method]["eps_mse"]))
    result = {"bits": bits, "seed": seed, "methods": methods, "seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(done, result)
    return result


def _settings_from_dict(d: dict[str, Any]) -> BenchmarkSettings:
    p = dict(d["pipeline"])
    p["te"], p["attn"] = StageOptions(**p["te"]), StageOptions(**p["attn"])
    return BenchmarkSettings(**{**d, "pipeline": PipelineSettings(**p)})


# ---------------------------------------------------------------------------- table and figure
def summarize(results: list[dict[str, Any]], fp_ref: dict[str, Any], bits: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (bits, method): mean and std over seeds; FP's own row first."""
    std = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    rows = [{"method": "fp", "bits": "w32a32", "seeds": len({r["seed"] for r in results}), "eps_mse": 0.0,
             "eps_mse_std": 0.0, "psnr": None, "psnr_std": None, "fd": fp_ref["fd"], "fd_std": 0.0,
             "finetuned_fraction": 0.0}]
    for b in bits:
        for m in METHODS:
            runs = [r["methods"][m] for r in results if r["bits"] == b and m in r["methods"]]
            if not runs:
                continue
            row = {"method": m, "bits": b, "seeds": len(runs)}
            for key in ("eps_mse", "psnr", "fd"):
                vals = [float(r[key]) for r in runs]
                row[key], row[f"{key}_std"] = statistics.mean(vals), std(vals)
            row["finetuned_fraction"] = runs[0]["finetuned_fraction"]
            row["finetuned_params"] = runs[0]["finetuned_params"]
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| W/A | method | ε-MSE vs FP (×1e-3) | PSNR vs FP (dB) | Fréchet distance to real digits | "
             "params finetuned |", "|---|---|---|---|---|---|"]
    for r in rows:
        bits = "W32A32" if r["method"] == "fp" else r["bits"].upper()
        psnr = "∞" if r["psnr"] is None else f"{r['psnr']:.2f} ± {r['psnr_std']:.2f}"
        eps = "0" if r["method"] == "fp" else f"{1e3 * r['eps_mse']:.3f} ± {1e3 * r['eps_mse_std']:.3f}"
        tuned = f"{100 * r['finetuned_fraction']:.2f} %"
        name = "FP" if r["method"] == "fp" else r["method"]
        fd = f"{r['fd']:.2f}" if r["method"] == "fp" else f"{r['fd']:.2f} ± {r['fd_std']:.2f}"
        lines.append(f"| {bits} | {name} | {eps} | {psnr} | {fd} | {tuned} |")
    return "\n".join(lines)


def plot_samples(out: Path, bits: Sequence[str], seed: int, path: Path) -> Path:
    """A grid image: rows FP and the methods, columns the bit widths; the same noise everywhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vizoo.diffusion.sampling import image_grid
    from vizoo.io import atomic_path

    fp = _load(out / "data" / "fp_samples.safetensors")["images"]
    rows = ["fp", *METHODS]
    fig, axes = plt.subplots(len(rows), len(bits), figsize=(2.2 * len(bits), 2.3 * len(rows)), squeeze=False)
    for i, m in enumerate(rows):
        for j, b in enumerate(bits):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            grid = out / b / f"seed{seed}" / f"grid_{m.replace('+', '_')}.safetensors"
            if m == "fp":
                images = fp[:16]
            elif grid.is_file():
                images = _load(grid)["images"]
            else:
                continue
            ax.imshow(image_grid(images, nrow=4), cmap="gray", vmin=0, vmax=255)
            if i == 0:
                ax.set_title(b.upper(), fontsize=9)
            if j == 0:
                ax.set_ylabel("FP (32 bit)" if m == "fp" else m, fontsize=9)
    fig.suptitle(f"DDIM-20 samples, same noise\n(quantization seed {seed})", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- the whole benchmark
def run_benchmark(out: str | os.PathLike = "runs/quest", seeds: Sequence[int] = (0, 1, 2),
                  bits: Sequence[str] = BITS, jobs: int = 2, threads: int | None = None,
                  settings: BenchmarkSettings | None = None, results: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the benchmark; writes quest.json / quest.md / quest_samples.png to ``out``
    (and copies them to ``results`` when given). Returns the summary."""
    from tqdm.auto import tqdm

    from vizoo import quiet
    from vizoo.io import write_json_atomic, write_text_atomic

    s = settings or BenchmarkSettings()
    bits = [b.lower() for b in bits]
    for b in bits:
        parse_bits(b)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = max(1, int(jobs))
    threads = threads or max(1, (os.cpu_count() or 2) // jobs)
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    fp_checkpoint = _fp_checkpoint(s, progress)
    _check_settings(out, s, fp_checkpoint)
    fp_ref = prepare_shared(out, fp_checkpoint, s, seeds, progress)
    t_shared = time.perf_counter() - t0
    units = [(b, seed) for seed in seeds for b in bits]
    done_units: list[dict[str, Any]] = []
    bar = tqdm(total=len(units) * len(METHODS), desc="methods", unit="method", disable=not progress)

    def finished(b: str, seed: int, r: dict[str, Any]) -> None:
        done_units.append(r)
        bar.write(f"{b.upper()} seed {seed}: " + ", ".join(
            f"{m} ε-MSE {1e3 * v['eps_mse']:.3f}e-3 FD {v['fd']:.2f}" for m, v in r["methods"].items())
            + f" ({r['seconds'] / 60:.1f} min)")

    if jobs == 1:  # in this process (debugging, tests): no pool, progress through a plain queue
        import queue as queue_mod

        queue = queue_mod.Queue()
        for b, seed in units:
            try:
                r = run_unit(b, seed, str(out), str(fp_checkpoint), s.to_dict(), threads, queue)
            except Exception as e:
                raise _unit_failed(b, seed, e) from e
            _drain(queue, bar)
            finished(b, seed, r)
    else:
        ctx = get_context("spawn")  # fresh interpreters: no inherited thread pools
        with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            queue = manager.Queue()
            verbose = quiet.is_verbose()
            pending = {pool.submit(run_unit, b, seed, str(out), str(fp_checkpoint), s.to_dict(), threads, queue,
                                   verbose): (b, seed) for b, seed in units}
            while pending:
                ready, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                _drain(queue, bar)
                for fut in ready:
                    b, seed = pending.pop(fut)
                    try:
                        r = fut.result()
                    except Exception as e:
                        for other in pending:
                            other.cancel()
                        if any(not f.cancelled() for f in pending):
                            bar.write(f"{b.upper()} seed {seed} failed; letting the running units finish (kept)")
                        raise _unit_failed(b, seed, e) from e
                    finished(b, seed, r)
            _drain(queue, bar)
    bar.close()
    done_units.sort(key=lambda r: (bits.index(r["bits"]), r["seed"]))
    rows = summarize(done_units, fp_ref, bits)
    summary = {"seeds": list(seeds), "bits": bits, "methods": list(METHODS), "jobs": jobs, "threads_per_job": threads,
               "fp_checkpoint": str(fp_checkpoint), "settings": s.to_dict(), "shared_seconds": round(t_shared, 1),
               "total_seconds": round(time.perf_counter() - t0, 1), "fp": fp_ref, "rows": rows,
               "runs": [{k: v for k, v in r.items()} for r in done_units]}
    write_json_atomic(out / "quest.json", summary)
    write_text_atomic(out / "quest.md", _markdown(summary))
    plot_samples(out, bits, seeds[0], out / "quest_samples.png")
    if results is not None:
        copy_results(out, Path(results))
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    p = s["pipeline"]
    return (f"{format_table(summary['rows'])}\n\n"
            f"Mean ± std over seeds {summary['seeds']} (the seed varies calibration, AdaRound and finetuning; "
            f"the evaluation data is fixed). ε-MSE: {s['eval_samples']} held-out FP-trajectory inputs at each of "
            f"the {len(summary['fp']['timesteps'])} calibrated timesteps; PSNR and Fréchet distance: "
            f"{s['image_samples']} DDIM-{s['num_steps']} samples (η = 0) from the same noise as FP's; FP's own "
            f"Fréchet distance is the floor at that sample count. Params finetuned: float weights and biases "
            f"changed (C_TE, then C_A) over all parameters of the FP model; activation scales not counted. "
            f"Calibration: {s['calib_samples']} samples per timestep; weight ranges "
            f"{p.get('weight_init', 'mse')} (qdiff and later), AdaRound {p['adaround_iters']} iterations per "
            f"block; TLA {p['te']['steps_per_t']} Adam steps per timestep; CMA {p['attn']['epochs']} epochs. "
            f"Total {summary['total_seconds'] / 60:.1f} min with {summary['jobs']} jobs x "
            f"{summary['threads_per_job']} thread(s).\n")


def copy_results(out: Path, results: Path) -> None:
    """Copy quest.md / quest.json / quest_samples.png (atomically) to ``results``."""
    from vizoo.io import atomic_path

    results.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        with atomic_path(results / name) as tmp:
            shutil.copyfile(out / name, tmp)


def _unit_failed(bits: str, seed: int, e: BaseException) -> RuntimeError:
    return RuntimeError(f"{bits.upper()} seed {seed} failed ({type(e).__name__}: {e}); run the same command "
                        "again to resume (finished work is kept)")


def _drain(queue: Any, bar: Any) -> None:
    import queue as queue_mod

    while True:
        try:
            b, seed, method, eps = queue.get_nowait()
        except (queue_mod.Empty, EOFError, OSError):
            return
        bar.update(1)
        bar.set_postfix_str(f"{b.upper()} seed {seed}: {method} ε-MSE {1e3 * eps:.3f}e-3", refresh=True)


def _fp_checkpoint(s: BenchmarkSettings, progress: bool) -> Path:
    """The FP model's checkpoint: ``fp_checkpoint`` as is, else `train_fp_model` (trained once, reused)."""
    from vizoo.diffusion.train import train_fp_model

    if s.fp_checkpoint:
        if not Path(s.fp_checkpoint).is_file():
            raise FileNotFoundError(f"FP checkpoint {s.fp_checkpoint} not found")
        return Path(s.fp_checkpoint)
    fp_dir = Path(s.fp_dir)
    if progress:
        print(f"FP model: ddpm_digits16 -> {fp_dir} (reused when present)", flush=True)
    return Path(train_fp_model(fp_dir, num_threads=os.cpu_count() or 1))


def _check_settings(out: Path, s: BenchmarkSettings, fp_checkpoint: Path) -> None:
    """A results folder holds one configuration: resuming with other settings would mix them."""
    from vizoo.io import write_json_atomic

    record = {"settings": {k: v for k, v in s.to_dict().items() if k not in ("fp_dir", "fp_checkpoint")},
              "fp_checkpoint": str(fp_checkpoint.resolve())}
    path = out / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(record)):
            changed = sorted(k for k in {**old["settings"], **record["settings"]}
                             if old["settings"].get(k) != record["settings"].get(k))
            what = ", ".join(changed) or "the FP checkpoint"
            raise ValueError(f"{out} holds a benchmark run with other settings ({what}); use another --out, or "
                             "delete it to start over")
        return
    write_json_atomic(path, record)

"""QuEST's selective finetuning through the engine, the pipeline and the `vizoo quantize` benchmark,
on a tiny UNet2DModel (8x8, channels 8/16, 3 calibrated timesteps)."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from vizoo.engine.trainer import Trainer  # noqa: E402
from vizoo.quant import QuantConfig, QuantUNet, collect_calibration, init_act_quantizers  # noqa: E402
from vizoo.quant import init_weight_quantizers, reconstruct  # noqa: E402
from vizoo.quant.finetune import (LayerTaps, StageOptions, build_stage_data, fp_name, register_stage_data,  # noqa: E402
                                  run_stage, stage_config)

TINY = dict(img_size=8, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)


def _tiny_fp():
    from vizoo.models.diffusion import DiffusionUNet

    torch.manual_seed(0)
    return DiffusionUNet(**TINY).eval()


@pytest.fixture(scope="module")
def setup():
    """A tiny FP UNet, its calibration set (3 steps x 8 samples) and its Q-Diffusion-style W4A8 model."""
    torch.set_num_threads(1)
    fp = _tiny_fp()
    calib = collect_calibration(fp, 8, num_steps=6, keep_every=2, seed=0)
    q = QuantUNet(fp, QuantConfig(w_bits=4, a_bits=8), calib.t.tolist())
    init_weight_quantizers(q, "mse")
    reconstruct(q, fp, calib, iters=2)
    init_act_quantizers(q, calib, "minmax")
    q.set_weight_mode("hard")
    return fp, calib, {k: v.clone() for k, v in q.state_dict().items()}


def _qdiff(setup):
    fp, calib, state = setup
    q = QuantUNet(fp, QuantConfig(w_bits=4, a_bits=8), calib.t.tolist())
    q.load_state_dict(state)
    q.set_quant_state(True, True)
    q.set_weight_mode("hard")
    return q


def _state(q):
    return {k: v.detach().clone() for k, v in q.state_dict().items()}


def _te_owners(q):
    """Every time-embedding layer (C_TE and the time MLP): stage 2 leaves their act Δ alone."""
    mlp = [n for n, _ in q.quant_modules() if ".time_embedding." in n]
    return set(q.te_layer_names()) | set(mlp)


def _expected_trainable(q, stage):
    sets = range(q.num_sets)
    if stage == "te":
        layers = q.te_layer_names()
        return ({f"{n}.{p}" for n in layers for p in ("weight", "bias")}
                | {f"{n}.act_quantizer.delta.{i}" for n in layers for i in sets})
    owners = _te_owners(q)
    deltas = {f"{n}.delta.{i}" for n, _ in q.act_quantizers() for i in sets if n.rsplit(".", 1)[0] not in owners}
    return {f"{n}.{p}" for n in q.attn_layer_names() for p in ("weight", "bias")} | deltas


def _trainer(q, fp, calib, opts, out, key, epochs=1):
    data = build_stage_data(q, fp, calib, calib, opts)
    trainer = Trainer(stage_config(opts, register_stage_data(key, data), out, epochs=epochs), model=q)
    trainer.setup()
    return trainer, data


def _local_mse(q, chunk, names):
    with torch.no_grad(), LayerTaps(q, names) as taps:
        q(chunk["x"], chunk["t"])
    return sum(float((taps.outputs[n] - chunk["local"][fp_name(n)]).pow(2).mean()) for n in names)


def test_one_tla_trainer_step_reduces_the_local_mse(setup, tmp_path):
    """Time-embedding projections whose outputs are off (biases perturbed): one Trainer step of
    stage 1 (local + global loss, Adam) brings their outputs closer to the FP model's."""
    fp, calib, _ = setup
    q = _qdiff(setup)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in q.te_layer_names():
            bias = q.get_submodule(name).bias
            bias += 0.5 * bias.abs().mean() * torch.randn(bias.shape, generator=gen)
    one = calib.subset(steps=[1])  # one timestep, 8 samples: one chunk, so one optimizer step
    opts = StageOptions(stage="te", batch_size=8, lr_weight=1e-3)
    trainer, data = _trainer(q, fp, one, opts, tmp_path / "te", "test-tla-step")
    assert len(data.train) == 1 and data.local_names == q.te_layer_names()
    before = _local_mse(q, data.train[0], data.local_names)
    result = trainer.fit()
    assert result.history[-1]["updates"] == 1
    assert _local_mse(q, data.train[0], data.local_names) < 0.98 * before


@pytest.mark.parametrize("stage", ["te", "attn"])
def test_stages_train_exactly_their_layers_and_never_the_weight_quantizers(setup, tmp_path, stage):
    fp, calib, _ = setup
    q = _qdiff(setup)
    opts = StageOptions(stage=stage, batch_size=8, steps_per_t=1, epochs=1)
    trainer, _ = _trainer(q, fp, calib, opts, tmp_path / stage, f"test-{stage}-names")
    trainable = {n for n, p in q.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(q, stage)
    # Adam: weights at 1e-5, activation scales at 1e-5 (stage 1, as the code) or 1e-4 (stage 2)
    lrs = sorted((g["lr"], len(g["params"])) for g in trainer.optimizer.param_groups)
    n_scales = sum(".delta." in n for n in trainable)
    assert lrs == sorted([(1e-5, len(trainable) - n_scales), (1e-5 if stage == "te" else 1e-4, n_scales)])
    before = _state(q)
    trainer.fit()
    changed = {k for k, v in q.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= trainable
    assert not any(".weight_quantizer." in k for k in changed)  # AdaRound alpha, Δ_w, Z_w frozen
    if stage == "attn":
        owners = _te_owners(q)
        assert not any(k.split(".act_quantizer")[0] in owners or ".time_emb" in k for k in changed)
        assert any(".to_q.weight" in k for k in changed) and any(".conv1.act_quantizer.delta" in k for k in changed)


def test_variants_local_loss_on_attention_and_one_activation_set(setup):
    from vizoo.quant.pipeline import PipelineSettings, quantize_unet

    fp, calib, _ = setup
    q = _qdiff(setup)
    data = build_stage_data(q, fp, calib, calib, StageOptions(stage="attn", local_loss=True))
    assert data.local_names == q.attn_layer_names() and set(data.train[0]["local"]) == {
        fp_name(n) for n in q.attn_layer_names()}
    settings = PipelineSettings(adaround_iters=1, single_act_set=True,
                                te=StageOptions(stage="te", steps_per_t=1), attn=StageOptions(stage="attn", epochs=1))
    single = quantize_unet(fp, "quest", 4, 8, calib, seed=0, settings=settings)
    assert single.num_sets == 1 and all(qz.num_sets == 1 for _, qz in single.act_quantizers())


def test_a_resumed_stage_run_reproduces_the_uninterrupted_one(setup, tmp_path):
    fp, calib, _ = setup
    opts = StageOptions(stage="te", batch_size=4, steps_per_t=4)  # 2 chunks per step -> 2 epochs
    whole = _qdiff(setup)
    run_stage(whole, fp, calib, calib, opts, tmp_path / "whole")
    part = _qdiff(setup)
    run_stage(part, fp, calib, calib, opts, tmp_path / "part", overrides={"epochs": 1})
    resumed = _qdiff(setup)  # a fresh process would rebuild the model: the state file restores it
    run_stage(resumed, fp, calib, calib, opts, tmp_path / "part")
    metrics = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], v) for k, v in _qdiff(setup).state_dict().items())


def test_quantize_help_lists_the_benchmark_options(capsys):
    from vizoo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--seeds", "--bits", "--jobs", "--results", "--single-act-set", "--local-loss", "--te-steps"):
        assert flag in text


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 6 samples: singular covariances
def test_a_tiny_benchmark_run_writes_the_table(tmp_path, monkeypatch):
    """One seed, one bit width, minimal sizes, in-process (jobs 1); a random feature net stands in
    for the trained one (its training is part B's test)."""
    import vizoo.diffusion.metrics as metrics
    from vizoo.hub import save_model
    from vizoo.quant.benchmark import BenchmarkSettings, run_benchmark
    from vizoo.quant.pipeline import METHODS, PipelineSettings

    torch.manual_seed(0)
    net = metrics.DigitFeatureNet((4, 4, 4, 4), 4).eval()
    monkeypatch.setattr(metrics, "load_feature_net", lambda *a, **k: net)
    ckpt = save_model(_tiny_fp(), tmp_path / "fp" / "best")
    pipeline = PipelineSettings(adaround_iters=1, te=StageOptions(stage="te", steps_per_t=1, batch_size=4),
                                attn=StageOptions(stage="attn", epochs=1, batch_size=4))
    settings = BenchmarkSettings(calib_samples=4, val_samples=2, eval_samples=2, image_samples=6, grid_samples=4,
                                 num_steps=4, fp_checkpoint=str(ckpt), model_kwargs=TINY, pipeline=pipeline)
    summary = run_benchmark(tmp_path / "quest", seeds=[0], bits=["w4a8"], jobs=1, threads=1, settings=settings,
                            results=tmp_path / "results", progress=False)
    assert [r["method"] for r in summary["rows"]] == ["fp", *METHODS]
    for name in ("quest.md", "quest.json", "quest_samples.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    table = (tmp_path / "quest" / "quest.md").read_text()
    assert "qdiff+te" in table and "W4A8" in table
    quest = summary["rows"][-1]
    assert 0 < quest["finetuned_fraction"] < 0.5 and quest["eps_mse"] > 0
    again = run_benchmark(tmp_path / "quest", seeds=[0], bits=["w4a8"], jobs=1, threads=1, settings=settings,
                          progress=False)  # resumed: every unit is reused
    assert again["rows"] == summary["rows"]


@pytest.mark.parametrize("weight_init", ["minmax", "mse"])
def test_the_baseline_rounds_on_the_weight_ranges_it_is_told(setup, weight_init):
    """qdiff's grid is min-max (default) or the L2.4 search: checked against the weights' own range."""
    from vizoo.quant.pipeline import PipelineSettings, quantize_unet

    fp, calib, _ = setup
    q = quantize_unet(fp, "qdiff", 4, 8, calib, seed=0, settings=PipelineSettings(adaround_iters=1,
                                                                                  weight_init=weight_init))
    shrunk = 0
    for name, module in q.quant_modules():
        w = module.weight.detach().flatten(1)
        minmax_delta = (w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)) / 15
        delta = module.weight_quantizer.delta.detach().flatten()
        if weight_init == "minmax":
            torch.testing.assert_close(delta, minmax_delta, rtol=1e-5, atol=1e-8, msg=name)
        shrunk += int((delta < minmax_delta * (1 - 1e-4)).sum())
    assert (shrunk == 0) == (weight_init == "minmax")

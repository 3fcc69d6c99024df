"""Diffusion UNet, DDPM training through the engine, DDIM sampling and the sample metrics."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusion models need diffusers (vizoo[diffusion])")

import vizoo  # noqa: E402
from vizoo.diffusion import (ddim_sample, ddim_timesteps, eps_mse, eps_mse_by_timestep, frechet_distance,  # noqa: E402
                             frechet_distance_from_stats, psnr)

#: a UNet of the same layout at a fraction of the cost (tests only)
TINY = {"block_out_channels": [8, 16, 16], "norm_num_groups": 4, "attention_head_dim": 8}


def tiny(name: str = "ddpm_digits16") -> torch.nn.Module:
    return vizoo.create_model(name, **TINY).eval()


def test_registered_models_and_forward_shapes():
    model = vizoo.create_model("ddpm_digits16")
    assert 1.15e6 < sum(p.numel() for p in model.parameters()) < 1.17e6
    assert (model.num_train_timesteps, model.beta_schedule, model.conditional) == (1000, "linear", False)
    assert model.pretrained_cfg["input_size"] == [1, 16, 16] and model.pretrained_cfg["mean"] == [0.5]
    assert vizoo.registry.get_family("ddpm_digits16") == "diffusion"
    x = torch.randn(2, 1, 16, 16)
    for t in (torch.tensor([3, 999]), torch.tensor([3.0, 999.0]), 10):
        out = model(x, t)
        assert isinstance(out, torch.Tensor) and out.shape == x.shape
    cond = tiny("ddpm_digits16_cond")
    assert cond.conditional and cond(x, torch.tensor([1, 2]), torch.tensor([0, 9])).shape == x.shape
    with pytest.raises(ValueError, match="class_labels"):
        cond(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(x, torch.tensor([1, 2]), torch.tensor([0, 9]))


@pytest.mark.parametrize("name", ["ddpm_digits16", "ddpm_digits16_cond"])
def test_example_inputs_resolve_for_export(name):
    from vizoo.export.spec import resolve_spec

    model = tiny(name)
    spec = resolve_spec(model)
    assert len(spec.example_inputs) == (3 if model.conditional else 2)
    assert spec.input_shapes[0] == (1, 1, 16, 16) and spec.output_shapes == [(1, 1, 16, 16)]
    assert not spec.classifier and not spec.camera_input


def test_recipe_and_task_follow_the_model():
    from vizoo.engine.config import TrainConfig

    cfg = TrainConfig.from_dict({"model": "ddpm_digits16"})
    assert (cfg.task, cfg.recipe, cfg.data, cfg.ema) == ("diffusion", "diffusion", "digits16:x8", True)
    from vizoo.engine.diffusion import parse_data

    assert parse_data("digits16") == 1 and parse_data("digits16:x4") == 4
    with pytest.raises(ValueError, match="digits16"):
        parse_data("digits")


def test_ddpm_training_lowers_the_loss_through_the_trainer(tmp_path):
    from vizoo.engine.trainer import train

    result = train(model="ddpm_digits16", model_kwargs=TINY, data="digits16", epochs=2, batch_size=128,
                   lr=3e-3, warmup_epochs=0, ema=False, out=str(tmp_path / "run"), progress="off", plots=False)
    hist = result.history
    assert hist[-1]["train_loss"] < hist[0]["train_loss"] < 1.5
    assert hist[-1]["val_eps_mse"] < hist[0]["val_eps_mse"]
    assert result.eval["num_samples"] == 359 and len(result.eval["eps_mse_by_timestep"]) == 10
    loaded = vizoo.hub.load_model(result.last_path)
    assert loaded.unet.config.block_out_channels == (8, 16, 16) and not loaded.conditional


def test_train_fp_model_reuses_a_finished_run(tmp_path):
    from vizoo.diffusion.train import train_fp_model

    kwargs = dict(epochs=1, repeats=1, batch_size=128, model_kwargs=TINY, progress="off", plots=False)
    path = train_fp_model(tmp_path / "fp", **kwargs)
    assert path.name == "last_ema.safetensors"  # the recipe's EMA weights
    stamp = path.stat().st_mtime_ns
    assert train_fp_model(tmp_path / "fp", **kwargs) == path and path.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        train_fp_model(tmp_path / "fp", **{**kwargs, "lr": 1e-4})


def test_ddim_is_deterministic_and_records_its_inputs():
    model = tiny()
    noise = torch.randn(5, 1, 16, 16)
    a = ddim_sample(model, noise, num_steps=6, record=True, batch_size=4)
    b = ddim_sample(model, noise, num_steps=6, batch_size=4)
    assert torch.equal(a.images, b.images) and b.inputs is None
    assert a.timesteps == ddim_timesteps(model, 6) and a.timesteps == sorted(a.timesteps, reverse=True)
    assert len(a.inputs) == 6 and torch.equal(a.inputs[0], noise)
    assert all(x.shape == noise.shape for x in a.inputs)
    assert a.images.shape == noise.shape and a.images.abs().max() <= 1.0
    assert ddim_timesteps(model, 20)[:2] == [950, 900]

    spy = Spy(tiny("ddpm_digits16_cond"))  # a wrapper, as a quantized UNet: schedule found on .model
    ddim_sample(spy, noise, num_steps=3, class_labels=torch.arange(5), batch_size=2)
    assert len(spy.calls) == 9 and all(len(set(t.tolist())) == 1 for t in spy.calls)  # one t per call


class Spy(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, y=None):
        self.calls.append(t)
        return self.model(x, t, y)


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))  # shared eigenvectors: sqrt(C1 C2) = C1^1/2 C2^1/2
    a, b = np.array([1.0, 2.0, 0.5, 3.0]), np.array([0.2, 1.0, 2.0, 3.0])
    c1, c2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_from_stats(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_stats(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)
    # from samples: the Gaussian fits converge to the same figure
    fa = rng.multivariate_normal(mu1, c1, size=100_000)
    fb = rng.multivariate_normal(mu2, c2, size=100_000)
    assert frechet_distance(torch.from_numpy(fa), fb) == pytest.approx(expected, rel=0.03)


def test_psnr_and_eps_mse():
    a = torch.zeros(2, 1, 4, 4)
    b = a + 0.2  # MSE 0.04 on range 2 -> 10 log10(4 / 0.04) = 20 dB
    assert psnr(a, b) == pytest.approx(20.0)
    model = tiny()
    x = torch.randn(6, 1, 16, 16)
    t = torch.tensor([10, 10, 500, 500, 999, 10])
    assert eps_mse(model, model, x, t) == pytest.approx(0.0, abs=1e-12)
    target = torch.zeros_like(x)
    with torch.no_grad():
        direct = torch.cat([model(x[i:i + 1], t[i:i + 1]) for i in range(6)]).pow(2).mean().item()
    assert eps_mse(model, target, x, t, batch_size=2) == pytest.approx(direct, rel=1e-5)
    assert sorted(eps_mse_by_timestep(model, target, x, t)) == [10, 500, 999]


def test_feature_net_trains_caches_and_reloads(tmp_path, monkeypatch):
    from vizoo.diffusion import metrics

    monkeypatch.setattr(metrics, "_RECIPE", {**metrics._RECIPE, "epochs": 1})
    monkeypatch.setattr(metrics, "MIN_VAL_ACCURACY", 0.0)
    net = metrics.load_feature_net(tmp_path)
    path = metrics.feature_net_path(tmp_path)
    assert path.is_file() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    again = metrics.load_feature_net(tmp_path)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert net.features(x).shape == (3, net.feature_dim) and net.logits(x).shape == (3, 10)
    assert torch.equal(net.features(x), again.features(x)) and not net.training

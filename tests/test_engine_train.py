"""The Trainer end to end on a tiny registered CNN: run files, checkpoints others read, freezing,
the model hook, the NaN stop, and the config round trip."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

import test_engine_tinynet  # noqa: F401  (registers engine_tinynet)
from vizoo.engine import NonFiniteLossError, TrainConfig, Trainer, evaluate, train
from vizoo.engine.metrics import read_jsonl
from vizoo.hub import load_model

TINY = dict(model="engine_tinynet", data="digits", img_size=8, batch_size=64, lr=2e-2, warmup_epochs=0,
            progress="off", plots=False, recipe="none")  # engine mechanics, not the digits recipe


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    trainer = Trainer(TrainConfig(out=str(tmp_path_factory.mktemp("run")), epochs=2, in_chans=1,
                                  **dict(TINY, plots=True)))
    trainer.result = trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def run(trainer):
    return trainer.result


def test_run_directory_holds_every_output(run):
    names = {p.name for p in run.run_dir.iterdir()}
    assert {"metrics.jsonl", "config.yaml", "training_curves.png", "last.safetensors", "last.json",
            "best.safetensors", "best.json", "last_state.pt", "confusion_matrix.json",
            "confusion_matrix.png"} <= names
    assert not any(n.endswith(".tmp") for n in names)
    records = read_jsonl(run.run_dir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "lr", "seconds"} <= set(r)
        assert math.isfinite(r["train_loss"]) and 0 <= r["val_top1"] <= r["val_top5"] <= 100
    assert run.metrics["val_top1"] == records[-1]["val_top1"]
    assert records[-1]["val_top1"] > 30  # it learns (chance is 10%)
    with open(run.run_dir / "training_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_rebuilds_the_trained_model_with_its_input_config(run):
    model = load_model(run.best_path)
    cfg = model.pretrained_cfg
    assert list(cfg["input_size"]) == [1, 8, 8] and cfg["crop_pct"] == 1.0
    assert len(cfg["mean"]) == len(cfg["std"]) == 1
    assert model.labels == [str(i) for i in range(10)]
    # the state file is weights_only-loadable and its weights are those of last.safetensors
    state = torch.load(run.state_path, weights_only=True)
    last = load_file(run.last_path)
    assert all(torch.equal(state["model"][k], last[k]) for k in last)
    assert {"optimizer", "scheduler", "rng", "updates", "history"} <= set(state)


def test_evaluate_matches_an_independent_count(run):
    """evaluate() against argmax/topk computed here from the model's own logits."""
    report = evaluate(run.best_path, data="digits")
    model = load_model(run.best_path).eval()
    from vizoo.data.digits import DigitsDataset
    from vizoo.data.transforms import build_transform, resolve_data_cfg

    ds = DigitsDataset("val", img_size=8, in_chans=1)
    tf = build_transform(resolve_data_cfg(model.pretrained_cfg, 8, 1, 1.0))
    x = torch.stack([tf(ds[i][0]) for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    with torch.no_grad():
        logits = model(x)
    top1 = (logits.argmax(1) == y).float().mean().item() * 100
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item() * 100
    assert report["num_samples"] == len(ds)
    assert report["top1"] == pytest.approx(top1) and report["top5"] == pytest.approx(top5)
    assert report["top1"] == pytest.approx(run.eval["top1"])  # the run's own final evaluation agrees
    cm = torch.zeros(10, 10, dtype=torch.long)
    for t, p in zip(y, logits.argmax(1)):
        cm[t, p] += 1
    assert report["confusion_matrix"] == cm.tolist()
    per_class = {str(c): 100.0 * cm[c, c].item() / cm[c].sum().item() for c in range(10)}
    assert report["per_class_accuracy"] == pytest.approx(per_class)


def test_config_yaml_reruns_the_same_config(run):
    saved = TrainConfig.from_yaml(run.run_dir / "config.yaml")
    assert saved.model == "engine_tinynet" and saved.img_size == 8 and saved.in_chans == 1
    assert saved.resume is None and saved.out == str(run.run_dir)
    raw = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert set(raw) == set(TrainConfig().to_dict())


def test_a_second_run_in_the_same_directory_needs_resume(run):
    with pytest.raises(RuntimeError, match="--resume"):
        train(out=str(run.run_dir), epochs=2, in_chans=1, **TINY)


def test_freezing_by_pattern_keeps_frozen_weights_and_bn_stats(tmp_path):
    trainer = Trainer(TrainConfig(out=str(tmp_path), epochs=1, trainable=["head.*", "re:^conv2\\."],
                                  **TINY))
    trainer.setup()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    for key in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        assert torch.equal(before[key], after[key]), key
    for key in ("conv2.weight", "head.weight"):
        assert not torch.equal(before[key], after[key]), key
    with pytest.raises(ValueError, match="matches no parameter"):
        Trainer(TrainConfig(out=str(tmp_path / "x"), freeze=["nonexistent.*"], **TINY)).setup()


def test_model_hook_gets_fractional_epoch_progress(trainer):
    seen = trainer.model.progress_seen
    n = trainer.batches_per_epoch
    assert len(seen) == 2 * n
    assert seen[:3] == pytest.approx([0.0, 1 / n, 2 / n]) and seen[n] == pytest.approx(1.0)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = dict(TINY, opt="sgd", lr=1e6, sched="constant", checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"loss became (nan|inf).*last good checkpoint is intact"):
        train(out=str(tmp_path), epochs=2, **cfg)
    state = torch.load(tmp_path / "last_state.pt", weights_only=True)
    weights = load_file(tmp_path / "last.safetensors")
    sidecar = json.loads((tmp_path / "last.json").read_text())
    assert state["updates"] >= 1 and sidecar["updates"] == state["updates"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert all(torch.equal(state["model"][k], weights[k]) for k in weights)
    assert load_model(tmp_path / "last.safetensors").num_classes == 10


def test_training_options_bf16_channels_last_ema_mixup_clip_accum(tmp_path):
    result = train(out=str(tmp_path), epochs=1, amp="bf16", channels_last=True, ema=True, ema_decay=0.9,
                   mixup=0.2, cutmix=0.5, smoothing=0.1, clip_grad=1.0, accum_steps=2,
                   **dict(TINY, batch_size=32))
    record = result.history[-1]
    assert math.isfinite(record["train_loss"]) and "val_top1_no_ema" in record
    assert record["updates"] == math.ceil(1438 // 32 / 2)
    assert record["val_top1"] > 15  # above chance even after one short mixed-precision epoch


def test_eval_cli_writes_json_and_png(run, tmp_path, capsys):
    from vizoo.cli import main

    assert main(["eval", "--checkpoint", str(run.run_dir), "--data", "digits", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["top1"] == pytest.approx(run.eval["top1"]) and len(report["per_class_accuracy"]) == 10
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert "top-1" in capsys.readouterr().out

"""Config: YAML, CLI flags and Python keywords are one set of names; flags override the file."""
from __future__ import annotations

import argparse

import pytest

from vizoo.cli import build_parser
from vizoo.engine.config import TrainConfig, add_config_arguments, config_from_args
from vizoo.engine.freeze import apply_freeze, matches


def _parse(argv):
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    return p.parse_args(argv)


def test_flags_override_yaml_and_unset_flags_keep_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: a\nlr: 0.5\nepochs: 3\nfreeze: ['stem.*']\nmodel_kwargs: {drop_rate: 0.1}\n")
    base = TrainConfig.from_yaml(f)
    cfg = config_from_args(_parse(["--lr", "0.01", "--no-verify-images", "--model-kwargs", "drop_path_rate=0.2",
                                   "--aug-scale", "0.5", "1", "--resume"]), base)
    assert cfg.lr == 0.01 and cfg.epochs == 3 and cfg.freeze == ["stem.*"]
    assert cfg.verify_images is False and cfg.aug_scale == [0.5, 1.0] and cfg.resume == "auto"
    assert cfg.model_kwargs == {"drop_rate": 0.1, "drop_path_rate": 0.2}
    # a YAML dump reloads to the same config
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert TrainConfig.from_yaml(again) == cfg


def test_unknown_keys_and_bad_values_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        TrainConfig.from_dict({"model": "x", "epoch": 3})
    with pytest.raises(ValueError, match="no model"):
        TrainConfig().validate()
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(model="x", amp="fp8").validate()


def test_vizoo_cli_has_train_and_eval():
    parser = build_parser()
    args = parser.parse_args(["train", "resnet", "--data", "digits", "--epochs", "2", "--img-size", "16",
                              "--batch-size", "8", "--out", "o", "--resume", "--pretrained"])
    assert args.model_name == "resnet" and args.epochs == 2 and args.pretrained == "true"
    args = parser.parse_args(["eval", "--checkpoint", "x.safetensors", "--data", "digits"])
    assert args.checkpoint == "x.safetensors" and args.split == "val"


def test_freeze_patterns_fnmatch_and_regex():
    import torch.nn as nn

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Linear(2, 2))
    assert matches("0.weight", "0.*") and matches("2.bias", r"re:^2\.") and not matches("20.bias", r"re:^2\.")
    n_train, total = apply_freeze(model, trainable=["1.*", "2.*"], freeze=["2.bias"])
    assert [p.requires_grad for p in model.parameters()] == [False, False, True, True, True, False]
    assert n_train == 2 + 2 + 4 and total == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="every parameter is frozen"):
        apply_freeze(model, freeze=["*"])


def test_example_configs_are_valid():
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("train_*.yaml"))
    assert files, "configs/train_*.yaml examples are missing"
    for f in files:
        TrainConfig.from_yaml(f).validate()


def test_digits_recipe_fills_only_unset_fields_and_only_for_digits(tmp_path):
    from vizoo.engine.config import RECIPES

    plain = TrainConfig()
    cfg = config_from_args(_parse(["--data", "digits", "--lr", "0.01"]))
    assert cfg.recipe == "digits" and cfg.lr == 0.01  # an explicit flag beats the recipe
    assert cfg.smoothing == RECIPES["digits"]["smoothing"] != plain.smoothing
    assert cfg.hflip == 0.0 and cfg.augment is True
    folder = config_from_args(_parse(["--data", str(tmp_path)]))
    assert folder.recipe == "none" and folder.smoothing == plain.smoothing and folder.augment is False
    off = TrainConfig.from_dict({"model": "m", "recipe": "none"})
    assert off.batch_size == plain.batch_size and off.ema is False
    # the saved config reruns as it ran
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig.from_dict({"model": "m", "recipe": "imagenet"})

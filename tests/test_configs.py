"""Every shipped training config parses, validates and names a registered model; the digits ones
build their model at their image size and give one logit per digit class."""
from pathlib import Path

import pytest
import torch

import vizoo
from vizoo.engine.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_every_method_family_ships_configs():
    families = {p.parent.name for p in CONFIGS}
    assert {"affnet", "evit", "ulsam"} <= families


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_validates_and_names_a_model(path):
    cfg = TrainConfig.from_yaml(path).validate()
    assert vizoo.registry.is_model(cfg.model), f"{path}: unknown model {cfg.model}"
    if "imagenet" in path.stem:
        assert cfg.img_size >= 224 and cfg.epochs >= 100 and cfg.data != "digits"
    if cfg.data == "digits":
        model = vizoo.create_model(cfg.model, num_classes=10, in_chans=cfg.in_chans or 3,
                                   **dict(cfg.model_kwargs or {})).eval()
        with torch.no_grad():
            out = model(torch.rand(2, cfg.in_chans or 3, cfg.img_size, cfg.img_size))
        assert out.shape == (2, 10)

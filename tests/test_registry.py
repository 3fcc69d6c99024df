"""Registry and factory behaviour, as a timm user expects it."""
import pytest
import torch
import torch.nn as nn

import vizoo
from vizoo.registry import PretrainedCfg, register_model, register_pretrained_cfgs


class _TinyNet(nn.Module):
    def __init__(self, num_classes: int = 5, in_chans: int = 3, width: int = 4):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


@register_model
def tiny_registry_net(**kwargs) -> _TinyNet:
    return _TinyNet(**kwargs)


register_pretrained_cfgs({
    "tiny_registry_net.narrow": PretrainedCfg(input_size=(3, 16, 16), num_classes=5,
                                                  model_kwargs={"width": 2}, first_conv="stem"),
    "tiny_registry_net.wide": PretrainedCfg(input_size=(3, 16, 16), num_classes=5,
                                                model_kwargs={"width": 8}),
})


def test_unknown_name_suggests_closest():
    with pytest.raises(vizoo.UnknownModelError) as e:
        vizoo.create_model("tiny_registry_nett")
    assert "tiny_registry_net" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_typo_of_evonorm_model_suggests_it():
    with pytest.raises(ValueError, match="resnet50v2_evos0"):
        vizoo.create_model("resnet50v2_evoss0")


def test_unknown_tag_is_an_error():
    with pytest.raises(vizoo.UnknownModelError):
        vizoo.create_model("tiny_registry_net.nope")


def test_tags_select_constructor_kwargs_and_user_kwargs_win():
    assert vizoo.create_model("tiny_registry_net.narrow").stem.out_channels == 2
    assert vizoo.create_model("tiny_registry_net.wide").stem.out_channels == 8
    assert vizoo.create_model("tiny_registry_net.wide", width=3).stem.out_channels == 3
    # the first tag registered is the default
    assert vizoo.create_model("tiny_registry_net").stem.out_channels == 2


def test_num_classes_in_chans_and_pretrained_cfg():
    m = vizoo.create_model("tiny_registry_net", num_classes=7, in_chans=1)
    assert m(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    assert m.pretrained_cfg["num_classes"] == 7
    assert m.pretrained_cfg["input_size"][0] == 1


def test_list_models_wildcards_and_tags():
    assert "tiny_registry_net" in vizoo.list_models("tiny_registry_*")
    tagged = vizoo.list_models("tiny_registry_net.*")
    assert tagged == ["tiny_registry_net.narrow", "tiny_registry_net.wide"]
    assert vizoo.list_models("no_such_*") == []


def test_pretrained_without_source_explains():
    with pytest.raises(vizoo.CheckpointError, match="no published weights"):
        vizoo.create_model("tiny_registry_net", pretrained=True)


def test_model_info_counts_params_and_macs():
    info = vizoo.model_info("tiny_registry_net.wide")
    # conv 3->8 (3x3, bias) + linear 8->5: independent arithmetic
    assert info.params == 3 * 8 * 9 + 8 + 8 * 5 + 5
    # MACs at 16x16: conv 16*16*8*27 + linear 8*5 (the mean is not a MAC)
    assert info.macs == 16 * 16 * 8 * 27 + 8 * 5
    assert info.family == "test_registry"

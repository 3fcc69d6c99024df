"""Checkpoint loading: formats, containers, clear errors, never unpickling arbitrary objects."""
import argparse
import pathlib

import pytest
import torch
from safetensors.torch import save_file

import vizoo
from vizoo import hub

from test_registry import _TinyNet  # noqa: F401  (registers tiny_registry_net)


def _model(**kw):
    return vizoo.create_model("tiny_registry_net.wide", **kw)


def test_safetensors_and_file_url_roundtrip(tmp_path):
    src = _model()
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    for pretrained in (str(path), path.as_uri()):
        dst = _model(pretrained=pretrained)
        x = torch.randn(1, 3, 16, 16)
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("container", ["state_dict", "model", "model_ema"])
def test_torch_pickle_containers_and_ddp_prefix(tmp_path, container):
    src = _model()
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({container: sd, "epoch": 3}, path)
    dst = _model(checkpoint_path=path)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_pickle_with_python_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _model().state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(vizoo.CheckpointError, match="never unpickled"):
        _model(checkpoint_path=path)


def test_truncated_checkpoint_names_file(tmp_path):
    path = tmp_path / "trunc.safetensors"
    save_file(_model().state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(vizoo.CheckpointError) as e:
        _model(checkpoint_path=path)
    assert "trunc.safetensors" in str(e.value) and "truncated" in str(e.value)


def test_truncated_torch_pickle(tmp_path):
    path = tmp_path / "trunc.pth"
    torch.save(_model().state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(vizoo.CheckpointError, match="trunc.pth"):
        _model(checkpoint_path=path)


def test_checkpoint_of_another_model_lists_keys(tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    path = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(path))
    with pytest.raises(vizoo.CheckpointError) as e:
        _model(checkpoint_path=path)
    msg = str(e.value)
    assert "other.safetensors" in msg and "missing" in msg and "unexpected" in msg
    assert "stem.weight" in msg and "0.weight" in msg


def test_shape_mismatch_of_body_is_error_but_head_is_dropped_with_warning(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(_model(width=3).state_dict(), str(path))
    with pytest.raises(vizoo.CheckpointError, match="shape mismatch"):
        _model(checkpoint_path=path)
    # another number of classes: head dropped, rest loaded (timm behaviour)
    src = _model()
    save_file(src.state_dict(), str(path))
    with pytest.warns(UserWarning, match="classifier"):
        dst = _model(pretrained=str(path), num_classes=3)
    assert torch.equal(dst.stem.weight, src.stem.weight)
    assert dst.head.out_features == 3


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(vizoo.CheckpointError, match="not found"):
        _model(checkpoint_path=tmp_path / "nope.safetensors")


def test_save_model_and_load_model_rebuild(tmp_path):
    src = _model(num_classes=4)
    src.pretrained_cfg["input_size"] = [3, 12, 12]
    weights = hub.save_model(src, tmp_path / "run" / "best", labels=list("abcd"))
    assert weights.suffix == ".safetensors" and weights.with_suffix(".json").is_file()
    dst = hub.load_model(weights)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    assert dst.labels == list("abcd") and dst.pretrained_cfg["input_size"] == [3, 12, 12]
    assert not list(pathlib.Path(tmp_path / "run").glob("*.tmp"))

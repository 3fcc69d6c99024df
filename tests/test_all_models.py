"""Every registered model builds, is counted at its default size, and runs forward + backward."""
import pytest
import torch

import vizoo
from vizoo.counting import count_macs, count_params, example_inputs

# Test-local registrations (families named test_*) are not part of the zoo.
ZOO = [n for n in vizoo.list_models() if not vizoo.registry.get_family(n).startswith("test_")]


def test_zoo_is_not_empty():
    assert len(ZOO) >= 5, ZOO


@pytest.mark.parametrize("name", ZOO)
def test_model_builds_counts_runs_forward_and_backward(name):
    model = vizoo.create_model(name)
    cfg = model.pretrained_cfg
    assert count_params(model) > 0
    assert count_macs(model, tuple(cfg["input_size"])) > 0
    size = tuple(cfg.get("test_input_size") or cfg["input_size"])
    model.train()
    inputs = example_inputs(model, size, batch_size=2)
    out = model(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(out, dict):
        out = next(iter(out.values()))
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the weights"

"""CLR: the reprogramming layer, the task bank, continual training through the engine, and the
multi-task exported files (zero forgetting in PyTorch and in the files)."""
import pytest
import timm
import torch
import torch.nn as nn

import vizoo
from vizoo.continual import METHODS, ContinualModel
from vizoo.layers import CLRConv2d, apply_clr


def _plain_convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if type(m) is nn.Conv2d or (isinstance(m, nn.Conv2d) and not hasattr(m, "clr"))]


# ------------------------------------------------------------------ the layer
@pytest.mark.parametrize("build", [
    lambda: timm.create_model("resnet18"),
    lambda: timm.create_model("mobilenetv3_small_100"),
    lambda: vizoo.create_model("mobilenetv2_100_evos0"),
    lambda: vizoo.create_model("mobilenetv1_050_ulsam"),
    lambda: vizoo.create_model("resnet50v2_evob0"),
], ids=["timm_resnet18", "timm_mobilenetv3", "mobilenetv2_evos0", "mobilenetv1_ulsam", "resnet50v2_evob0"])
@pytest.mark.parametrize("mode", ["main", "full"])
def test_clr_at_init_leaves_the_output_unchanged_and_wraps_the_right_convs(build, mode):
    torch.manual_seed(0)
    model = build().eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    expected = sum(1 for c in convs if mode == "full" or tuple(c.kernel_size) != (1, 1))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        apply_clr(model, mode)
        after = model(x)
    wrapped = [m for m in model.modules() if isinstance(m, CLRConv2d)]
    assert len(wrapped) == expected
    assert all(w.clr.groups == w.out_channels and w.clr.bias is None for w in wrapped)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_torchvision_models_are_reprogrammed_too():
    torchvision = pytest.importorskip("torchvision")
    for build in (torchvision.models.resnet18, torchvision.models.mobilenet_v2):
        model = build().eval()
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            before = model(x)
            apply_clr(model)
            assert torch.equal(model(x), before)


def test_clr_refuses_a_second_wrapping_and_an_even_kernel():
    model = apply_clr(timm.create_model("resnet18"))
    with pytest.raises(ValueError, match="already has CLR"):
        apply_clr(model)
    with pytest.raises(ValueError, match="odd"):
        apply_clr(timm.create_model("resnet18"), kernel_size=2)


# ------------------------------------------------------------------ parameter overhead
def _independent_overhead(model: nn.Module, mode: str) -> int:
    """9 per output channel of every wrapped conv + 2 per BN channel, counted on the plain model."""
    clr = sum(9 * m.out_channels for m in model.modules()
              if isinstance(m, nn.Conv2d) and (mode == "full" or m.kernel_size != (1, 1)))
    bn = sum(2 * m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return clr + bn


@pytest.mark.parametrize("name,arch,pct", [("clr_resnet50", "resnet50", 0.373), ("clr_resnet18", "resnet18", 0.400)])
def test_parameters_added_per_task_match_an_independent_count(name, arch, pct):
    plain = timm.create_model(arch)
    backbone = sum(p.numel() for n, p in plain.named_parameters() if not n.startswith("fc."))
    for method, mode in (("clr", "main"), ("clr_full", "full")):
        model = vizoo.create_model(name, num_classes=0, method=method)
        assert model.parameters_per_task() == _independent_overhead(plain, mode)
        assert model.backbone_parameters() == backbone
    main = vizoo.create_model(name, num_classes=0)
    share = 100.0 * main.parameters_per_task() / main.backbone_parameters()
    assert share <= 0.6 and share == pytest.approx(pct, abs=5e-4)


# ------------------------------------------------------------------ the task bank
def _perturb_task(model: ContinualModel, scale: float = 0.1) -> None:
    """Stand-in for training: move every tensor the current task owns."""
    owned = set(model.task_tensor_names())
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in owned and v.is_floating_point():
                v.add_(scale * torch.randn_like(v).abs())


def test_bank_trains_only_what_a_task_owns_and_switches_tasks_exactly():
    torch.manual_seed(0)
    model = vizoo.create_model("clr_resnet18_025", num_classes=5).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".clr." in n or n.startswith("head.") or ".bn" in n or "downsample.1" in n
                             for n in trainable)
    assert not any(n.endswith("conv.weight") and ".clr." not in n for n in trainable)
    x = torch.rand(4, 3, 32, 32)
    first = model(x)
    model.add_task("second", 3, seed=1)
    _perturb_task(model)
    assert model(x).shape == (4, 3)
    model.set_task("task0")
    assert torch.equal(model(x), first)
    with pytest.raises(ValueError, match="unknown task 'nope'.*add_task"):
        model.set_task("nope")


def test_methods_own_what_the_paper_says():
    for name, method in METHODS.items():
        model = vizoo.create_model("clr_resnet18_025", num_classes=2, method=name)
        owned = set(model.task_tensor_names())
        has_clr = any(".clr." in k for k in owned)
        has_stats = any(k.endswith("running_var") for k in owned)
        assert has_clr == (method.task_state == "clr")
        assert has_stats == (method.task_state in ("norm", "clr", "all"))
        assert (len(model.trainable_parameter_names()) == len(list(model.parameters()))) == (
            method.train_shared or method.task_state == "all")


def test_task_state_saves_alone_and_loads_back_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = vizoo.create_model("clr_resnet18_025", num_classes=0).eval()
    model.add_task("digits", 5, labels=list("abcde"), seed=0)
    _perturb_task(model)
    x = torch.rand(3, 3, 32, 32)
    want = model(x)
    path = model.save_task("digits", tmp_path / "digits.safetensors")
    assert path.stat().st_size < 100_000  # the task's tensors only, never the backbone (2.9 MB)
    fresh = vizoo.create_model("clr_resnet18_025", num_classes=0).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items()
                           if k not in set(model.task_tensor_names())}, strict=False)
    assert fresh.load_task(path) == "digits" and fresh.labels == list("abcde")
    assert torch.equal(fresh(x), want)


def test_bad_task_states_get_one_clear_line(tmp_path):
    torch.manual_seed(0)
    model = vizoo.create_model("clr_resnet18_025", num_classes=5)
    path = model.save_task("task0", tmp_path / "t.safetensors")
    other = vizoo.create_model("clr_resnet18_025", num_classes=0)  # other random anchor weights
    with pytest.raises(ValueError, match="another backbone"):
        other.load_task(path)
    same = vizoo.create_model("clr_resnet18_025", num_classes=0)
    same.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, strict=False)
    same.add_task("task0", 10)
    with pytest.raises(ValueError, match="10-class head.*5 classes"):
        same.load_task(path)
    with pytest.raises(ValueError, match="method='clr'"):
        vizoo.create_model("clr_resnet18_025", num_classes=0, method="head").load_task(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a vizoo task state"):
        same.load_task(tmp_path / "junk.safetensors")
    with pytest.raises(RuntimeError, match="no task selected"):
        vizoo.create_model("clr_resnet18_025", num_classes=0)(torch.rand(1, 3, 32, 32))


def test_export_form_folds_norms_into_the_task_kernels():
    torch.manual_seed(0)
    model = vizoo.create_model("clr_resnet18_025", num_classes=4).eval()
    _perturb_task(model)
    model.add_task("b", 3, seed=1)
    _perturb_task(model)
    x = torch.rand(4, 3, 32, 32)
    functions = model.export_functions()
    for task, module in functions.items():
        model.set_task(task)
        torch.testing.assert_close(module(x), model(x), rtol=0, atol=1e-5)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    # the frozen convs are the same tensors in both tasks' modules (a file stores them once)
    a, b = functions.values()
    assert a.backbone.conv1.conv.weight is b.backbone.conv1.conv.weight
    assert a.backbone.conv1.clr.weight is not b.backbone.conv1.clr.weight

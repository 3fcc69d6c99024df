"""ULSAM: the vectorised module against a per-subspace reference rebuilt from the spec (§1.1),
official-layout checkpoints through the filter, and the MobileNet placements' counts against the
paper's tables (as changes relative to the vanilla backbone, counted on timm's own MobileNets)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.models import create_model as timm_create_model
from timm.models.efficientnet import _gen_mobilenet_v1

import vizoo
from vizoo.counting import count_macs, count_params
from vizoo.layers.ulsam import ULSAM, ulsam_checkpoint_filter
from vizoo.registry import get_pretrained_cfg


# --- test-local reference: the official module's math, one sub-module per subspace ----------

class RefSubSpace(nn.Module):
    """One subspace as the official code computes it (attribute names = official state_dict)."""

    def __init__(self, nin: int) -> None:
        super().__init__()
        self.conv_dws = nn.Conv2d(nin, nin, 1, groups=nin)
        self.bn_dws = nn.BatchNorm2d(nin, momentum=0.9)
        self.maxpool = nn.MaxPool2d(3, 1, 1)
        self.conv_point = nn.Conv2d(nin, 1, 1)
        self.bn_point = nn.BatchNorm2d(1, momentum=0.9)

    def forward(self, x):
        out = torch.relu(self.bn_dws(self.conv_dws(x)))
        out = self.maxpool(out)
        out = torch.relu(self.bn_point(self.conv_point(out)))
        b, n, h, w = out.shape
        out = torch.softmax(out.view(b, n, -1), dim=2).view(b, n, h, w)
        return torch.mul(out.expand_as(x), x) + x


class RefULSAM(nn.Module):
    def __init__(self, nin: int, num_splits: int) -> None:
        super().__init__()
        self.num_splits = num_splits
        self.subspaces = nn.ModuleList(RefSubSpace(nin // num_splits) for _ in range(num_splits))

    def forward(self, x):
        chunks = torch.chunk(x, self.num_splits, dim=1)
        return torch.cat([sub(c) for sub, c in zip(self.subspaces, chunks)], dim=1)


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights and BN statistics so every term of the math matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.7)
    return module


def _copy_ref_into_vectorised(ref: RefULSAM, vec: ULSAM) -> None:
    """Test-local mapping, written independently of the package's filter."""
    with torch.no_grad():
        for layer in ("conv_dws", "bn_dws", "conv_point", "bn_point"):
            for pname, target in getattr(vec, layer).state_dict().items():
                parts = [getattr(s, layer).state_dict()[pname] for s in ref.subspaces]
                target.copy_(parts[0] if pname == "num_batches_tracked" else torch.cat(parts))


@pytest.mark.parametrize("g", [1, 2, 4, 8])
def test_vectorised_equals_per_subspace_reference_train_and_eval(g):
    m = 32
    ref = _randomise(RefULSAM(m, g), seed=g)
    vec = ULSAM(m, g)
    _copy_ref_into_vectorised(ref, vec)
    for step in range(3):  # train steps: outputs, input gradients and running stats agree
        x = (torch.randn(4, m, 7, 9) * 2).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y_ref, y_vec = ref.train()(x), vec.train()(x2)
        torch.testing.assert_close(y_vec, y_ref, atol=1e-6, rtol=0)
        (y_ref * torch.linspace(-1, 1, y_ref.numel()).view_as(y_ref)).sum().backward()
        (y_vec * torch.linspace(-1, 1, y_vec.numel()).view_as(y_vec)).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad, atol=1e-6, rtol=0)
    ref_stats = torch.cat([s.bn_dws.running_mean for s in ref.subspaces])
    torch.testing.assert_close(vec.bn_dws.running_mean, ref_stats, atol=1e-6, rtol=0)
    torch.testing.assert_close(vec.bn_point.running_var,
                               torch.cat([s.bn_point.running_var for s in ref.subspaces]), atol=1e-6, rtol=0)
    assert int(vec.bn_dws.num_batches_tracked) == int(ref.subspaces[0].bn_dws.num_batches_tracked) == 10
    x = torch.randn(3, m, 6, 5) * 3
    with torch.no_grad():
        y_ref, y_vec = ref.eval()(x), vec.eval()(x)
        attn = vec.attention(x)
    torch.testing.assert_close(y_vec, y_ref, atol=1e-6, rtol=0)
    # the comparison has teeth: attention is not uniform, so ULSAM is not the identity here
    assert (attn.amax(-1) - attn.amin(-1)).max() > 1e-2
    assert (y_vec - x).abs().max() > 1e-3


def test_bn_momentum_default_is_the_official_0p9():
    mod = ULSAM(8, 2).train()
    x = torch.randn(5, 8, 4, 4) + 3.0
    mod(x)
    batch_mean = mod.conv_dws(x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(mod.bn_dws.running_mean, 0.9 * batch_mean, atol=1e-6, rtol=0)
    assert ULSAM(8, 2, bn_momentum=0.1).bn_point.momentum == 0.1


def test_attention_is_uniform_on_2x2_maps_and_not_on_3x3():
    """Documented limit: the 3x3 max pool covers a whole 2x2 map, so every logit is equal."""
    mod = _randomise(ULSAM(8, 2), seed=3).train()
    attn = mod.attention(torch.randn(4, 8, 2, 2))
    torch.testing.assert_close(attn, torch.full_like(attn, 0.25))
    attn = mod.attention(torch.randn(4, 8, 3, 3))
    assert (attn.amax(-1) - attn.amin(-1)).max() > 1e-2


@pytest.mark.parametrize("m,g", [(8, 1), (32, 4), (96, 4), (512, 16)])
def test_param_count_is_5m_plus_3g(m, g):
    assert count_params(ULSAM(m, g)) == 5 * m + 3 * g


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        ULSAM(30, 4)
    with pytest.raises(ValueError, match="channels"):
        ULSAM(32, 4)(torch.randn(1, 16, 4, 4))


def test_official_layout_loads_through_filter_bare_and_prefixed():
    m, g = 24, 3
    ref = _randomise(RefULSAM(m, g), seed=1).eval()
    vec = ULSAM(m, g).eval()
    vec.load_state_dict(ulsam_checkpoint_filter(ref.state_dict(), vec), strict=True)
    x = torch.randn(2, m, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(vec(x), ref(x), atol=1e-6, rtol=0)
    # inside a model: prefix kept, other keys pass through untouched
    net_ref = nn.Sequential(nn.Conv2d(3, m, 3), ref)
    net_vec = nn.Sequential(nn.Conv2d(3, m, 3), ULSAM(m, g)).eval()
    net_vec.load_state_dict(ulsam_checkpoint_filter(net_ref.state_dict(), net_vec), strict=True)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(net_vec(x), net_ref.eval()(x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_groups=2"):
        ulsam_checkpoint_filter(ref.state_dict(), ULSAM(m, 2))
    broken = {k: v for k, v in ref.state_dict().items() if not k.startswith("subspaces.1.")}
    with pytest.raises(ValueError, match="numbered"):
        ulsam_checkpoint_filter(broken, vec)


def test_model_checkpoint_with_official_ulsam_layout_loads_via_create_model(tmp_path):
    """A whole-model checkpoint whose ULSAM layers are official-layout loads with the registered
    filter, and the loaded model computes what the model with reference ULSAMs computes."""
    from safetensors.torch import save_file

    name = "mobilenetv2_100_ulsam_a"
    src = vizoo.create_model(name, num_classes=10).eval()
    sd = dict(src.state_dict())
    ulsams = [(p, m) for p, m in src.named_modules() if isinstance(m, ULSAM)]
    assert len(ulsams) == 2
    for seed, (prefix, mod) in enumerate(ulsams):
        ref = _randomise(RefULSAM(mod.channels, mod.num_groups), seed=seed)
        sd = {k: v for k, v in sd.items() if not k.startswith(prefix + ".")}
        sd.update({f"{prefix}.{k}": v for k, v in ref.state_dict().items()})
        stage, idx = prefix.split(".")[1:]
        src.blocks[int(stage)][int(idx)] = ref.eval()  # the expected computation
    path = tmp_path / "official_layout.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = vizoo.create_model(name, num_classes=10, checkpoint_path=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src(x), atol=1e-5, rtol=1e-5)


# --- models: placements, kwargs, and the paper's counts as changes ---------------------------

def _vanilla(name: str) -> nn.Module:
    """timm's own vanilla backbone for each variant (independent of our builder)."""
    if name.startswith("mobilenetv2"):
        return timm_create_model("mobilenetv2_100")
    width = {"100": 1.0, "075": 0.75, "050": 0.5}[name.split("_")[1]]
    return _gen_mobilenet_v1("mobilenetv1_100", width)


ULSAM_MODELS = vizoo.list_models("*ulsam*")

#: (unit of the last printed digit of the paper's variant figure, of its vanilla figure), in M.
PRINTED_UNITS = {
    "mobilenetv1_100_ulsam": {"params": (0.1, 0.1), "macs": 1.0},
    "mobilenetv1_075_ulsam": {"params": (0.1, 0.1), "macs": 1.0},
    "mobilenetv1_050_ulsam": {"params": (0.1, 0.1), "macs": 1.0},
    "mobilenetv1_100_ulsam_add": {"params": (0.1, 0.1), "macs": 0.1},
    "mobilenetv2_100_ulsam_a": {"params": (0.01, 0.1), "macs": 0.01},
    "mobilenetv2_100_ulsam_b": {"params": (0.01, 0.1), "macs": 0.01},
    "mobilenetv2_100_ulsam_c": {"params": (0.01, 0.1), "macs": 0.01},
    "mobilenetv2_100_ulsam_add": {"params": (0.1, 0.1), "macs": 0.01},
}


def test_all_variants_registered():
    assert set(ULSAM_MODELS) == set(PRINTED_UNITS)


@pytest.mark.parametrize("name", ULSAM_MODELS)
def test_only_the_placed_blocks_differ_from_timm_vanilla(name):
    """Every non-ULSAM parameter name/shape is timm's; replaced blocks are gone; the parameter
    change is exactly -(removed timm blocks) + sum(5m + 3g)."""
    model, vanilla = vizoo.create_model(name), _vanilla(name)
    ulsam = {p: m for p, m in model.named_modules() if isinstance(m, ULSAM)}
    assert ulsam and all(m.num_groups == 4 for m in ulsam.values())
    ours = {k: v.shape for k, v in model.state_dict().items() if not any(k.startswith(p + ".") for p in ulsam)}
    theirs = {k: v.shape for k, v in vanilla.state_dict().items()}
    removed_blocks = {".".join(k.split(".")[:3]) for k in theirs.keys() - ours.keys()}
    assert ours.items() <= theirs.items(), "a non-ULSAM layer differs from timm's vanilla model"
    assert removed_blocks <= set(ulsam), removed_blocks
    vmods = dict(vanilla.named_modules())
    expected = -sum(count_params(vmods[b]) for b in removed_blocks) + sum(5 * m.channels + 3 * 4 for m in ulsam.values())
    assert count_params(model) - count_params(vanilla) == expected


_vanilla_macs_cache: dict[str, tuple[int, int]] = {}


def _vanilla_counts(name: str) -> tuple[int, int]:
    key = name.split("_ulsam")[0]
    if key not in _vanilla_macs_cache:
        v = _vanilla(name)
        _vanilla_macs_cache[key] = (count_params(v), count_macs(v, (3, 224, 224)))
    return _vanilla_macs_cache[key]


@pytest.mark.parametrize("name", ULSAM_MODELS)
def test_param_and_mac_changes_match_the_paper(name):
    """Paper rows are vanilla-figure + change, rounded; compare our change with the paper's within
    1% or the printed precision (one unit of the variant's last digit; params also half a unit of
    the vanilla figure, which the paper rounds to 0.1M), whichever is larger. For MV2 cfg A/B/C
    (printed to 0.01M) that is 1%: e.g. A = -22.69 - 15.48 + 0.038 + 0.016 = -38.12M."""
    pm = get_pretrained_cfg(name).paper_metrics
    model = vizoo.create_model(name)
    v_params, v_macs = _vanilla_counts(name)
    d_params = (count_params(model) - v_params) / 1e6
    d_macs = (count_macs(model, (3, 224, 224)) - v_macs) / 1e6
    paper_d_params = pm["params_m"] - pm["vanilla"]["params_m"]
    paper_d_macs = (pm["macs_g"] - pm["vanilla"]["macs_g"]) * 1e3
    units = PRINTED_UNITS[name]
    tol_p = max(0.01 * abs(paper_d_params), units["params"][0] + units["params"][1] / 2)
    tol_m = max(0.01 * abs(paper_d_macs), units["macs"])
    assert abs(d_macs - paper_d_macs) <= tol_m, (d_macs, paper_d_macs)
    assert abs(d_params - paper_d_params) <= tol_p, (d_params, paper_d_params)


def test_g_and_position_kwargs():
    m8 = vizoo.create_model("mobilenetv1_050_ulsam", g=8)
    mods = [m for m in m8.modules() if isinstance(m, ULSAM)]
    assert [m.num_groups for m in mods] == [8]
    assert count_params(m8) - count_params(vizoo.create_model("mobilenetv1_050_ulsam")) == 3 * (8 - 4)
    at7 = vizoo.create_model("mobilenetv1_050_ulsam", position=7)
    assert isinstance(at7.blocks[3][1], ULSAM) and not isinstance(at7.blocks[3][5], ULSAM)
    with pytest.raises(ValueError, match="layers 7..11"):
        vizoo.create_model("mobilenetv1_050_ulsam", position=6)
    with pytest.raises(ValueError, match="divisible"):
        vizoo.create_model("mobilenetv2_100_ulsam_a", g=7)


@pytest.mark.parametrize("name", ["mobilenetv1_050_ulsam", "mobilenetv2_100_ulsam_c"])
def test_forward_backward_reaches_ulsam(name):
    model = vizoo.create_model(name, num_classes=10).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    for mod in (m for m in model.modules() if isinstance(m, ULSAM)):
        assert mod.conv_dws.weight.grad.abs().sum() > 0
        assert mod.conv_point.weight.grad.abs().sum() > 0


def test_configs_say_no_official_weights():
    for name in ULSAM_MODELS:
        cfg = get_pretrained_cfg(name)
        assert not cfg.has_weights and "No official checkpoint" in cfg.notes
        assert cfg.filter_fn is ulsam_checkpoint_filter and cfg.input_size == (3, 224, 224)

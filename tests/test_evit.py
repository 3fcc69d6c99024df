"""EViT: token reorganisation against independent references (timm DeiT, the paper's token and
MAC tables, a plain softmax, a stable sort, exported files run by their runtimes)."""
import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import vizoo
from vizoo.counting import count_macs
from vizoo.data.bundled import normalize, photo_images
from vizoo.hub import CheckpointError
from vizoo.layers.export_mode import export_mode
from vizoo.layers.token_reorg import EXPORT_FORMS, TokenReorganizer, class_attention, keep_count
from vizoo.models.evit import EViTAttention, convert_official_checkpoint, keep_rate_schedule
from vizoo.models.evit_visualize import kept_patch_masks, save_kept_patches

TINY = "evit_deit_tiny_patch16_224"
SMALL32 = "evit_vit_tiny_patch4_32"


def _photos(model, n=4):
    cfg = model.pretrained_cfg
    return normalize(photo_images(n, cfg["input_size"][-1]), cfg["mean"], cfg["std"])


def _sharpen_attention(model, scale=8.0):
    """Random init gives near-uniform attention; scaled q/k give distinct, decisive scores (like
    a trained model), so a kept-token comparison is not decided by rounding."""
    with torch.no_grad():
        for blk in model.blocks:
            dim = blk.attn.qkv.in_features
            blk.attn.qkv.weight[:2 * dim] *= scale
    return model


@pytest.fixture(scope="module")
def sharp_tiny():
    """EViT-DeiT-T r = 0.7 with fusion, decisive attention, eval mode (tests restore its rate)."""
    torch.manual_seed(0)
    return _sharpen_attention(vizoo.create_model(f"{TINY}.r0p7_fuse").eval())


# --- token counts ---------------------------------------------------------------------------------

def test_keep_count_uses_python_floats():
    assert keep_count(0.6, 45) == 27
    assert math.ceil(float(torch.tensor(0.6) * 45)) == 28  # the float32 hazard it avoids
    assert keep_count(0.7, 196) == 138 and keep_count(1.0, 196) == 196
    with pytest.raises(ValueError, match="keep_rate"):
        keep_count(0.0, 10)


@pytest.mark.parametrize("rate,fuse,after", [
    (0.9, True, (178, 162, 147)), (0.8, True, (158, 128, 104)), (0.7, True, (139, 99, 71)),
    (0.6, True, (119, 73, 45)), (0.5, True, (99, 51, 27)), (0.9, False, (177, 160, 144)),
    (0.7, False, (138, 97, 68)), (0.5, False, (98, 49, 25)),
])
def test_token_counts_match_paper_table(rate, fuse, after):
    model = vizoo.create_model(TINY, keep_rate=rate, fuse_token=fuse)
    counts = model.token_counts()
    assert (counts[3], counts[6], counts[9]) == after
    assert counts[:3] == [196] * 3 and counts[9:] == [after[2]] * 3


@pytest.fixture(scope="module")
def deit_s_fused():
    return vizoo.create_model("evit_deit_small_patch16_224.r0p7_fuse")


@pytest.mark.parametrize("tag", ["r0p9_fuse", "r0p8_fuse", "r0p7_fuse", "r0p6_fuse", "r0p5_fuse"])
def test_macs_match_paper(tag, deit_s_fused):
    cfg = vizoo.get_pretrained_cfg(f"evit_deit_small_patch16_224.{tag}")
    deit_s_fused.set_keep_rate(cfg.model_kwargs["keep_rate"])
    try:
        macs = count_macs(deit_s_fused, (3, 224, 224)) / 1e9
    finally:
        deit_s_fused.set_keep_rate(None)
    paper = cfg.paper_metrics["macs_g"]
    assert abs(macs - paper) / paper < 0.03, (macs, paper)


# --- equality with timm DeiT ----------------------------------------------------------------------

def test_keep_rate_one_equals_timm_deit():
    deit = timm.create_model("deit_tiny_patch16_224").eval()
    evit = vizoo.create_model(f"{TINY}.r0p7_fuse").eval()
    evit.load_state_dict(deit.state_dict())  # EViT adds no parameters: strict load
    x = _photos(evit, 2)
    with torch.no_grad():
        ref = deit(x)
        assert (evit(x, keep_rate=1.0) - ref).abs().max() <= 1e-5
        plain = vizoo.create_model(TINY, keep_rate=1.0).eval()
        plain.load_state_dict(deit.state_dict())
        assert (plain(x) - ref).abs().max() <= 1e-5
        assert (evit(x) - ref).abs().max() > 1e-3  # r = 0.7 really changes the computation


def test_class_attention_is_row_zero_of_full_attention():
    attn = EViTAttention(64, num_heads=4, qkv_bias=True).eval()
    timm_attn = timm.layers.Attention(64, num_heads=4, qkv_bias=True).eval()
    timm_attn.load_state_dict(attn.state_dict())
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        out, cls_attn = attn(x, return_cls_attn=True)
        q, k, _ = attn.qkv(x).reshape(3, 17, 3, 4, 16).permute(2, 0, 3, 1, 4)
        full = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)  # (B, H, N, N)
        assert torch.allclose(cls_attn, full[:, :, 0, 1:].mean(1), atol=1e-6)
        assert torch.allclose(class_attention(q[:, :, :1], k, 16 ** -0.5), full[:, :, 0, 1:].mean(1), atol=1e-6)
        assert torch.allclose(out, timm_attn(x), atol=1e-6)


# --- selection forms ------------------------------------------------------------------------------

def _block_inputs(model, n_images=4):
    """Post-attention tokens and class attention of block 3 (0-based) on real photographs."""
    x = _photos(model, n_images)
    with torch.no_grad():
        t = model._pos_embed(model.patch_embed(x))
        for blk in model.blocks[:3]:
            t = blk(t)
        y, cls_attn = model.blocks[3].attn(model.blocks[3].norm1(t), return_cls_attn=True)
    return t + y, cls_attn


@pytest.mark.parametrize("fuse", [True, False])
def test_export_forms_select_the_same_tokens(fuse, sharp_tiny):
    tokens, cls_attn = _block_inputs(sharp_tiny)
    keep = keep_count(0.7, cls_attn.shape[1])
    layer = TokenReorganizer(fuse_token=fuse)
    eager, idx = layer(tokens, cls_attn, keep)
    # independent reference: the official rule, gather the topk and sum the rest in index order
    ref_idx = cls_attn.topk(keep, dim=1).indices
    assert torch.equal(idx, ref_idx)
    for b in range(tokens.shape[0]):
        assert torch.equal(eager[b, 1:keep + 1], tokens[b, 1:][ref_idx[b]])
        if fuse:
            rest = sorted(set(range(cls_attn.shape[1])) - set(ref_idx[b].tolist()))
            fused = (cls_attn[b, rest, None] * tokens[b, 1:][rest]).sum(0)
            assert torch.allclose(eager[b, -1], fused, atol=1e-5)
    for form in EXPORT_FORMS:
        layer.export_form = form
        with export_mode(layer):
            out, _ = layer(tokens, cls_attn, keep)
        assert out.shape == eager.shape
        assert torch.equal(out[:, :keep + 1], eager[:, :keep + 1]), form  # kept tokens: exact copies
        assert torch.allclose(out, eager, atol=1e-5), form


def test_rank_form_breaks_exact_ties_like_a_stable_sort():
    attn = torch.tensor([[0.1, 0.3, 0.3, 0.05, 0.3, 0.2, 0.05]])
    tokens = torch.randn(1, 8, 5)
    layer = TokenReorganizer(fuse_token=True, export_form="rank_matmul")
    with export_mode(layer):
        out, _ = layer(tokens, attn, 4)
    order = torch.sort(-attn, dim=1, stable=True).indices[0]  # descending, lower index first
    assert torch.equal(out[0, 1:5], tokens[0, 1:][order[:4]])
    rest = order[4:]
    assert torch.allclose(out[0, 5], (attn[0, rest, None] * tokens[0, 1:][rest]).sum(0), atol=1e-6)


def test_model_export_form_equals_eager_on_real_images(sharp_tiny):
    x = _photos(sharp_tiny, 4)
    try:
        with torch.no_grad():
            for rate in (0.7, 0.5):
                ref = sharp_tiny(x, keep_rate=rate)
                for form in EXPORT_FORMS:
                    for blk in sharp_tiny.reorg_blocks:
                        blk.reorg.export_form = form
                    with export_mode(sharp_tiny):
                        assert (sharp_tiny(x, keep_rate=rate) - ref).abs().max() <= 1e-5, (rate, form)
    finally:
        for blk in sharp_tiny.reorg_blocks:
            blk.reorg.export_form = "rank_matmul"


# --- run-time keep rate, schedule -----------------------------------------------------------------

def test_keep_rate_changes_at_run_time(sharp_tiny):
    model = sharp_tiny
    x = _photos(model, 1)
    try:
        with torch.no_grad():
            _, kept = model.forward_features(x, return_kept=True)
            assert [k.shape[1] for k in kept] == [138, 98, 70]  # paper table, r = 0.7 fused
            by_arg = model(x, keep_rate=0.5)
            _, kept = model.forward_features(x, keep_rate=0.5, return_kept=True)
            assert [k.shape[1] for k in kept] == [98, 50, 26]
            model.set_keep_rate(0.5)
            assert model.keep_rate == 0.5 and model.token_counts()[9] == 27
            assert torch.allclose(model(x), by_arg, atol=1e-6)
            model.set_keep_rate(None)
            assert model.keep_rate == 0.7 and model.token_counts()[9] == 71
            tokens = [None] * 3 + [100] + [None] * 8
            _, kept = model.forward_features(x, keep_tokens=tokens, return_kept=True)
            assert [k.shape[1] for k in kept] == [100, 71, 51]  # ceil(0.7 * 101), ceil(0.7 * 72)
        with pytest.raises(ValueError):
            model.set_keep_rate(1.5)
    finally:
        model.set_keep_rate(None)


def test_keep_rate_schedule_is_the_papers_cosine():
    assert keep_rate_schedule(5, 0.7, 10, 100) == 1.0
    assert keep_rate_schedule(10, 0.7, 10, 100) == pytest.approx(1.0)
    assert keep_rate_schedule(60, 0.7, 10, 100) == pytest.approx(0.85)  # half way: (1 + r) / 2
    assert keep_rate_schedule(35, 0.7, 10, 100) == pytest.approx(0.7 + 0.3 * (1 + math.cos(math.pi / 4)) / 2)
    assert keep_rate_schedule(110, 0.7, 10, 100) == pytest.approx(0.7)
    assert keep_rate_schedule(0.0, 0.7, 0, 0) == 0.7  # finetune recipe: target from the first step
    model = vizoo.create_model(TINY, keep_rate=0.6, shrink_start_epoch=1, shrink_epochs=2)
    model.on_train_step(0.5)
    assert model.keep_rate == 1.0 and model.token_counts()[-1] == 196
    model.on_train_step(2.0)
    assert model.keep_rate == pytest.approx(0.8)
    model.on_train_step(3.5)
    assert model.keep_rate == pytest.approx(0.6)


# --- checkpoints ----------------------------------------------------------------------------------

def test_official_checkpoint_dicts_load(tmp_path):
    deit = timm.create_model("deit_tiny_patch16_224")
    sd = deit.state_dict()
    plain = tmp_path / "evit_official.pth"
    torch.save({"model": sd, "epoch": 299}, plain)
    model = vizoo.create_model(f"{TINY}.r0p7_fuse", pretrained=str(plain))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    # main.py also pickles its argparse.Namespace, which weights_only loading refuses
    with_args = tmp_path / "checkpoint.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=5e-4), "epoch": 3}, with_args)
    with pytest.raises(CheckpointError):
        vizoo.create_model(TINY, pretrained=str(with_args))
    converted = convert_official_checkpoint(with_args, tmp_path / "converted")
    model = vizoo.create_model(TINY, pretrained=str(converted))
    assert torch.equal(model.pos_embed, sd["pos_embed"])


def test_deit_224_weights_load_into_higher_resolution_variant(tmp_path):
    sd = timm.create_model("deit_small_patch16_224").state_dict()
    path = tmp_path / "deit_s.pth"
    torch.save({"model": sd}, path)
    model = vizoo.create_model("evit_deit_small_patch16_272", pretrained=str(path))
    assert model.pos_embed.shape == (1, 17 * 17 + 1, 384)
    grid = sd["pos_embed"][:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    official = F.interpolate(grid, size=17, mode="bicubic", align_corners=False)  # the official resize
    assert torch.allclose(model.pos_embed[:, 1:], official.permute(0, 2, 3, 1).reshape(1, -1, 384), atol=1e-5)
    assert torch.equal(model.pos_embed[:, :1], sd["pos_embed"][:, :1])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="drop_loc"):
        vizoo.create_model(TINY, drop_loc=(3, 12))
    with pytest.raises(ValueError, match="export_form"):
        vizoo.create_model(TINY, export_form="sort")
    with pytest.raises(ValueError, match="class token"):
        vizoo.create_model(TINY, global_pool="avg")


# --- visualisation --------------------------------------------------------------------------------

def test_kept_patch_masks_shrink_and_png_is_written(tmp_path, sharp_tiny):
    model = sharp_tiny
    images = photo_images(2, 224)
    x = normalize(images, model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    masks = kept_patch_masks(model, x)
    assert masks.shape == (2, 3, 14, 14)
    # a patch can only disappear; fused tokens are no patch
    assert not (masks[:, 1:] & ~masks[:, :-1]).any()
    assert masks[:, 0].flatten(1).sum(1).tolist() == [138, 138]
    assert (masks[:, 2].flatten(1).sum(1) <= 70).all()
    # the official rule traced by hand for block 4: the top-138 class attention of the block input
    with torch.no_grad():
        t = model._pos_embed(model.patch_embed(x))
        for blk in model.blocks[:3]:
            t = blk(t)
        _, cls_attn = model.blocks[3].attn(model.blocks[3].norm1(t), return_cls_attn=True)
    top = cls_attn.topk(138, dim=1).indices
    assert torch.equal(masks[:, 0].flatten(1), torch.zeros(2, 196, dtype=torch.bool).scatter(1, top, True))
    path = save_kept_patches(model, images, tmp_path / "kept.png")
    from PIL import Image

    img = Image.open(path)
    assert img.width > 4 * 224 and img.height > 2 * 224


def test_visualize_cli_writes_one_panel_per_reorganising_block(tmp_path, capsys):
    from PIL import Image

    from vizoo.cli import main
    from vizoo.hub import save_model

    model = vizoo.create_model(f"{SMALL32}.r0p7_fuse")
    ckpt = save_model(model, tmp_path / "evit.safetensors")
    photo = tmp_path / "photo.png"
    Image.fromarray((photo_images(1, 64)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(photo)
    out = tmp_path / "kept.png"
    assert main(["visualize", str(photo), "--checkpoint", str(ckpt), "--photos", "3", "--out", str(out)]) == 0
    reducing = sum(b.reorganizes for b in model.blocks)
    assert reducing == 3
    panel, gap = 32, 4  # input + one panel per reorganising block, 4 px apart; 16 px title band
    for path, rows in ((out, 1), (tmp_path / "kept_photos.png", 3)):
        img = Image.open(path)
        assert img.width == (1 + reducing) * (panel + gap) - gap
        assert img.height == 16 + rows * (panel + 4)
    assert "kept_photos.png" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="no weights given"):  # the user is told, then refused
        assert main(["visualize", "mobilenetv2_100_evos0", "--photos", "1", "--out", str(out)]) == 2
    assert "does not reorganise tokens" in capsys.readouterr().err


def test_visualize_out_may_be_a_folder(tmp_path, capsys):
    from vizoo.cli import main
    from vizoo.hub import save_model
    from vizoo.visualize import DEFAULT_OUT, output_png

    ckpt = save_model(vizoo.create_model(f"{SMALL32}.r0p7_fuse"), tmp_path / "evit.safetensors")
    existing = tmp_path / "figures.v1"  # an existing folder, even one with a dot in its name
    existing.mkdir()
    for out, expected in ((existing, existing / DEFAULT_OUT),
                          (f"{tmp_path / 'new'}/", tmp_path / "new" / DEFAULT_OUT),    # trailing separator
                          (tmp_path / "plain", tmp_path / "plain" / DEFAULT_OUT)):     # no suffix
        assert main(["visualize", "--checkpoint", str(ckpt), "--photos", "1", "--out", str(out)]) == 0
        assert expected.is_file() and f"written: {expected}" in capsys.readouterr().out
    assert output_png(tmp_path / "kept.png") == tmp_path / "kept.png"
    assert main(["visualize", "--checkpoint", str(ckpt), "--photos", "1", "--out", str(tmp_path / "k.xyz")]) == 2
    assert "give a .png file or a folder" in capsys.readouterr().err


# --- exported files -------------------------------------------------------------------------------

def test_exported_tflite_and_coreml_match_eager(tmp_path):
    """A small EViT exported by vizoo's exporter: the files, run by their runtimes on real photos,
    give the eager model's logits, so every block kept the same tokens."""
    torch.manual_seed(0)
    model = vizoo.create_model(f"{SMALL32}.r0p7_fuse", depth=4, drop_loc=(1, 2, 3)).eval()
    model = _sharpen_attention(model, 4.0)
    report = vizoo.export(model, formats=("tflite", "coreml"), out_dir=tmp_path, verify_images=8,
                          latency=False)
    for fmt in ("tflite", "coreml"):
        result = report.result(fmt)
        assert result.status == "ok", result.reason
        fn = next(iter(result.verification["functions"].values()))
        assert fn["parity_eager"]["n_samples"] == 8
        assert fn["parity_eager"]["max_abs_diff"] <= 1e-4, fmt


def test_configs_parse_and_build():
    from pathlib import Path

    from vizoo.engine.config import TrainConfig

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "evit").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        cfg = TrainConfig.from_yaml(f).validate()
        assert vizoo.registry.is_model(cfg.model), f
        kwargs = dict(cfg.model_kwargs)
        assert 0 < kwargs["keep_rate"] < 1 and {"shrink_start_epoch", "shrink_epochs"} <= set(kwargs)
        if "digits" in f.name:
            vizoo.create_model(cfg.model, **kwargs)

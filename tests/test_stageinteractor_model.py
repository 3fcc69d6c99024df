"""StageInteractor: shapes, gradients, box detaching, filter reuse, sampling, IoF attention,
inference outputs, parameter budget and the official-checkpoint key mapping."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vizoo
from vizoo.hub import load_state_dict_into
from vizoo.layers.adaptive_mixing import CascadeAdaptiveMixing
from vizoo.layers.box_attention import BoxSelfAttention, iof_attention_bias
from vizoo.layers.box_ops import refine_xyzr, whole_image_xyzr, xyxy_to_xyzr, xyzr_to_xyxy
from vizoo.layers.query_sampling import SubBoxSampler, level_weights, sample_multilevel
from vizoo.models.stageinteractor import StageInteractor, stageinteractor_filter_fn

TINY = "stageinteractor_tiny"


def _tiny(**kwargs):
    return vizoo.create_model(TINY, **kwargs)


def _open_value_path(model):
    """W_v starts at zero, which cuts the sampled features off the queries; give it weights."""
    with torch.no_grad():
        for stage in model.stages:
            stage.mixing.out_proj.weight.normal_(0, 0.02)


def _images(b=2, size=128):
    return torch.randn(b, 3, size, size)


# --- the whole model ----------------------------------------------------------------------------

def test_tiny_forward_shapes_and_gradients():
    model = _tiny().train()
    assert (model.num_classes, model.num_queries, model.num_stages) == (5, 24, 4)
    assert model.reuse and model.csla and model.csla_iou == 0.5
    assert model.pretrained_cfg["paper_url"] == "https://arxiv.org/abs/2304.04978"
    x = _images()
    out = model(x)
    assert len(out) == 4
    for o in out:
        assert set(o) == {"logits", "boxes"}
        assert o["logits"].shape == (2, 24, 5) and o["boxes"].shape == (2, 24, 4)
        assert torch.isfinite(o["logits"]).all() and torch.isfinite(o["boxes"]).all()
    # at initialisation W_v = 0: no gradient can reach the backbone yet (by design)
    sum(o["logits"].sum() + o["boxes"].sum() for o in out).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.backbone.parameters())

    model.zero_grad(set_to_none=True)
    _open_value_path(model)
    out = model(x)
    loss = sum(o["logits"].sigmoid().sum() + o["boxes"].square().mean() for o in out)
    loss.backward()
    for name, p in [("backbone", next(model.backbone.parameters())),
                    ("neck", model.neck.lateral[0].weight),
                    ("queries", model.query_embed.weight),
                    ("stage-0 generator", model.stages[0].mixing.generator.weight),
                    ("stage-3 sub-box adapter", model.stages[3].mixing.sub_adapters[1].weight),
                    ("stage-0 sampling offsets", model.stages[0].sampler.sub_box_offsets.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("detach", [True, False])
def test_boxes_are_detached_between_stages(detach):
    model = _tiny(detach_boxes=detach).train()
    _open_value_path(model)
    with torch.no_grad():   # box heads start at zero, which would hide every path but their own
        for stage in model.stages:
            stage.reg_head.weight.normal_(0, 0.01)
    out = model(_images())
    out[1]["boxes"].sum().backward()       # only stage 1's boxes
    stage0 = model.stages[0]
    reg0 = [p.grad for p in [*stage0.reg_branch.parameters(), *stage0.reg_head.parameters()]]
    if detach:   # stage 0's box head feeds only stage 0's box, which stage 1 receives detached
        assert all(g is None for g in reg0)
        # the query path is not detached: stage 0's mixing still gets a gradient
        assert model.stages[0].mixing.generator.weight.grad.abs().sum() > 0
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in reg0)


def test_reuse_leaves_stages_before_reuse_from_unchanged():
    full = _tiny(reuse=True).eval()
    base = _tiny(reuse=False).eval()
    _open_value_path(full)     # with W_v = 0 the mixing (and thus reuse) cannot change the output
    own = base.state_dict()
    shared = {k: v for k, v in full.state_dict().items() if k in own and own[k].shape == v.shape}
    base.load_state_dict(shared, strict=False)
    assert not any("adapters" in k or "gate" in k for k in own)
    x = _images()
    with torch.no_grad():
        a, b = full(x), base(x)
    for s in range(full.reuse_from):      # the bank is reset there: identical
        assert torch.equal(a[s]["logits"], b[s]["logits"]) and torch.equal(a[s]["boxes"], b[s]["boxes"])
    assert not torch.allclose(a[2]["logits"], b[2]["logits"])


def test_img_sizes_set_the_initial_whole_image_boxes_and_padding():
    model = _tiny().eval()
    x = torch.randn(2, 3, 100, 120)         # padded to 128 x 128 inside
    sizes = torch.tensor([[100.0, 120.0], [60.0, 90.0]])
    with torch.no_grad():
        out = model(x, sizes)
    # the box heads start at zero, so stage 0 returns its input boxes: each whole image
    expected = torch.tensor([[0.0, 0.0, 120.0, 100.0], [0.0, 0.0, 90.0, 60.0]])
    torch.testing.assert_close(out[0]["boxes"], expected[:, None].expand(2, 24, 4), atol=1e-4, rtol=0)


def test_predict_and_forward_export():
    model = _tiny().eval()
    _open_value_path(model)
    with torch.no_grad():
        for stage in model.stages:
            stage.reg_head.weight.normal_(0, 0.01)
    x = _images()
    with torch.no_grad():
        last = model(x)[-1]
        scores, boxes = model.forward_export(x)
    assert torch.equal(scores, last["logits"].sigmoid()) and torch.equal(boxes, last["boxes"])
    dets = model.predict(x)
    C = model.num_classes
    for b, det in enumerate(dets):
        assert det["boxes"].shape == (24, 4) and det["scores"].shape == (24,)
        assert det["labels"].dtype == torch.int64 and int(det["labels"].max()) < C
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        # every (score, label, box) is one (query, class) entry of the last stage
        flat = scores[b].flatten()
        assert torch.equal(det["scores"], flat.sort(descending=True).values[:24])
        for s, lab, box in zip(det["scores"], det["labels"], det["boxes"]):
            q = torch.nonzero(scores[b, :, lab] == s)[0, 0]
            assert torch.equal(box, boxes[b, q])


# --- building blocks ----------------------------------------------------------------------------

def test_xyzr_round_trip_and_refinement():
    xy = torch.rand(50, 2) * 100
    wh = torch.rand(50, 2) * 200 + 1
    xyxy = torch.cat([xy, xy + wh], -1)
    xyzr = xyxy_to_xyzr(xyxy)
    torch.testing.assert_close(xyzr_to_xyxy(xyzr), xyxy, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xyzr[:, 2], 0.5 * torch.log2(wh[:, 0] * wh[:, 1]))
    torch.testing.assert_close(xyzr[:, 3], torch.log2(wh[:, 1] / wh[:, 0]))
    # refinement: the centre moves by dx * w, dy * h; z / r shift
    delta = torch.tensor([0.5, -0.25, 1.0, 0.0]).expand(50, 4)
    moved = xyzr_to_xyxy(refine_xyzr(xyzr, delta))
    centre = 0.5 * (xyxy[:, :2] + xyxy[:, 2:]) + torch.stack([0.5 * wh[:, 0], -0.25 * wh[:, 1]], -1)
    torch.testing.assert_close(0.5 * (moved[:, :2] + moved[:, 2:]), centre, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(moved[:, 2:] - moved[:, :2], 2 * wh, rtol=1e-5, atol=1e-3)
    whole = xyzr_to_xyxy(whole_image_xyzr(torch.tensor([[480.0, 640.0]]), 3))
    torch.testing.assert_close(whole, torch.tensor([[0.0, 0.0, 640.0, 480.0]]).expand(1, 3, 4),
                               rtol=1e-6, atol=1e-3)


def _bilinear_reference(feat: np.ndarray, x: float, y: float, stride: int) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    # pixel (x, y) -> continuous feature index (row, col) with cell centres at integers
    coords = np.array([[y / stride - 0.5], [x / stride - 0.5]])
    return np.array([map_coordinates(c, coords, order=1, mode="nearest")[0] for c in feat])


def test_sampling_equals_bilinear_interpolation():
    G, C_g, H, W, stride = 2, 3, 9, 11, 8
    feat = torch.randn(1, G * C_g, H, W)
    # interior points (away from the zero-padded border)
    xy = torch.stack([torch.rand(1, 1, G, 7) * (W - 2) + 1,
                      torch.rand(1, 1, G, 7) * (H - 2) + 1], -1) * stride
    out = sample_multilevel([feat], [stride], xy, torch.randn(1, 1, G, 7))      # one level: weight 1
    assert out.shape == (1, 1, G, 7, C_g)
    f = feat[0].numpy()
    for g in range(G):
        for m in range(7):
            ref = _bilinear_reference(f[g * C_g:(g + 1) * C_g], *xy[0, 0, g, m].tolist(), stride)
            np.testing.assert_allclose(out[0, 0, g, m].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_sub_box_sampler_with_zero_offsets_reads_the_box_centre():
    G, C_g, P, K, stride = 4, 2, 3, 2, 4
    sampler = SubBoxSampler(G * C_g, G, P, K)
    with torch.no_grad():
        for p in sampler.parameters():
            p.zero_()
    feat = torch.randn(1, G * C_g, 16, 20)
    boxes = torch.tensor([[[20.0, 14.0, 50.0, 40.0], [33.3, 21.7, 60.1, 55.5]]])
    xyzr = xyxy_to_xyzr(boxes)
    q = torch.randn(1, 2, G * C_g)
    xy, z = sampler.points(q, xyzr)
    torch.testing.assert_close(xy, xyzr[:, :, None, None, :2].expand(1, 2, G, P * K, 2))
    torch.testing.assert_close(z, xyzr[:, :, None, None, 2].expand(1, 2, G, P * K))
    with torch.no_grad():
        out = sampler([feat], [stride], q, xyzr)
    f = feat[0].numpy()
    for n in range(2):
        cx, cy = xyzr[0, n, :2].tolist()
        for g in range(G):
            ref = _bilinear_reference(f[g * C_g:(g + 1) * C_g], cx, cy, stride)
            for m in range(P * K):
                np.testing.assert_allclose(out[0, n, g, m].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_level_weights():
    w = level_weights(torch.tensor([3.0, 4.5, 6.0]), [3.0, 4.0, 5.0, 6.0], tau=2.0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    assert w[0].argmax() == 0 and w[2].argmax() == 3
    torch.testing.assert_close(w[1, 1], w[1, 2])
    ref = torch.softmax(-torch.tensor([0.0, 1.0, 4.0, 9.0]) / 2.0, 0)
    torch.testing.assert_close(w[0], ref)


def _iof_direct(a, b):
    out = torch.zeros(len(a), len(b))
    for i, (x1, y1, x2, y2) in enumerate(a.tolist()):
        for j, (u1, v1, u2, v2) in enumerate(b.tolist()):
            iw, ih = max(0.0, min(x2, u2) - max(x1, u1)), max(0.0, min(y2, v2) - max(y1, v1))
            out[i, j] = iw * ih / max((x2 - x1) * (y2 - y1), 1e-6)
    return out


def test_iof_bias_and_attention_match_direct_computation():
    torch.manual_seed(1)
    B, N, D, H = 2, 6, 32, 4
    xy = torch.rand(B, N, 2) * 50
    boxes = torch.cat([xy, xy + torch.rand(B, N, 2) * 40 + 2], -1)
    tau = torch.rand(H) * 4
    bias = iof_attention_bias(boxes, tau)
    for b in range(B):
        ref = torch.log(_iof_direct(boxes[b], boxes[b]) + 1e-7)[None] * tau[:, None, None]
        torch.testing.assert_close(bias[b], ref, rtol=1e-5, atol=1e-5)
    # the attention equals nn.MultiheadAttention (whose weights load unchanged) plus the residual
    attn = BoxSelfAttention(D, H)
    mha = nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        attn.iof_tau.copy_(tau)
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias.normal_())
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias.normal_())
    x = torch.randn(B, N, D)
    ref = x + mha(x, x, x, attn_mask=bias.flatten(0, 1), need_weights=False)[0]
    torch.testing.assert_close(attn(x, boxes), ref, rtol=1e-5, atol=1e-5)


def _ln2(x):
    mu = x.mean(dim=(-2, -1), keepdim=True)
    var = x.var(dim=(-2, -1), keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + 1e-5)


def test_reuse_mixing_at_init_equals_the_gated_closed_form():
    """Zero adapters and gates at 0.5: each reused step sees the raw features (R_j = V) and the
    filter 1/4 M_j + 3/4 M_s; the spatial filter is [S_s ; 1/4 S_prev + 3/4 S_s]."""
    torch.manual_seed(2)
    B, N, D, G, P, K, P_out, R = 2, 3, 32, 4, 2, 3, 8, 2
    C, PK, BNG = D // G, P * K, B * N * G
    mix = CascadeAdaptiveMixing(D, G, P, K, P_out, num_reused=R)
    with torch.no_grad():
        mix.out_proj.weight.normal_(0, 0.05)
        mix.generator.weight.normal_(0, 0.05)
    v, q = torch.randn(B, N, G, PK, C), torch.randn(B, N, D)
    bank = [(torch.randn(BNG, C, C), torch.randn(BNG, P_out, P + 1, K)) for _ in range(R)]
    out, (M_out, S_out) = mix(v, q, bank)

    params = (q @ mix.generator.weight.T + mix.generator.bias).reshape(BNG, -1)
    M = params[:, :C * C].reshape(BNG, C, C)
    S = params[:, C * C:].reshape(BNG, P_out // 2, P, K)
    b = mix.mix_bias(q).reshape(BNG, C + P_out)
    b_j = mix.reuse_bias.bias.view(G, R, C).repeat(B * N, 1, 1)
    V = v.reshape(BNG, PK, C)
    M_last = 0.25 * bank[-1][0] + 0.75 * M
    h = F.relu(_ln2(V @ M_last + b_j[:, -1:]))
    S_full = torch.cat([S, 0.25 * bank[-1][1][:, :P_out // 2, :P] + 0.75 * S], 1).reshape(BNG, P_out, PK)
    y = F.relu(_ln2(S_full @ h + b[:, C:, None]))
    ref = F.layer_norm(q + mix.out_proj(y.reshape(B, N, -1)), (D,), mix.out_norm.weight, mix.out_norm.bias)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(M_out, M)
    torch.testing.assert_close(S_out.reshape(BNG, P_out, PK), S_full)


# --- parameter budget (R50 config, built on the meta device) -------------------------------------

def _decoder_counts(**kwargs):
    with torch.device("meta"):
        model = vizoo.create_model("stageinteractor_r50_1x", **kwargs)
    return model, [sum(p.numel() for p in st.parameters()) for st in model.stages]


def test_r50_decoder_parameter_budget():
    model, per_stage = _decoder_counts()
    spec = [22.7, 18.5, 17.1, 17.6, 18.2, 18.7]         # millions, derived from the official config
    for s, (n, ref) in enumerate(zip(per_stage, spec)):
        assert abs(n / 1e6 - ref) / ref < 0.02, (s, n)
    assert abs(sum(per_stage) / 1e6 - 113) / 113 < 0.02
    adapters = [sum(p.numel() for n, p in st.named_parameters()
                    if n.split(".")[1] in ("sub_adapters", "axis_adapters", "filter_gates", "reuse_bias",
                                           "pattern_gate", "point_gate")) for st in model.stages]
    assert adapters[:2] == [0, 0]
    score = 4 * 4 * 8 * (256 + 1)    # the official no-op sub-box score Linear, dropped here
    for R, (n, ref) in enumerate(zip(adapters[2:], [0.66, 1.22, 1.77, 2.33]), start=1):
        assert abs((n + R * score) / 1e6 - ref) < 0.01, adapters

    base, base_stages = _decoder_counts(reuse=False)
    assert not any("adapters" in n or "gate" in n for n, _ in base.named_parameters())
    gen_wv = sum(sum(p.numel() for p in (*st.mixing.generator.parameters(), *st.mixing.out_proj.parameters()))
                 for st in base.stages)
    assert abs(gen_wv / 1e6 - 105) / 105 < 0.02
    assert base_stages[2:] == [base_stages[1]] * 4       # every later stage is a plain stage 1


# --- official checkpoint mapping ----------------------------------------------------------------

def _official_stage_shapes(s, D, G, P, K, P_out, F_dim, heads, C, reuse_from=2):
    """Official key -> shape for stage s, from the architecture description alone."""
    Cg = D // G
    R = s - reuse_from + 1 if s >= reuse_from else 0
    fresh = P_out // 2 if R else P_out
    sh = {
        "attention.attn.in_proj_weight": (3 * D, D), "attention.attn.in_proj_bias": (3 * D,),
        "attention.attn.out_proj.weight": (D, D), "attention.attn.out_proj.bias": (D,),
        "attention_norm.weight": (D,), "attention_norm.bias": (D,), "iof_tau": (heads,),
        "ffn.layers.0.0.weight": (F_dim, D), "ffn.layers.0.0.bias": (F_dim,),
        "ffn.layers.1.weight": (D, F_dim), "ffn.layers.1.bias": (D,),
        "ffn_norm.weight": (D,), "ffn_norm.bias": (D,),
        "cls_fcs.0.weight": (D, D), "cls_fcs.0.bias": (D,), "cls_fcs.1.weight": (D,), "cls_fcs.1.bias": (D,),
        "fc_cls.weight": (C, D), "fc_cls.bias": (C,),
        "reg_fcs.0.weight": (D, D), "reg_fcs.0.bias": (D,), "reg_fcs.1.weight": (D,), "reg_fcs.1.bias": (D,),
        "fc_reg.weight": (4, D), "fc_reg.bias": (4,),
        "feat_extractor.gen_one_d.0.weight": (3 * G * P, D), "feat_extractor.gen_one_d.0.bias": (3 * G * P,),
        "feat_extractor.gen_double_d.0.weight": (3 * K, D), "feat_extractor.gen_double_d.0.bias": (3 * K,),
        "dynamic_conv.parameter_generator.weight": (G * (Cg * Cg + fresh * P * K), D),
        "dynamic_conv.parameter_generator.bias": (G * (Cg * Cg + fresh * P * K),),
        "dynamic_conv.mix_bias.weight": (G * (Cg + P_out), D),
        "dynamic_conv.mix_bias.bias": (G * (Cg + P_out),),
        "dynamic_conv.Wv.weight": (D, P_out * D), "dynamic_conv.Wv.bias": (D,),
        "dynamic_conv.Wv_layer_norm.weight": (D,), "dynamic_conv.Wv_layer_norm.bias": (D,),
        "iou_snyc_statistics.running_mean": (1,), "iou_snyc_statistics.running_var": (1,),
        "iou_snyc_statistics.num_batches_tracked": (),
    }
    for i in range(R):
        sh |= {f"dynamic_conv.subbox_local_list.{i}.weight": (K * Cg, K * Cg),
               f"dynamic_conv.subbox_local_list.{i}.bias": (K * Cg,),
               f"dynamic_conv.axis_atten_list.{i}.weight": (P * Cg, P * Cg),
               f"dynamic_conv.axis_atten_list.{i}.bias": (P * Cg,),
               f"dynamic_conv.subbox_score_list.{i}.weight": (G * P * K, D),
               f"dynamic_conv.subbox_score_list.{i}.bias": (G * P * K,)}
    if R:
        sh |= {"dynamic_conv.M_score_list.weight": (G * Cg * 2 * R, D),
               "dynamic_conv.M_score_list.bias": (G * Cg * 2 * R,),
               "dynamic_conv.M_score_list_mix_bias.weight": (G * Cg * R, D),
               "dynamic_conv.M_score_list_mix_bias.bias": (G * Cg * R,),
               "dynamic_conv.S_score_list.weight": (G * fresh, D),
               "dynamic_conv.S_score_list.bias": (G * fresh,),
               "dynamic_conv.S_score_list2.weight": (G * P * K, D),
               "dynamic_conv.S_score_list2.bias": (G * P * K,)}
    return sh


# official stage-key prefix -> ours (None: dropped)
_EXPECTED = {
    "attention.attn.in_proj_weight": "attn.qkv.weight", "attention.attn.in_proj_bias": "attn.qkv.bias",
    "attention.attn.out_proj.": "attn.proj.", "attention_norm.": "attn_norm.", "iof_tau": "attn.iof_tau",
    "ffn.layers.0.0.": "ffn.0.", "ffn.layers.1.": "ffn.2.", "ffn_norm.": "ffn_norm.",
    "cls_fcs.": "cls_branch.", "fc_cls.": "cls_head.", "reg_fcs.": "reg_branch.", "fc_reg.": "reg_head.",
    "feat_extractor.gen_one_d.0.": "sampler.sub_box_offsets.",
    "feat_extractor.gen_double_d.0.": "sampler.point_offsets.",
    "dynamic_conv.parameter_generator.": "mixing.generator.", "dynamic_conv.mix_bias.": "mixing.mix_bias.",
    "dynamic_conv.Wv.": "mixing.out_proj.", "dynamic_conv.Wv_layer_norm.": "mixing.out_norm.",
    "dynamic_conv.subbox_local_list.": "mixing.sub_adapters.",
    "dynamic_conv.axis_atten_list.": "mixing.axis_adapters.",
    "dynamic_conv.M_score_list.": "mixing.filter_gates.",
    "dynamic_conv.M_score_list_mix_bias.": "mixing.reuse_bias.",
    "dynamic_conv.S_score_list.": "mixing.pattern_gate.", "dynamic_conv.S_score_list2.": "mixing.point_gate.",
    "dynamic_conv.subbox_score_list.": None, "iou_snyc_statistics.": None,
}


def _expected_key(official_rest):
    best = max((p for p in _EXPECTED if official_rest.startswith(p)), key=len)
    return None if _EXPECTED[best] is None else _EXPECTED[best] + official_rest[len(best):]


def test_official_checkpoint_keys_map_onto_the_model(tmp_path):
    model = _tiny().eval()
    D, G, N, C, heads, F_dim, P_out = 64, 4, 24, 5, 4, 256, 32
    g = torch.Generator().manual_seed(3)
    sd = {f"backbone.{k}": torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
          for k, v in model.backbone.state_dict().items()}
    for lvl, c in enumerate([16, 32, 64, 128]):
        sd[f"neck.lateral_convs.{lvl}.conv.weight"] = torch.randn(D, c, 1, 1, generator=g)
        sd[f"neck.lateral_convs.{lvl}.conv.bias"] = torch.randn(D, generator=g)
    sd |= {"neck.gn_out.weight": torch.randn(D, generator=g), "neck.gn_out.bias": torch.randn(D, generator=g),
           "rpn_head.init_content_features.weight": torch.randn(N, D, generator=g),
           "rpn_head.init_proposal_bboxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(N, 1)}
    for s, (P, K) in enumerate([(4, 4), (2, 4), (2, 4), (2, 4)]):
        for k, shape in _official_stage_shapes(s, D, G, P, K, P_out, F_dim, heads, C).items():
            sd[f"roi_head.bbox_head.{s}.{k}"] = torch.randn(shape, generator=g)
    ckpt = {"meta": {"epoch": 12}, "state_dict": sd, "optimizer": {}}

    mapped = stageinteractor_filter_fn(ckpt, model)
    load_state_dict_into(model, mapped, where="synthetic official checkpoint", strict=True)
    own = model.state_dict()
    checked = 0
    for key, value in sd.items():
        if key.startswith("roi_head.bbox_head."):
            s, rest = key[len("roi_head.bbox_head."):].split(".", 1)
            ours = _expected_key(rest)
            ours = ours and f"stages.{s}.{ours}"
        elif key.startswith("neck.lateral_convs."):
            lvl, rest = key[len("neck.lateral_convs."):].split(".", 1)
            ours = f"neck.lateral.{lvl}.{rest[len('conv.'):]}"
        else:
            ours = {"neck.gn_out.weight": "neck.norm.weight", "neck.gn_out.bias": "neck.norm.bias",
                    "rpn_head.init_content_features.weight": "query_embed.weight",
                    "rpn_head.init_proposal_bboxes": None}.get(key, key)
        if ours is not None:
            assert torch.equal(own[ours], value), (key, ours)
            checked += 1
    assert checked == len(own)

    # the same through create_model(pretrained=file) (mmcv checkpoint container, weights_only load)
    torch.save(ckpt, tmp_path / "epoch_12.pth")
    loaded = vizoo.create_model(TINY, pretrained=str(tmp_path / "epoch_12.pth")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in own.items())

    # generator output per group is [C_g^2 for M | |S| for S]: the official split of the loaded
    # weights gives the model's own filters
    q = torch.randn(2, N, D)
    for s, (P, K) in enumerate([(4, 4), (2, 4), (2, 4), (2, 4)]):
        W = sd[f"roi_head.bbox_head.{s}.dynamic_conv.parameter_generator.weight"]
        b = sd[f"roi_head.bbox_head.{s}.dynamic_conv.parameter_generator.bias"]
        Cg = D // G
        params = (q @ W.T + b).reshape(2 * N, G, -1)
        M_off, S_off = params.split([Cg * Cg, params.shape[-1] - Cg * Cg], dim=2)
        M, S = model.stages[s].mixing.generate(q)
        torch.testing.assert_close(M, M_off.reshape(-1, Cg, Cg))
        torch.testing.assert_close(S, S_off.reshape(2 * N * G, -1, P, K))


def test_own_state_dict_passes_the_filter_unchanged():
    model = _tiny()
    sd = model.state_dict()
    assert stageinteractor_filter_fn(sd, model) is sd


_MINI = {"channels": (8, 16, 32, 64), "stem_width": 8}


def test_baseline_kwargs_and_custom_backbone():
    model = StageInteractor(backbone="timm:resnet10t", backbone_kwargs=_MINI,
                            out_indices=(2, 3, 4), num_classes=3, num_queries=6, num_stages=3, dim=32,
                            groups=4, points=(2, 2), points_later=(2, 2), out_patterns=8, ffn_dim=32,
                            num_heads=2, neck_groups=4, reuse=False, csla=False)
    assert model.strides == [8, 16, 32] and not model.reuse and not model.csla
    out = model(torch.randn(1, 3, 64, 96))
    assert out[-1]["logits"].shape == (1, 6, 3)
    with pytest.raises(ValueError, match="reuse"):
        StageInteractor(backbone="timm:resnet10t", backbone_kwargs=_MINI,
                        num_queries=4, num_stages=3, dim=32, groups=4, points=(2, 2), points_later=(4, 2),
                        out_patterns=8, ffn_dim=32, num_heads=2, neck_groups=4, reuse_from=1)


def test_forward_export_graph_is_converter_friendly():
    """torch.export at a fixed size: no float pow or square (TFLite lowers both to a pow it has no
    kernel for), no 'alias' op and no tensor above rank 5 (CoreML rejects both), and the exported
    program reproduces forward_export. (The full CoreML + TFLite export of the tiny model passes
    parity too, but takes a minute.)"""
    from vizoo.export.spec import ForwardExport

    model = _tiny().eval()
    _open_value_path(model)
    x = torch.randn(1, 3, 128, 128)
    ep = torch.export.export(ForwardExport(model), (x,))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    names = {str(n.target) for n in nodes}
    assert not any(bad in t for t in names for bad in ("pow", "square", "alias")), names
    ranks = [n.meta["val"].dim() for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert max(ranks) <= 5
    for a, b in zip(ep.module()(x), model.forward_export(x)):
        torch.testing.assert_close(a, b)


def test_dense_bilinear_export_form_equals_grid_sample():
    """The export form (tent-weight matmuls, which XNNPACK runs) equals F.grid_sample bilinear with
    zero padding, also for points outside the image and between levels."""
    from vizoo.layers.query_sampling import sample_multilevel

    g = torch.Generator().manual_seed(0)
    B, N, G, M, C = 2, 5, 4, 8, 16
    feats = [torch.randn(B, G * C, s, s, generator=g) for s in (32, 16, 8, 4)]
    xy = torch.rand(B, N, G, M, 2, generator=g) * 170 - 20          # some points fall outside 128 px
    z = torch.randn(B, N, G, M, generator=g) * 2 + 4
    eager = sample_multilevel(feats, [4, 8, 16, 32], xy, z)
    dense = sample_multilevel(feats, [4, 8, 16, 32], xy, z, dense=True)
    assert torch.allclose(dense, eager, atol=1e-5, rtol=1e-5)


def test_gathered_export_form_for_large_levels_equals_grid_sample(monkeypatch):
    """Levels too large for the dense form are gathered (four neighbours): equal to F.grid_sample,
    also outside the map, and chosen per level by the size of the dense intermediate."""
    import vizoo.layers.query_sampling as qs

    g = torch.Generator().manual_seed(1)
    B, N, G, M, C = 1, 3, 4, 8, 8
    feats = [torch.randn(B, G * C, h, w, generator=g) for h, w in ((24, 40), (12, 20))]
    xy = torch.rand(B, N, G, M, 2, generator=g) * 200 - 20
    xy[0, 0, 0, 0] = torch.tensor([4.0 * 40 - 2.0, 4.0 * 24 - 2.0])    # the last pixel centre: weight on the edge
    z = torch.randn(B, N, G, M, generator=g) * 2 + 4
    eager = qs.sample_multilevel(feats, [4, 8], xy, z)
    # the smaller level (12 rows) stays dense, the larger one (24 rows) is gathered
    monkeypatch.setattr(qs, "DENSE_SAMPLING_MAX_ELEMENTS", B * G * N * M * C * 12)
    gathered, gather = [], qs.bilinear_sample_gather
    monkeypatch.setattr(qs, "bilinear_sample_gather", lambda f, p, s: gathered.append(s) or gather(f, p, s))
    mixed = qs.sample_multilevel(feats, [4, 8], xy, z, dense=True)
    assert gathered == [4]
    assert torch.allclose(mixed, eager, atol=1e-5, rtol=1e-5)
    points = xy.permute(0, 2, 1, 3, 4).reshape(B * G, N, M, 2)
    for feat, stride in zip(feats, [4, 8]):
        grouped = feat.reshape(B * G, C, *feat.shape[-2:])
        to_unit = points.new_tensor([2.0 / (feat.shape[-1] * stride), 2.0 / (feat.shape[-2] * stride)])
        ref = F.grid_sample(grouped, points * to_unit - 1.0, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        assert torch.allclose(gather(grouped, points, stride), ref, atol=1e-5, rtol=1e-5)


def test_export_mode_switches_the_sampler_and_keeps_the_outputs():
    from vizoo.layers.export_mode import export_mode

    torch.manual_seed(0)
    m = vizoo.create_model("stageinteractor_tiny").eval()
    for p in m.parameters():  # zero-initialised heads/W_v would hide the sampled features
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        scores, boxes = m.forward_export(x)
        with export_mode(m):
            assert m.stages[0].sampler.exporting
            scores_e, boxes_e = m.forward_export(x)
    assert torch.allclose(scores_e, scores, atol=1e-5) and torch.allclose(boxes_e, boxes, atol=1e-3)

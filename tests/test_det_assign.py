"""Hungarian matching, cross-stage label assignment (CSLA) and the StageInteractor set criterion,
checked against references written independently here (brute force, loops, torchvision)."""
import itertools
import math

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

from vizoo.layers import det_loss
from vizoo.layers.det_assign import (candidate_stages, csla_targets, hungarian_match,
                                     hungarian_match_batch)
from vizoo.layers.det_loss import StageInteractorCriterion

ALPHA, GAMMA = 0.25, 2.0


def rand_boxes(n, h=64.0, w=80.0, gen=None):
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([w, h]) * 0.7
    wh = torch.rand(n, 2, generator=gen) * torch.tensor([w, h]) * 0.3 + 2.0
    return torch.cat([xy, xy + wh], 1)


def rand_target(m, num_classes, h=64.0, w=80.0, gen=None):
    return {"boxes": rand_boxes(m, h, w, gen), "img_size": (int(h), int(w)),
            "labels": torch.randint(0, num_classes, (m,), generator=gen)}


def ref_cost(logits, boxes, gt_boxes, gt_labels, img_size, weights=(2.0, 5.0, 2.0)):
    """Matching cost written out element by element (float64)."""
    h, w = img_size
    s = torch.tensor([w, h, w, h], dtype=torch.float64)
    p = logits.double().sigmoid()[:, gt_labels]
    neg = (1 - ALPHA) * p ** GAMMA * -torch.log(1 - p + 1e-12)
    pos = ALPHA * (1 - p) ** GAMMA * -torch.log(p + 1e-12)
    n, m = logits.shape[0], gt_boxes.shape[0]
    l1 = torch.zeros(n, m, dtype=torch.float64)
    for i in range(n):
        for j in range(m):
            l1[i, j] = (boxes[i].double() / s - gt_boxes[j].double() / s).abs().sum()
    giou = generalized_box_iou(boxes.double(), gt_boxes.double())
    return weights[0] * (pos - neg) + weights[1] * l1 - weights[2] * giou


def brute_force(cost):
    """Optimal one-to-one assignment by enumerating every injective map -> set of (q, g)."""
    n, m = cost.shape
    best, best_pairs = math.inf, None
    if m <= n:
        for perm in itertools.permutations(range(n), m):          # GT g -> query perm[g]
            c = sum(cost[perm[g], g].item() for g in range(m))
            if c < best:
                best, best_pairs = c, {(perm[g], g) for g in range(m)}
    else:
        for perm in itertools.permutations(range(m), n):          # query q -> GT perm[q]
            c = sum(cost[q, perm[q]].item() for q in range(n))
            if c < best:
                best, best_pairs = c, {(q, perm[q]) for q in range(n)}
    return best, best_pairs


def pairs(match):
    q, g = match
    return set(zip(q.tolist(), g.tolist()))


# ------------------------------------------------------------------------------ Hungarian

@pytest.mark.parametrize("n,m", [(5, 3), (6, 4), (3, 5), (4, 4), (5, 1)])
def test_hungarian_equals_brute_force(n, m):
    gen = torch.Generator().manual_seed(100 * n + m)
    for _ in range(4):
        num_classes = 4
        logits = torch.randn(n, num_classes, generator=gen) * 2
        boxes = rand_boxes(n, gen=gen)
        t = rand_target(m, num_classes, gen=gen)
        cost = ref_cost(logits, boxes, t["boxes"], t["labels"], t["img_size"])
        best, best_pairs = brute_force(cost)
        match = hungarian_match(logits, boxes, t["boxes"], t["labels"], t["img_size"])
        assert match[0].dtype == torch.long and match[1].dtype == torch.long
        assert len(match[0]) == min(n, m)
        got = sum(cost[q, g].item() for q, g in pairs(match))
        assert got == pytest.approx(best, abs=1e-6)
        assert pairs(match) == best_pairs


def test_hungarian_uses_weights_and_unpadded_size():
    # with only the L1 term, matching is nearest-box in normalised coordinates
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 3, generator=gen)
    boxes = rand_boxes(5, h=30, w=200, gen=gen)
    t = rand_target(3, 3, h=30, w=200, gen=gen)
    for weights in [(0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)]:
        cost = ref_cost(logits, boxes, t["boxes"], t["labels"], t["img_size"], weights)
        _, best_pairs = brute_force(cost)
        match = hungarian_match(logits, boxes, t["boxes"], t["labels"], t["img_size"], weights)
        assert pairs(match) == best_pairs


def test_hungarian_empty_and_batch_consistency():
    gen = torch.Generator().manual_seed(2)
    logits, boxes = torch.randn(6, 4, generator=gen), rand_boxes(6, gen=gen)
    q, g = hungarian_match(logits, boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                           (64, 80))
    assert q.numel() == 0 and g.numel() == 0 and q.dtype == torch.long
    # batched call == per-image calls, with different GT counts (incl. none) and image sizes
    sizes = [(64, 80), (40, 100), (64, 64), (50, 70)]
    counts = [3, 0, 6, 1]
    targets = [rand_target(m, 4, h, w, gen) for m, (h, w) in zip(counts, sizes)]
    B_logits = torch.randn(4, 6, 4, generator=gen) * 2
    B_boxes = torch.stack([rand_boxes(6, h, w, gen) for h, w in sizes])
    batch = hungarian_match_batch(B_logits, B_boxes, targets)
    for b, t in enumerate(targets):
        single = hungarian_match(B_logits[b], B_boxes[b], t["boxes"], t["labels"], t["img_size"])
        assert pairs(batch[b]) == pairs(single)
        assert len(batch[b][0]) == min(6, counts[b])


# ------------------------------------------------------------------------------ CSLA

C = 3
G0 = [0.0, 0.0, 10.0, 10.0]     # class 1
G1 = [20.0, 20.0, 30.0, 30.0]   # class 2
FAR = [50.0, 50.0, 60.0, 60.0]  # IoU 0 with both


def one_image(gts=(G0, G1), labels=(1, 2)):
    return [{"boxes": torch.tensor(gts), "labels": torch.tensor(labels), "img_size": (64, 64)}]


def stage_boxes_of(rows_per_stage):
    """rows_per_stage[s] = list of N boxes -> list over stages of [1, N, 4]."""
    return [torch.tensor(rows)[None] for rows in rows_per_stage]


def m(q, g):
    return (torch.tensor(q, dtype=torch.long), torch.tensor(g, dtype=torch.long))


def positives(target):
    """[B, N, C] -> set of (b, q, c) where the target is 1; also checks it is binary."""
    assert set(target.unique().tolist()) <= {0.0, 1.0}
    return {tuple(i) for i in target.nonzero().tolist()}


def ref_csla(matches, stage_boxes, targets, num_classes, thr, enabled=True):
    """The definition, looped: T_s[b,q,c] = 1 iff some j in J(s), g: sigma_j(g)=q, class(g)=c,
    IoU(b_s(q), g) >= thr (baseline: own matches, no threshold)."""
    L = len(stage_boxes)
    B, N = stage_boxes[0].shape[:2]
    out = []
    for s in range(L):
        t = torch.zeros(B, N, num_classes)
        if enabled:
            js = {s} | ({s - 1} if s >= 1 else set()) | set(range(s + 1, L))
        else:
            js = {s}
        for j in js:
            for b in range(B):
                for q, g in zip(*[x.tolist() for x in matches[j][b]]):
                    gt = targets[b]["boxes"][g]
                    iou = box_iou(stage_boxes[s][b, q][None], gt[None])[0, 0].item()
                    if not enabled or iou >= thr:
                        t[b, q, int(targets[b]["labels"][g])] = 1.0
        out.append(t)
    return out


def test_candidate_stages():
    assert candidate_stages(0, 1) == [0]
    assert sorted(candidate_stages(0, 6)) == [0, 1, 2, 3, 4, 5]
    assert sorted(candidate_stages(3, 6)) == [2, 3, 4, 5]
    assert sorted(candidate_stages(5, 6)) == [4, 5]


def test_csla_single_stage_is_thresholded_one_to_one():
    # q0 sits on G0 (IoU 1), q2 is G1's own match but far from it (IoU 0) -> negative
    boxes = stage_boxes_of([[G0, FAR, FAR, FAR]])
    matches = [[m([0, 2], [0, 1])]]
    (t,) = csla_targets(matches, boxes, one_image(), C, iou_thr=0.5)
    assert t.shape == (1, 4, C) and t.dtype == torch.float32
    assert positives(t) == {(0, 0, 1)}
    # random: L=1 CSLA == own matches filtered by IoU >= thr
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        targets = [rand_target(4, C, gen=gen), rand_target(2, C, gen=gen)]
        sb = [torch.stack([rand_boxes(6, gen=gen) for _ in targets])]
        # put some queries on their GT so that both outcomes occur
        mt = []
        for b, tg in enumerate(targets):
            q = torch.randperm(6, generator=gen)[:len(tg["labels"])]
            g = torch.arange(len(tg["labels"]))
            sb[0][b, q[::2]] = tg["boxes"][g[::2]] + 0.5
            mt.append((q, g))
        (t,) = csla_targets([mt], sb, targets, C, iou_thr=0.5)
        expect = torch.zeros_like(t)
        for b, (q, g) in enumerate(mt):
            iou = box_iou(sb[0][b, q], targets[b]["boxes"][g]).diagonal()
            keep = iou >= 0.5
            expect[b, q[keep], targets[b]["labels"][g[keep]]] = 1
        assert torch.equal(t, expect)
        assert 0 < expect.sum() < len(mt[0][0]) + len(mt[1][0])


def test_csla_threshold_above_one_gives_zeros_and_boundary_is_inclusive():
    boxes = stage_boxes_of([[G0, G1, G0, G1]] * 3)
    matches = [[m([0, 1], [0, 1])], [m([2, 3], [0, 1])], [m([1, 0], [1, 0])]]
    for t in csla_targets(matches, boxes, one_image(), C, iou_thr=1.01):
        assert t.sum() == 0
    # IoU of [0,0,10,20] with G0 is exactly 0.5 -> positive at 0.5, negative just above
    boxes = stage_boxes_of([[[0.0, 0.0, 10.0, 20.0], FAR]])
    (t,) = csla_targets([[m([0], [0])]], boxes, one_image(), C, iou_thr=0.5)
    assert positives(t) == {(0, 0, 1)}
    (t,) = csla_targets([[m([0], [0])]], boxes, one_image(), C, iou_thr=0.5001)
    assert t.sum() == 0


def test_csla_same_pair_at_two_stages_counted_once():
    boxes = stage_boxes_of([[G0, FAR, G1], [G0, FAR, G1]])
    matches = [[m([0, 2], [0, 1])], [m([0, 2], [0, 1])]]
    t0, t1 = csla_targets(matches, boxes, one_image(), C)
    for t in (t0, t1):
        assert t.max() == 1.0
        assert positives(t) == {(0, 0, 1), (0, 2, 2)}


def test_csla_borrowing_direction():
    # L=4, stage j matches query j to G0; every query's box sits on G0 at every stage
    L = 4
    boxes = stage_boxes_of([[G0] * L] * L)
    matches = [[m([j], [0])] for j in range(L)]
    ts = csla_targets(matches, boxes, one_image((G0,), (1,)), C)
    got = [{q for _, q, _ in positives(t)} for t in ts]
    assert got == [{0, 1, 2, 3},   # stage 0 borrows from all later stages
                   {0, 1, 2, 3},   # stage 1: itself, 0 and 2, 3
                   {1, 2, 3},      # stage 2: not stage 0 (two stages back)
                   {2, 3}]         # last stage: only itself and L-2
    # the IoU is taken with stage s's own box: stage 1 matches q1 whose stage-0 box is far
    boxes = stage_boxes_of([[G0, FAR, G0], [G0, G0, G0]])
    matches = [[m([0], [0])], [m([1], [0])]]
    t0, t1 = csla_targets(matches, boxes, one_image((G0,), (1,)), C)
    assert positives(t0) == {(0, 0, 1)}
    assert positives(t1) == {(0, 0, 1), (0, 1, 1)}


def test_csla_multi_hot_two_classes_one_query():
    ga, gb = [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 12.0]
    boxes = stage_boxes_of([[[0.0, 0.0, 10.0, 11.0], FAR], [[0.0, 0.0, 10.0, 11.0], FAR]])
    matches = [[m([0, 1], [0, 1])], [m([1, 0], [0, 1])]]
    t0, t1 = csla_targets(matches, boxes, one_image((ga, gb), (1, 2)), C)
    assert positives(t0) == {(0, 0, 1), (0, 0, 2)}     # own (class 1) + borrowed (class 2)
    assert positives(t1) == {(0, 0, 1), (0, 0, 2)}


def test_csla_baseline_is_one_hot_own_matches():
    boxes = stage_boxes_of([[G0, FAR, FAR, FAR], [FAR, FAR, G0, FAR]])
    matches = [[m([0, 2], [0, 1])], [m([3, 2], [0, 1])]]
    t0, t1 = csla_targets(matches, boxes, one_image(), C, enabled=False)
    assert positives(t0) == {(0, 0, 1), (0, 2, 2)}     # IoU 0 own match is still positive
    assert positives(t1) == {(0, 3, 1), (0, 2, 2)}


@pytest.mark.parametrize("enabled", [True, False])
def test_csla_matches_looped_definition_random(enabled):
    gen = torch.Generator().manual_seed(4)
    L, B, N, num_classes = 4, 3, 8, 5
    counts = [3, 0, 5]
    for _ in range(3):
        targets = [rand_target(mm, num_classes, gen=gen) for mm in counts]
        # boxes near the GTs so that IoUs straddle the threshold
        sb = []
        for _s in range(L):
            x = torch.stack([rand_boxes(N, gen=gen) for _ in range(B)])
            for b, tg in enumerate(targets):
                if counts[b]:
                    pick = torch.randint(0, counts[b], (N,), generator=gen)
                    jitter = torch.randn(N, 4, generator=gen) * 2
                    x[b, : N // 2 + 2] = (tg["boxes"][pick] + jitter)[: N // 2 + 2]
            sb.append(x)
        matches = [[(torch.randperm(N, generator=gen)[:mm], torch.randperm(mm, generator=gen))
                    for mm in counts] for _s in range(L)]
        got = csla_targets(matches, sb, targets, num_classes, 0.5, enabled=enabled)
        ref = ref_csla(matches, sb, targets, num_classes, 0.5, enabled=enabled)
        for a, r in zip(got, ref):
            assert torch.equal(a, r)
        assert sum(r.sum() for r in ref) > 0


# ------------------------------------------------------------------------------ criterion

def random_outputs(L, B, N, num_classes, sizes, gen, grad=False):
    outs = []
    for _ in range(L):
        logits = torch.randn(B, N, num_classes, generator=gen)
        boxes = torch.stack([rand_boxes(N, h, w, gen) for h, w in sizes])
        if grad:
            logits.requires_grad_(True)
            boxes.requires_grad_(True)
        outs.append({"logits": logits, "boxes": boxes})
    return outs


def near_gt_outputs(targets, L, N, num_classes, gen):
    """Stage outputs whose first queries sit (jittered) on the GTs, so that CSLA borrows."""
    outs = []
    for _ in range(L):
        logits = torch.randn(len(targets), N, num_classes, generator=gen)
        boxes = []
        for t in targets:
            h, w = t["img_size"]
            x = rand_boxes(N, h, w, gen)
            mm = len(t["labels"])
            if mm:
                rep = t["boxes"][torch.arange(N) % mm] + torch.randn(N, 4, generator=gen) * 1.5
                x[: 2 * mm] = rep[: 2 * mm]
            boxes.append(x)
        outs.append({"logits": logits.requires_grad_(True),
                     "boxes": torch.stack(boxes).requires_grad_(True)})
    return outs


@pytest.mark.parametrize("csla", [True, False])
def test_criterion_terms_match_torchvision(csla):
    gen = torch.Generator().manual_seed(5)
    L, N, num_classes = 3, 10, 4
    sizes = [(64, 80), (48, 96)]
    targets = [rand_target(3, num_classes, h, w, gen) for h, w in sizes]
    outs = near_gt_outputs(targets, L, N, num_classes, gen)
    crit = StageInteractorCriterion(num_classes, csla=csla, csla_iou=0.5)
    total, logs = crit(outs, targets)

    matches = crit.match(outs, targets)
    cls_t = csla_targets(matches, [o["boxes"].detach() for o in outs], targets, num_classes,
                         0.5, enabled=csla)
    expect_total, num_gt = 0.0, 6
    for s, o in enumerate(outs):
        own = sum(len(q) for q, _ in matches[s])
        assert own == 6
        num_pos = cls_t[s].sum().item()
        norm_cls = max(num_pos, own, 1.0)
        cls = 2.0 * sigmoid_focal_loss(o["logits"].detach(), cls_t[s], ALPHA, GAMMA,
                                       reduction="sum").item() / norm_cls
        l1 = giou = 0.0
        for b, (q, g) in enumerate(matches[s]):
            h, w = targets[b]["img_size"]
            sc = torch.tensor([w, h, w, h], dtype=torch.float32)
            pred, gt = o["boxes"].detach()[b, q], targets[b]["boxes"][g]
            l1 += (pred / sc - gt / sc).abs().sum().item()
            giou += (1 - generalized_box_iou(pred, gt).diagonal()).sum().item()
        l1, giou = 5.0 * l1 / own, 2.0 * giou / own
        assert logs[f"loss_cls_s{s}"] == pytest.approx(cls, rel=1e-5)
        assert logs[f"loss_l1_s{s}"] == pytest.approx(l1, rel=1e-5)
        assert logs[f"loss_giou_s{s}"] == pytest.approx(giou, rel=1e-5)
        assert logs[f"pos_per_gt_s{s}"] == pytest.approx(num_pos / num_gt)
        if not csla:
            assert logs[f"pos_per_gt_s{s}"] == 1.0
        expect_total += cls + l1 + giou
    assert total.item() == pytest.approx(expect_total, rel=1e-5)
    assert logs["loss"] == pytest.approx(expect_total, rel=1e-5)
    for k in ("loss_cls", "loss_l1", "loss_giou"):
        assert logs[k] == pytest.approx(sum(logs[f"{k}_s{s}"] for s in range(L)), rel=1e-5)
    assert all(isinstance(v, float) for v in logs.values())
    if csla:   # the jittered duplicates make CSLA give more than one positive per GT somewhere
        assert max(logs[f"pos_per_gt_s{s}"] for s in range(L)) > 1.0

    total.backward()
    for o in outs:
        for k in ("logits", "boxes"):
            gr = o[k].grad
            assert gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0


def test_criterion_perfect_prediction():
    num_classes, N = 3, 6
    targets = [{"boxes": torch.tensor([G0, G1, [5.0, 30.0, 25.0, 60.0]]),
                "labels": torch.tensor([1, 2, 0]), "img_size": (64, 64)}]
    logits = torch.full((1, N, num_classes), -30.0)
    boxes = torch.tensor([FAR] * N)[None].clone()
    for i, (bx, c) in enumerate(zip(targets[0]["boxes"], targets[0]["labels"])):
        logits[0, 2 * i, c] = 30.0
        boxes[0, 2 * i] = bx
    outs = [{"logits": logits.clone().requires_grad_(True), "boxes": boxes.clone()}
            for _ in range(2)]
    crit = StageInteractorCriterion(num_classes)
    total, logs = crit(outs, targets)
    for (stage_match,) in crit.match(outs, targets):
        assert pairs(stage_match) == {(0, 0), (2, 1), (4, 2)}
    assert logs["loss_l1"] < 1e-6 and logs["loss_giou"] < 1e-5 and logs["loss_cls"] < 1e-6
    assert logs["pos_per_gt_s0"] == 1.0 and logs["pos_per_gt_s1"] == 1.0
    assert total.item() < 1e-5


def test_criterion_empty_targets():
    gen = torch.Generator().manual_seed(6)
    L, N, num_classes = 2, 5, 3
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "img_size": (64, 80)}
    crit = StageInteractorCriterion(num_classes)
    # an all-empty batch: focal on all-negative targets / 1, no box terms
    outs = random_outputs(L, 2, N, num_classes, [(64, 80)] * 2, gen, grad=True)
    total, logs = crit(outs, [empty, dict(empty)])
    assert torch.isfinite(total)
    assert logs["loss_l1"] == 0.0 and logs["loss_giou"] == 0.0
    expect = sum(2.0 * sigmoid_focal_loss(o["logits"].detach(), torch.zeros(2, N, num_classes),
                                          ALPHA, GAMMA, reduction="sum").item() for o in outs)
    assert logs["loss_cls"] == pytest.approx(expect, rel=1e-5)
    assert logs["pos_per_gt_s0"] == 0.0
    total.backward()
    for o in outs:
        assert torch.isfinite(o["logits"].grad).all() and o["logits"].grad.abs().sum() > 0
        assert o["boxes"].grad is not None and (o["boxes"].grad == 0).all()
    # a mixed batch: the empty image contributes negatives only
    targets = [empty, rand_target(2, num_classes, gen=gen)]
    outs = random_outputs(L, 2, N, num_classes, [(64, 80)] * 2, gen, grad=True)
    total, logs = crit(outs, targets)
    total.backward()
    assert math.isfinite(logs["loss"]) and logs["loss_l1"] > 0
    for o in outs:
        assert torch.isfinite(o["boxes"].grad).all()
        assert (o["boxes"].grad[0] == 0).all() and o["boxes"].grad[1].abs().sum() > 0


def test_criterion_fewer_queries_than_gts():
    gen = torch.Generator().manual_seed(7)
    targets = [rand_target(6, 3, gen=gen)]
    outs = random_outputs(2, 1, 4, 3, [(64, 80)], gen, grad=True)
    crit = StageInteractorCriterion(3, csla=False)
    total, logs = crit(outs, targets)
    assert torch.isfinite(total)
    assert logs["pos_per_gt_s0"] == pytest.approx(4 / 6)


def test_criterion_normalisers_averaged_across_processes(monkeypatch):
    """Fake a 2-process run where the other process holds 10 positives for every count."""
    class FakeDist:
        @staticmethod
        def is_available():
            return True

        @staticmethod
        def is_initialized():
            return True

        @staticmethod
        def get_world_size():
            return 2

        @staticmethod
        def all_reduce(x):
            x.add_(10.0)

    gen = torch.Generator().manual_seed(8)
    targets = [rand_target(3, 3, gen=gen)]
    outs = random_outputs(1, 1, 6, 3, [(64, 80)], gen)
    crit = StageInteractorCriterion(3, csla=False)
    _, local = crit(outs, targets)
    monkeypatch.setattr(det_loss, "dist", FakeDist)
    _, avg = crit(outs, targets)
    # local normalisers are 3 (one-to-one, N >= M); averaged: (3 + 10) / 2
    for k in ("loss_cls_s0", "loss_l1_s0", "loss_giou_s0"):
        assert avg[k] == pytest.approx(local[k] * 3 / 6.5, rel=1e-6)

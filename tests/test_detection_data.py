"""Detection data and scoring: the shapes generator, the COCO reader, COCO AP and its meter."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vizoo.data.coco import CocoDetection, detection_collate, detection_transforms, load_coco_json, scale_boxes
from vizoo.data.shapes import (CATEGORIES, MIN_VISIBLE, default_shapes_root, ensure_shapes, generate_shapes,
                               render_sample)
from vizoo.engine.coco_eval import DetectionMeter, coco_evaluate
from vizoo.engine.distributed import DistEnv

N_TRAIN, N_VAL = 16, 4


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return generate_shapes(tmp_path_factory.mktemp("shapes") / "ds", N_TRAIN, N_VAL, seed=3, progress=False)


def _gt_dets(ann: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in ann["annotations"]]


# ----------------------------------------------------------------------------- generator
def test_generation_is_deterministic_and_reused(shapes, tmp_path):
    again = generate_shapes(tmp_path / "again", N_TRAIN, N_VAL, seed=3, progress=False)
    other = generate_shapes(tmp_path / "other", N_TRAIN, N_VAL, seed=4, progress=False)
    for split in ("train", "val"):
        assert shapes[f"{split}_ann"].read_text() == again[f"{split}_ann"].read_text()
        assert shapes[f"{split}_ann"].read_text() != other[f"{split}_ann"].read_text()
    first = "000000.png"
    assert (shapes["train_images"] / first).read_bytes() == (again["train_images"] / first).read_bytes()
    assert (shapes["train_images"] / first).read_bytes() != (other["train_images"] / first).read_bytes()
    assert sorted(p.name for p in shapes["val_images"].iterdir()) == [f"{i:06d}.png" for i in range(N_VAL)]

    stamp = (again["root"] / "meta.json").stat().st_mtime_ns
    generate_shapes(tmp_path / "again", N_TRAIN, N_VAL, seed=3, progress=False)  # same parameters: reused
    assert (again["root"] / "meta.json").stat().st_mtime_ns == stamp
    smaller = generate_shapes(tmp_path / "again", 3, 2, seed=3, progress=False)  # other parameters: replaced
    assert len(json.loads(smaller["train_ann"].read_text())["images"]) == 3
    assert not any(p.name.endswith((".tmp", ".old")) for p in tmp_path.iterdir())  # no half-written leftovers

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_shapes(foreign, 2, 1, progress=False)
    assert (foreign / "mine.txt").read_text() == "keep me"


def test_interrupted_generation_leaves_no_dataset(tmp_path, monkeypatch):
    import vizoo.data.shapes as shapes_mod

    done = generate_shapes(tmp_path / "ds", 3, 1, seed=0, progress=False)
    before = done["train_ann"].read_text()
    real = shapes_mod.render_sample

    def failing(seed, split, index, img_size=128):
        if index == 2:
            raise KeyboardInterrupt
        return real(seed, split, index, img_size)

    monkeypatch.setattr(shapes_mod, "render_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "ds", 5, 1, seed=1, progress=False)  # the old dataset stays whole
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(tmp_path / "fresh", 5, 1, progress=False)  # nothing half-written appears
    assert done["train_ann"].read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["ds"]


def test_cache_location_and_ensure(tmp_path, monkeypatch):
    monkeypatch.setenv("VIZOO_DATA", str(tmp_path))
    root = default_shapes_root(4, 2, seed=1)
    assert root.parent == tmp_path and root.name.startswith("shapes-")
    assert root != default_shapes_root(4, 2, seed=2)
    paths = ensure_shapes(num_train=4, num_val=2, seed=1, progress=False)
    assert paths["root"] == root and paths["val_ann"].is_file()


def test_written_annotations_match_the_drawing(shapes):
    ann = json.loads(shapes["train_ann"].read_text())
    assert [c["name"] for c in ann["categories"]] == list(CATEGORIES)
    assert [c["id"] for c in ann["categories"]] == [1, 2, 3, 4, 5]
    by_image: dict[int, list] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for img in ann["images"]:
        i = img["id"] - 1
        sample = render_sample(3, "train", i, 128)
        on_disk = np.asarray(Image.open(shapes["train_images"] / img["file_name"]).convert("RGB"))
        assert np.array_equal(on_disk, sample.image)
        assert 1 <= len(sample.objects) <= 6
        assert [(a["category_id"], tuple(a["bbox"])) for a in by_image.get(img["id"], [])] == \
               [(o.category_id, tuple(float(v) for v in o.bbox)) for o in sample.objects]
        for a in by_image.get(img["id"], []):
            assert a["iscrowd"] == 0 and a["area"] > 0
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128 and w >= 5 and h >= 5


def test_boxes_tightly_bound_the_drawn_pixels():
    """For objects with nothing else nearby, the pixels that differ from the bare background
    span exactly the annotated box (an independent check of the box, from the image)."""
    checked = 0
    for i in range(30):
        s = render_sample(0, "val", i, 128)
        changed = np.any(s.image != s.background, axis=-1)
        for k, o in enumerate(s.objects):
            assert o.visible.sum() >= MIN_VISIBLE * o.mask.sum()
            x, y, w, h = o.bbox
            x0, y0, x1, y1 = max(x - 2, 0), max(y - 2, 0), min(x + w + 2, 128), min(y + h + 2, 128)
            others = [p for j, p in enumerate(s.objects) if j != k]
            if any(p.mask[y0:y1, x0:x1].any() for p in others):
                continue
            ys, xs = np.nonzero(changed[y0:y1, x0:x1])
            assert (xs.min() + x0, ys.min() + y0, xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == o.bbox
            checked += 1
    assert checked >= 30


def test_coco_json_loads_in_the_evaluator(shapes):
    from faster_coco_eval import COCO

    coco = COCO(str(shapes["val_ann"]))
    assert len(coco.getImgIds()) == N_VAL
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5]
    assert len(coco.getAnnIds()) == len(load_coco_json(shapes["val_ann"])["annotations"]) > 0


# ----------------------------------------------------------------------------- reader
def _tiny_coco(tmp_path, annotations, n_images=3, size=(40, 60)):
    """Images of (h, w) = size and a COCO file with the given annotations (two categories)."""
    img_dir = tmp_path / "imgs"
    img_dir.mkdir(exist_ok=True)
    h, w = size
    for i in range(n_images):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(img_dir / f"{i}.png")
    data = {"images": [{"id": 10 + i, "file_name": f"{i}.png", "width": w, "height": h} for i in range(n_images)],
            "annotations": [{"id": k + 1, "iscrowd": 0, **a} for k, a in enumerate(annotations)],
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return img_dir, ann


def test_reader_targets_and_category_mapping(tmp_path):
    img_dir, ann = _tiny_coco(tmp_path, [{"image_id": 10, "category_id": 7, "bbox": [5, 6, 10, 20]},
                                         {"image_id": 10, "category_id": 3, "bbox": [0, 0, 4, 4]}])
    ds = CocoDetection(img_dir, ann)
    assert ds.categories == ["cat", "dog"] and ds.cat_ids == [3, 7]
    img, t = ds[0]
    assert img.shape == (3, 40, 60) and img.dtype == torch.float32 and 0 <= float(img.min()) <= float(img.max()) <= 1
    assert t["boxes"].tolist() == [[5, 6, 15, 26], [0, 0, 4, 4]] and t["labels"].tolist() == [1, 0]
    assert t["image_id"] == 10 and t["orig_size"] == (40, 60) and t["img_size"] == (40, 60)
    assert ds[1][1]["boxes"].shape == (0, 4)


def test_reader_bad_json_names_the_file(tmp_path):
    bad = tmp_path / "broken_ann.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken_ann.json") as e:
        CocoDetection(tmp_path, bad)
    assert "JSON" in str(e.value)
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 9, "height": 9}],
                               "categories": [{"id": 1}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1}]}))  # no bbox
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="broken_ann.json has a malformed entry"):
        CocoDetection(tmp_path, bad)
    with pytest.raises(ValueError, match="nothere.json"):
        CocoDetection(tmp_path, tmp_path / "nothere.json")


def test_reader_skips_missing_images_clips_and_drops_bad_boxes(tmp_path):
    img_dir, ann = _tiny_coco(tmp_path, [
        {"image_id": 10, "category_id": 7, "bbox": [50, -5, 30, 20]},  # reaches outside: clipped
        {"image_id": 10, "category_id": 7, "bbox": [70, 10, 5, 5]},  # wholly outside: no area
        {"image_id": 10, "category_id": 7, "bbox": [5, 5, 0.5, 10]},  # thinner than a pixel
        {"image_id": 10, "category_id": 3, "bbox": [1, 1, 30, 30], "iscrowd": 1},  # crowd: not a target
        {"image_id": 11, "category_id": 3, "bbox": [1, 1, 3, 3]},
    ], n_images=4)
    (img_dir / "2.png").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(img_dir, ann)
    text = [str(w.message) for w in caught]
    assert any(m.startswith("skipped 1 of 4 images: file missing under") for m in text), text
    assert ds.stats["missing_images"] == 1 and len(ds) == 3 and 12 not in ds.image_ids
    assert ds.stats["degenerate_boxes"] == 2 and ds.stats["clipped_boxes"] == 1 and ds.stats["crowd"] == 1
    t = ds[0][1]
    assert t["boxes"].tolist() == [[50, 0, 60, 15]] and t["labels"].tolist() == [1]
    for i in range(len(ds)):  # a whole epoch runs
        ds[i]
    gt = ds.ground_truth()
    assert {im["id"] for im in gt["images"]} == {10, 11, 13}
    assert sorted(a["iscrowd"] for a in gt["annotations"]) == [0, 0, 1]


def test_transforms_and_collate(shapes):
    torch.manual_seed(0)
    ds = CocoDetection(shapes["val_images"], shapes["val_ann"], detection_transforms(64, hflip=1.0))
    plain = CocoDetection(shapes["val_images"], shapes["val_ann"])
    img, t = ds[0]
    ref_img, ref = plain[0]
    assert img.shape == (3, 64, 64) and t["img_size"] == (64, 64) and t["orig_size"] == (128, 128)
    b = ref["boxes"] / 2
    flipped = torch.stack([64 - b[:, 2], b[:, 1], 64 - b[:, 0], b[:, 3]], dim=1)
    assert torch.allclose(t["boxes"], flipped, atol=1e-4)
    assert torch.allclose(scale_boxes(b, (64, 64), (128, 128)), ref["boxes"])

    images, targets = detection_collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 64, 64) and len(targets) == 2
    images, targets = detection_collate([ds[0], plain[1]])  # unequal sizes: zero-padded
    assert images.shape == (2, 3, 128, 128) and float(images[0, :, 64:, :].abs().sum()) == 0
    assert [t["img_size"] for t in targets] == [(64, 64), (128, 128)]


# ----------------------------------------------------------------------------- COCO AP
def test_coco_evaluate_perfect_shifted_wrong_class_and_empty(shapes, tmp_path):
    ann = load_coco_json(shapes["val_ann"])
    dets = _gt_dets(ann)
    out = tmp_path / "res" / "dets.json"
    perfect = coco_evaluate(shapes["val_ann"], dets, out_json=out)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    assert perfect["AR100"] == pytest.approx(1.0)
    assert json.loads(out.read_text()) == dets
    assert set(perfect) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}

    shifted = [{**d, "bbox": [d["bbox"][0] + 200, d["bbox"][1] + 200, *d["bbox"][2:]]} for d in dets]
    assert coco_evaluate(ann, shifted)["AP"] == pytest.approx(0.0)

    wrong = [dict(d) for d in dets]
    wrong[0]["category_id"] = wrong[0]["category_id"] % 5 + 1
    assert 0.5 < coco_evaluate(ann, wrong)["AP"] < perfect["AP"]
    assert ann == load_coco_json(shapes["val_ann"])  # the caller's dict is not modified

    empty = coco_evaluate(ann, [], out_json=tmp_path / "empty.json")
    assert empty["AP"] == 0.0 and json.loads((tmp_path / "empty.json").read_text()) == []
    with pytest.raises(ValueError, match="image ids"):
        coco_evaluate(ann, [{**dets[0], "image_id": 999}])


def test_detection_meter(shapes):
    ds = CocoDetection(shapes["val_images"], shapes["val_ann"], detection_transforms(64))
    meter = DetectionMeter(ds.ground_truth(), ds.cat_ids)
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["labels"])
        pred = {"boxes": scale_boxes(t["boxes"], t["img_size"], t["orig_size"]).to(torch.bfloat16).float(),
                "scores": torch.linspace(1.0, 0.5, n), "labels": t["labels"]}
        meter.update([pred], [t], loss_sum=2.0)
    meter.reduce(DistEnv())
    m = meter.compute()
    assert m["AP50"] == pytest.approx(1.0) and m["AP"] > 0.8 and m["num_images"] == N_VAL and m["loss"] == 2.0

    partial = DetectionMeter(shapes["val_ann"], ds.cat_ids)  # only the images seen are scored
    _, t = ds[0]
    partial.update([{"boxes": scale_boxes(t["boxes"], (64, 64), (128, 128)), "scores": torch.ones(len(t["labels"])),
                     "labels": t["labels"]}], [t])
    assert partial.compute()["AP"] == pytest.approx(1.0)


def _ddp_worker(rank, world, port, gt, out_q):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        meter = DetectionMeter(gt, [1, 2, 3, 4, 5])
        for a in gt["annotations"]:
            if a["image_id"] % world == rank:  # each process sees half of the images
                x, y, w, h = a["bbox"]
                meter.update([{"boxes": torch.tensor([[x, y, x + w, y + h]]), "scores": torch.ones(1),
                               "labels": torch.tensor([a["category_id"] - 1])}], [{"image_id": a["image_id"]}])
        out_q.put((rank, meter.reduce(DistEnv(rank=rank, world_size=world)).compute()))
    finally:
        dist.destroy_process_group()


def test_detection_meter_gathers_across_processes():
    """Two gloo processes, each with half of the images, both score all of them."""
    import socket

    import torch.multiprocessing as mp

    gt = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in (1, 2)],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 10, 30, 30], "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 4, "bbox": [50, 20, 20, 40], "iscrowd": 0}],
          "categories": [{"id": k, "name": c} for k, c in enumerate(CATEGORIES, 1)]}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")  # fork after other tests ran threads can hang
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, gt, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(q.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    assert results[0]["AP"] == pytest.approx(1.0) and results[1]["AP"] == pytest.approx(1.0)
    assert results[0]["num_images"] == results[1]["num_images"] == 2

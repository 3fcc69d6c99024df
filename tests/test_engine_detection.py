"""The detection task end to end: `vizoo train stageinteractor_tiny` on a tiny shapes set picks the
detection task and recipe by itself, writes its run files, resumes, and is scored by COCO AP
that the reference evaluator reproduces from the written results file; `vizoo eval` agrees."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from vizoo.cli import main
from vizoo.engine.config import RECIPES, TrainConfig, config_from_args
from vizoo.engine.detection import SHAPES, DetectionTask
from vizoo.engine.metrics import read_jsonl

#: a smaller decoder than the registered tiny one (same mechanisms: 2 stages, reuse from stage 1)
SMALL = {"num_queries": 8, "num_stages": 2, "reuse_from": 1, "dim": 32, "ffn_dim": 64, "out_patterns": 8,
         "num_heads": 2}
FAST = ["--img-size", "64", "--batch-size", "4", "--progress", "off",
        "--model-kwargs", *(f"{k}={v}" for k, v in SMALL.items())]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from vizoo.data.shapes import generate_shapes

    return generate_shapes(tmp_path_factory.mktemp("data") / "shapes", num_train=24, num_val=8, img_size=64,
                           seed=0, progress=False)


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory):
    """One epoch, then `--resume` to a second; returns the run dir and the resumed run's --json."""
    out = tmp_path_factory.mktemp("run") / "det"
    argv = ["train", "stageinteractor_tiny", "--data", str(shapes["root"]), "--out", str(out), *FAST]
    assert main([*argv, "--epochs", "1"]) == 0
    first = read_jsonl(out / "metrics.jsonl")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main([*argv, "--epochs", "2", "--resume", "--json"]) == 0
    text = buf.getvalue()
    return {"dir": out, "first": first, "log": text, "result": json.loads(text[text.index("{\n"):])}


def _coco_stats(ann_file, results_file) -> list[float]:
    """The reference evaluator on the files alone (not the engine's meter)."""
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(str(ann_file))
    ev = COCOeval_faster(gt, gt.loadRes(str(results_file)), iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(s) for s in ev.stats]


def _parse(argv):
    from vizoo.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def test_task_and_recipe_follow_the_model():
    cfg = TrainConfig.from_dict({"model": "stageinteractor_tiny"})
    assert cfg.task == "detection" and cfg.recipe == "detection" and cfg.data == "shapes"
    assert (cfg.lr, cfg.weight_decay, cfg.clip_grad, cfg.batch_size) == (5e-4, 1e-4, 1.0, 8)
    assert cfg.opt == "adamw" and cfg.mixup == 0 and cfg.smoothing == 0 and cfg.hflip == 0.5 and cfg.augment
    flags = config_from_args(_parse(["stageinteractor_tiny", "--lr", "1e-3", "--data", "somewhere"]))
    assert flags.task == "detection" and flags.lr == 1e-3 and flags.data == "somewhere"  # flags beat the recipe
    assert TrainConfig.from_dict(flags.to_dict()) == flags  # config.yaml reruns as it ran
    classifier = TrainConfig.from_dict({"model": "mobilenetv2_100_evos0", "data": "digits"})
    assert classifier.task == "classification" and classifier.recipe == "digits"
    assert set(RECIPES["detection"]) >= {"lr", "clip_grad", "sched", "warmup_epochs"}


def test_bundled_shapes_are_generated_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("VIZOO_DATA", str(tmp_path))
    monkeypatch.setitem(SHAPES, "num_train", 3)
    monkeypatch.setitem(SHAPES, "num_val", 2)
    monkeypatch.setitem(SHAPES, "img_size", 64)
    cfg = TrainConfig.from_dict({"model": "stageinteractor_tiny", "progress": "off"})
    data = DetectionTask(cfg).load_data(cfg)
    assert (len(data.splits["train"]), len(data.splits["val"])) == (3, 2)
    assert data.labels == ["circle", "square", "triangle", "ellipse", "cross"]


def test_flip_moves_boxes_with_the_image(shapes):
    from vizoo.data.coco import CocoDetection, detection_transforms
    from vizoo.engine.detection import DetectionSplit

    plain, flipped = (DetectionSplit(CocoDetection(shapes["train_images"], shapes["train_ann"])) for _ in range(2))
    plain.configure(detection_transforms(64, 0.0), [0.0] * 3, [1.0] * 3, seed=None)
    flipped.configure(detection_transforms(64, 1.0), [0.0] * 3, [1.0] * 3, seed=0)
    (a, ta), (b, tb) = plain[0], flipped[0]
    assert torch.equal(a.flip(-1), b)
    mirrored = torch.stack([64 - ta["boxes"][:, 2], ta["boxes"][:, 1], 64 - ta["boxes"][:, 0], ta["boxes"][:, 3]], 1)
    assert torch.allclose(tb["boxes"], mirrored) and torch.equal(ta["labels"], tb["labels"])


def test_loss_decreases_on_a_fixed_batch(shapes):
    from vizoo.data.coco import detection_collate

    cfg = TrainConfig.from_dict({"model": "stageinteractor_tiny", "data": str(shapes["root"]), "img_size": 64,
                                 "model_kwargs": SMALL})
    task = DetectionTask(cfg)
    data = task.load_data(cfg)
    torch.manual_seed(0)
    model = task.create_model(cfg, data)
    task.attach_transforms(cfg, data, model)
    batch = detection_collate([data.splits["val"][i] for i in range(4)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        out = task.train_step(model, batch)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(out.loss.detach()))
    assert {"loss_cls", "loss_l1", "loss_giou", "pos_per_gt_s0"} <= set(out.logs)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses


def test_training_writes_the_run_files_and_resumes(run):
    names = {p.name for p in run["dir"].iterdir()}
    assert {"config.yaml", "metrics.jsonl", "best.safetensors", "last.safetensors", "last_state.pt",
            "coco_results.json", "predictions.png", "training_curves.png"} <= names
    assert [r["epoch"] for r in run["first"]] == [1]
    records = read_jsonl(run["dir"] / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and records[0] == run["first"][0]  # continued, not redone
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in records)
    assert "resumed" in run["log"]
    config = (run["dir"] / "config.yaml").read_text()
    assert "task: detection" in config and "recipe: detection" in config
    sidecar = json.loads((run["dir"] / "best.json").read_text())
    assert sidecar["labels"] == ["circle", "square", "triangle", "ellipse", "cross"]
    assert sidecar["pretrained_cfg"]["input_size"] == [3, 64, 64]
    assert (run["dir"] / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ap_is_what_the_coco_evaluator_computes_from_the_results_file(run, shapes):
    results = json.loads((run["dir"] / "coco_results.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    stats = _coco_stats(shapes["val_ann"], run["dir"] / "coco_results.json")  # best weights' detections
    assert run["result"]["metrics"]["best_AP"] == pytest.approx(stats[0], abs=1e-9)


def test_vizoo_eval_reproduces_the_training_ap(run, shapes, tmp_path, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run["dir"] / "best.safetensors"), "--data", str(shapes["root"]),
                 "--out", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["AP"] == pytest.approx(run["result"]["metrics"]["best_AP"], abs=1e-9)
    stats = _coco_stats(shapes["val_ann"], tmp_path / "coco_results.json")
    for key, i in (("AP", 0), ("AP50", 1), ("AP75", 2), ("AR100", 8)):
        assert report[key] == pytest.approx(stats[i], abs=1e-9), key
    assert report["num_images"] == 8 and (tmp_path / "eval.json").is_file()
    # the human-readable form prints AP
    assert main(["eval", "--checkpoint", str(run["dir"]), "--data", str(shapes["root"]), "--out", str(tmp_path)]) == 0
    assert f"AP {report['AP']:.4f}" in capsys.readouterr().out


def test_bad_data_is_one_clear_error_line(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    capsys.readouterr()
    rc = main(["train", "stageinteractor_tiny", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"),
               *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "not a COCO detection folder" in err and "annotations/instances_train.json" in err
    # a classification model cannot train on the shapes
    rc = main(["train", "mobilenetv2_100_evos0", "--data", "shapes", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "classification model" in err

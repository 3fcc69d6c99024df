"""Continual training through the engine: zero forgetting (PyTorch and exported files), resume,
forgetting of the sequential baseline, and the multi-task files' size."""
import numpy as np
import pytest
import torch

import vizoo
from vizoo.continual.sequence import run_sequence, task_logits
from vizoo.engine.continual import load_split

TASKS = ["digits_0_4", "shapes", "digits_5_9"]
FAST = {"batch_size": 64}


def _anchor(method: str = "clr", seed: int = 0):
    torch.manual_seed(seed)
    return vizoo.create_model("clr_resnet18_025", num_classes=0, method=method)


def _file_outputs(path, signature, x):
    from vizoo.export.tflite import TFLiteRunner

    run = TFLiteRunner(path, threads=1, signature=signature)
    return np.concatenate([run(x[i:i + 1])[0] for i in range(len(x))])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """CLR over three tasks (1 epoch each); task 1's logits and a one-task file taken right after task 1."""
    from vizoo.export import export_model

    out = tmp_path_factory.mktemp("continual")
    model = _anchor()
    x = load_split(TASKS[0], 32, 0).test[0][:24]
    seen = {}

    def after_task(j, task, row):
        if j == 0:
            seen["logits"] = task_logits(model, TASKS[0], x).clone()
            seen["file"] = export_model(model, "tflite", out_dir=out / "one_task", verify_images=4,
                                        latency=False).result("tflite").file
            seen["row"] = list(row)

    result = run_sequence(model, TASKS, out / "clr", epochs=1, overrides=FAST, on_task=after_task)
    return model, result, seen, x, out


def test_clr_has_zero_forgetting_bit_for_bit(trained):
    model, result, seen, x, _ = trained
    assert torch.equal(task_logits(model, TASKS[0], x), seen["logits"])
    assert result.forgetting == [0.0] * len(TASKS)
    assert result.accuracy[0][0] == seen["row"][0]
    assert all(v is not None for v in result.accuracy[-1])
    assert result.params_per_task == model.parameters_per_task() > 0


def test_the_multitask_file_computes_task_one_exactly_as_before(trained):
    """Task 1's signature in the three-task file gives bit-identical outputs to the one-task file
    exported right after task 1; every task's signature is verified against PyTorch."""
    from vizoo.export import export_model

    model, _, seen, x, out = trained
    rep = export_model(model, ["tflite", "coreml"], out_dir=out / "all_tasks", verify_images=8, latency=False)
    assert rep.ok, rep.summary()
    tfl = rep.result("tflite")
    assert set(tfl.verification["functions"]) == set(TASKS)
    assert set(rep.result("coreml").verification["functions"]) == set(TASKS)
    assert np.array_equal(_file_outputs(tfl.file, TASKS[0], _norm(model, x)),
                          _file_outputs(seen["file"], TASKS[0], _norm(model, x)))
    single = next((out / "one_task").glob("*.tflite")).stat().st_size
    assert tfl.size_bytes <= single * (1 + 0.05 * len(TASKS))


def _norm(model, x):
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


def test_a_finished_sequence_resumes_without_training_again(trained):
    model, result, _, x, out = trained
    fresh = _anchor()  # same anchor weights (same seed), no tasks
    again = run_sequence(fresh, TASKS, out / "clr", epochs=1, overrides=FAST)
    assert again.accuracy == result.accuracy
    for task in TASKS:
        assert torch.equal(task_logits(fresh, task, x), task_logits(model, task, x))


def test_sequential_finetuning_forgets(tmp_path):
    model = _anchor("sequential")
    x = load_split(TASKS[0], 32, 0).test[0][:24]
    before = {}
    run_sequence(model, TASKS[:2], tmp_path, epochs=1, overrides=FAST,
                 on_task=lambda j, t, r: before.setdefault("logits", task_logits(model, TASKS[0], x).clone()))
    assert not torch.equal(task_logits(model, TASKS[0], x), before["logits"])

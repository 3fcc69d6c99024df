"""Data: bundled digits, user folders, timm transforms, and loaders whose order is a function of
(seed, epoch, position) only."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vizoo.data.bundled import digits_arrays
from vizoo.data.digits import DigitsDataset, stratified_split
from vizoo.data.folder import DatasetError, image_folder_splits
from vizoo.data.loaders import EpochBatchSampler, ShardSampler, TransformedDataset, build_datasets
from vizoo.data.transforms import AugmentConfig, build_transform, resolve_data_cfg


# ----------------------------------------------------------------------------- digits
def test_digits_split_is_fixed_stratified_and_complete():
    train = DigitsDataset("train", img_size=16)
    val = DigitsDataset("val", img_size=16)
    assert len(train) + len(val) == 1797
    assert set(train.indices).isdisjoint(val.indices)
    # every class is ~20% held out
    _, y = digits_arrays(8)
    for c in range(10):
        n_c = int((y == c).sum())
        assert abs(sum(t == c for t in val.targets) - 0.2 * n_c) <= 1
    again = DigitsDataset("val", img_size=16)
    assert np.array_equal(again.indices, val.indices)
    other_seed = DigitsDataset("val", img_size=16, split_seed=1)
    assert not np.array_equal(other_seed.indices, val.indices)


def test_digits_images_are_the_bundled_pixels():
    ds = DigitsDataset("all", img_size=24, in_chans=3)
    x, y = digits_arrays(24, in_chans=1)
    img, target = ds[5]
    assert img.size == (24, 24) and img.mode == "RGB" and target == int(y[5])
    expected = (x[5, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(img)[..., 0], expected)
    assert DigitsDataset("all", img_size=24, in_chans=1)[5][0].mode == "L"


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split([0, 1, 0, 1], 1.5)


# ----------------------------------------------------------------------------- transforms
def test_transform_normalises_like_the_model_config():
    """timm's eval pipeline with crop 1.0 must equal (pixels/255 - mean) / std computed by hand."""
    cfg = resolve_data_cfg({"input_size": (3, 224, 224), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
                            "interpolation": "bilinear", "crop_pct": 0.9}, img_size=16, in_chans=1, crop_pct=1.0)
    assert cfg.input_size == (1, 16, 16)
    assert cfg.mean == pytest.approx((0.4,)) and cfg.std == pytest.approx((0.25,))
    img, _ = DigitsDataset("all", img_size=16, in_chans=1)[0]
    out = build_transform(cfg)(img)
    ref = (torch.from_numpy(np.array(img)).float() / 255 - 0.4) / 0.25
    assert out.shape == (1, 16, 16)
    torch.testing.assert_close(out[0], ref, atol=1e-6, rtol=0)
    rgb = build_transform(resolve_data_cfg({}, img_size=16, in_chans=3, crop_pct=1.0))(img)  # grey -> RGB
    assert rgb.shape == (3, 16, 16)


def test_seeded_augmentation_depends_only_on_seed_epoch_index():
    base = DigitsDataset("train", img_size=16)
    tf = build_transform(resolve_data_cfg({}, 16, 1, 1.0), is_training=True,
                         augment=AugmentConfig(enabled=True, scale=(0.5, 1.0), hflip=0.5, color_jitter=0.0))
    a, b = TransformedDataset(base, tf, seed=3), TransformedDataset(base, tf, seed=3)
    first = [a[i][0] for i in (7, 2, 9)]
    state = torch.get_rng_state()
    second = [b[i][0] for i in (9, 2, 7)][::-1]  # other order, other object
    assert torch.equal(state, torch.get_rng_state()), "main-process RNG must be left untouched"
    for u, v in zip(first, second):
        assert torch.equal(u, v)
    b.set_epoch(1)
    assert not all(torch.equal(u, b[i][0]) for u, i in zip(first, (7, 2, 9)))


# ----------------------------------------------------------------------------- folders
def _write_images(root, classes, n, size=(12, 10), bad=()):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    for rel in bad:
        (root / rel).write_bytes(b"this is not an image")


def test_image_folder_single_tree_split_and_corrupt_files(tmp_path):
    _write_images(tmp_path, ["cat", "dog", "eel"], 6, bad=["dog/broken.jpg", "eel/empty.png"])
    (tmp_path / "eel" / "zero.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = image_folder_splits(tmp_path, val_fraction=1 / 3, split_seed=0)
    msgs = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(msgs) == 1 and "skipped 3 of 21" in msgs[0]
    assert splits["train"].classes == ["cat", "dog", "eel"]
    assert len(splits["train"]) == 12 and len(splits["val"]) == 6
    assert sorted(splits["val"].targets) == [0, 0, 1, 1, 2, 2]
    img, target = splits["val"][0]
    assert img.size == (12, 10) and target in (0, 1, 2)


def test_image_folder_train_val_layout_and_label_mapping(tmp_path):
    _write_images(tmp_path / "train", ["a", "b"], 3)
    _write_images(tmp_path / "val", ["b"], 2)
    splits = image_folder_splits(tmp_path)
    assert len(splits["train"]) == 6 and splits["val"].targets == [1, 1]  # "b" keeps index 1
    with pytest.raises(DatasetError, match="does not know"):
        image_folder_splits(tmp_path, classes=["a"])


def test_missing_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_datasets(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no class folders"):
        build_datasets(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.jpg").write_bytes(b"xx")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(DatasetError, match="no readable images"):
        build_datasets(tmp_path)


def test_image_that_fails_late_is_replaced_with_a_warning(tmp_path):
    _write_images(tmp_path, ["a"], 3)
    splits = image_folder_splits(tmp_path, val_fraction=0.34)
    path = splits["all"].samples[0][0]
    path.write_bytes(b"corrupted after the scan")
    with pytest.warns(UserWarning, match="could not decode"):
        img, _ = splits["all"][0]
    assert img.size == (12, 10)


# ----------------------------------------------------------------------------- samplers
def test_resumed_sampler_yields_the_remaining_batches():
    full = EpochBatchSampler(100, 8, seed=4)
    full.set_epoch(2)
    batches = list(full)
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)  # drop_last
    resumed = EpochBatchSampler(100, 8, seed=4)
    resumed.set_epoch(2, start_batch=5)
    assert list(resumed) == batches[5:]
    full.set_epoch(3)
    assert list(full) != batches


def test_distributed_shards_make_up_the_single_process_batches():
    single = EpochBatchSampler(50, 8, seed=1)
    shards = [EpochBatchSampler(50, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in [single, *shards]:
        s.set_epoch(1)
    for whole, a, b in zip(single, *shards):
        assert len(a) == len(b) == 4
        assert sorted(a + b) == sorted(whole)
    with pytest.raises(ValueError, match="not divisible"):
        EpochBatchSampler(50, 9, world_size=2)
    eval_shards = [list(ShardSampler(11, r, 2)) for r in range(2)]
    assert sorted(eval_shards[0] + eval_shards[1]) == list(range(11))

"""The continual-learning benchmark's bundled data: deterministic, well-formed, honestly split,
and each task's images and labels what its name says (checked against independent recomputation)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vizoo.data.bundled import digits_arrays
from vizoo.data.continual import TASK_NAMES, ContinualSplit, continual_tasks, proxy_task

S = 32
CAP = 4  # train images per class: tiny tasks (val and test keep their full size)
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def tasks() -> list[ContinualSplit]:
    return continual_tasks(img_size=S, seed=0, train_per_class=CAP)


@pytest.fixture(scope="module")
def by_name(tasks) -> dict[str, ContinualSplit]:
    return {t.name: t for t in tasks}


@pytest.fixture(scope="module")
def proxy() -> ContinualSplit:
    return proxy_task(img_size=S, seed=0, n=96)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in x}


def test_default_sequence_is_six_named_tasks_in_order(tasks):
    assert len(TASK_NAMES) >= 6 and len(set(TASK_NAMES)) == len(TASK_NAMES)
    assert [t.name for t in tasks] == list(TASK_NAMES)
    assert len({t.domain for t in tasks}) == len(tasks)  # one phrase per task, all different
    assert {"digits_0_4", "digits_5_9", "digits_rot_inv", "textures", "shapes", "colours"} <= set(TASK_NAMES)


def test_tensor_shapes_dtypes_ranges_and_labels(tasks, proxy):
    for t in tasks + [proxy]:
        assert t.num_classes == len(t.classes) == len(set(t.classes)) >= 2, t.name
        for split in SPLITS:
            x, y = getattr(t, split)
            assert x.dtype == torch.float32 and y.dtype == torch.int64, (t.name, split)
            assert x.ndim == 4 and x.shape[1:] == (3, S, S) and x.shape[0] == y.shape[0] > 0, (t.name, split)
            assert x.is_contiguous() and y.is_contiguous(), (t.name, split)
            assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1, (t.name, split)
            assert x.std() > 0.05, (t.name, split)  # real images, not a blank canvas
            if t is not proxy or split == "train":  # (the tiny proxy's val/test hold fewer images than classes)
                assert set(y.unique().tolist()) == set(range(t.num_classes)), (t.name, split)  # every class present


def test_classes_balanced_and_split_proportions(tasks):
    for t in tasks:
        for split in SPLITS:
            counts = torch.bincount(getattr(t, split)[1], minlength=t.num_classes)
            assert counts.max() <= max(counts.min() * 1.15, counts.min() + 2), (t.name, split, counts.tolist())
        assert (torch.bincount(t.train[1]) == CAP).all(), t.name  # the cap is exact
        n_val, n_test = len(t.val[1]), len(t.test[1])
        assert 0.55 < n_val / n_test < 0.95, (t.name, n_val, n_test)  # ~15 % vs ~20 %


def test_default_sizes_fit_the_budget():
    full = continual_tasks(["digits_0_4", "textures", "digits_rot_inv"], img_size=16)
    for t in full:
        n_train, n_val, n_test = (len(getattr(t, s)[1]) for s in SPLITS)
        assert 300 <= n_train <= 1000, (t.name, n_train)
        total = n_train + n_val + n_test
        assert 0.10 < n_val / total < 0.20 and 0.15 < n_test / total < 0.25, (t.name, n_train, n_val, n_test)
        assert t.train[0].shape[-1] == 16


def test_deterministic_capped_and_seed_changes_data_not_classes(tasks):
    again = continual_tasks(img_size=S, seed=0, train_per_class=CAP + 3)  # the same seed, a larger cap
    other = continual_tasks(img_size=S, seed=1, train_per_class=CAP)
    for a, b, c in zip(tasks, again, other):
        assert a.classes == b.classes == c.classes and a.domain == c.domain
        for split in ("val", "test"):  # held-out splits do not depend on the cap: bit for bit the same
            assert torch.equal(getattr(a, split)[0], getattr(b, split)[0]), (a.name, split)
            assert torch.equal(getattr(a, split)[1], getattr(b, split)[1]), (a.name, split)
        if a.name.startswith("digits"):  # a smaller cap keeps a subset of the digits
            assert _rows(a.train[0]) < _rows(b.train[0]), a.name
        else:  # and a prefix of the drawn images (classes interleaved)
            n = len(a.train[1])
            assert torch.equal(a.train[0], b.train[0][:n]) and torch.equal(a.train[1], b.train[1][:n]), a.name
        assert not torch.equal(a.test[0], c.test[0]), a.name  # another split / other draws


def test_no_image_shared_between_splits(tasks, proxy):
    for t in tasks + [proxy]:
        rows = {s: _rows(getattr(t, s)[0]) for s in SPLITS}
        assert len(rows["val"]) == len(t.val[1]) and len(rows["test"]) == len(t.test[1]), t.name  # no repeats
        assert not rows["train"] & rows["test"], t.name
        assert not rows["train"] & rows["val"], t.name
        assert not rows["val"] & rows["test"], t.name


def test_digits_images_and_labels_are_sklearns():
    from sklearn.datasets import load_digits

    x_all, y_all = digits_arrays(S, 3)
    lookup = {img.numpy().tobytes(): int(c) for img, c in zip(x_all, y_all)}
    tasks = {t.name: t for t in continual_tasks(["digits_0_4", "digits_5_9"], img_size=S, seed=3)}
    seen = []
    for name, offset in (("digits_0_4", 0), ("digits_5_9", 5)):
        t = tasks[name]
        assert t.classes == [str(offset + k) for k in range(5)]
        for split in SPLITS:
            x, y = getattr(t, split)
            targets = torch.tensor([lookup[img.numpy().tobytes()] for img in x])  # KeyError: not a digit
            assert torch.equal(targets, y + offset), (name, split)
            seen += [img.numpy().tobytes() for img in x]
    assert len(seen) == len(set(seen)) == len(load_digits().target)  # every digit once, in one split of one task


def test_digits_rot_inv_is_rotated_and_inverted_digits():
    from sklearn.datasets import load_digits

    t = continual_tasks(["digits_rot_inv"], img_size=S, seed=0, train_per_class=10)[0]
    assert t.classes == [str(k) for k in range(10)]
    d = load_digits()
    shifted = 1.0 - np.rot90(d.images / 16.0, 1, axes=(1, 2))  # at 8 x 8, counter-clockwise, then inverted
    ref = F.interpolate(torch.from_numpy(np.ascontiguousarray(shifted, dtype=np.float32))[:, None], size=(S, S),
                        mode="bilinear", align_corners=False).clamp(0, 1)
    ref_flat = ref.flatten(1)
    for split in SPLITS:
        x, y = getattr(t, split)
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey in three channels
        dist = torch.cdist(x[:, 0].flatten(1).double(), ref_flat.double())
        best = dist.argmin(1)
        assert dist.min(1).values.max() < 1e-4, split  # each image is one recomputed digit...
        assert torch.equal(torch.from_numpy(d.target)[best].long(), y), split  # ...with its label
        assert len(set(best.tolist())) == len(best)
    # and it is a real shift: an image is far from its un-rotated, un-inverted original
    plain = digits_arrays(S, 1)[0].flatten(1)
    assert torch.cdist(t.test[0][:, 0].flatten(1), plain).min() > 1.0


def test_proxy_labels_are_the_rotation_and_colour_order_applied(proxy):
    from vizoo.data.continual import PROXY_PERMUTATIONS

    n_perm = len(PROXY_PERMUTATIONS)
    assert len(proxy.classes) == 4 * n_perm and proxy.classes[0] == "0_rgb"
    for split in SPLITS:
        x, y = getattr(proxy, split)
        assert len(y) % 4 == 0
        counts = torch.bincount(y, minlength=4 * n_perm)
        assert counts.max() - counts.min() <= 1 + len(y) // (4 * n_perm) // 2, counts.tolist()

        def undo(img, label):
            k, p = divmod(int(label), n_perm)
            inverse = [PROXY_PERMUTATIONS[p].index(c) for c in range(3)]
            return torch.rot90(img[inverse], -k, dims=(-2, -1))

        for i in range(len(y)):
            base = undo(x[i - i % 4], y[i - i % 4])
            assert torch.equal(undo(x[i], y[i]), base), (split, i)  # undoing the label gives the upright image
            for other in range(4):  # and undoing another rotation does not
                if other != int(y[i]) // n_perm:
                    wrong = other * n_perm + int(y[i]) % n_perm
                    assert not torch.equal(undo(x[i], wrong), base), (split, i, other)
    assert len(proxy.train[1]) == 96


def test_proxy_holds_no_task_image(tasks, proxy):
    x_digits = digits_arrays(S, 3)[0]
    pool = torch.cat([x_digits, 1 - torch.rot90(x_digits, 1, dims=(-2, -1))]).flatten(1)
    px = torch.cat([proxy.train[0], proxy.test[0]]).flatten(1)
    assert torch.cdist(px, pool).min() > 1.0  # not a digit, not even nearly
    task_rows = set().union(*(_rows(getattr(t, s)[0]) for t in tasks for s in SPLITS))
    assert not _rows(px.view(-1, 3, S, S)) & task_rows


def test_proxy_is_deterministic_and_seeded():
    a, b, c = proxy_task(S, 0, 16), proxy_task(S, 0, 16), proxy_task(S, 1, 16)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[0], b.test[0])
    assert not torch.equal(a.train[0], c.train[0])


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="valid names: digits_0_4, textures"):
        continual_tasks(["digits_0_4", "mnist"])
    with pytest.raises(ValueError, match="mnist"):
        continual_tasks(["mnist"])
    with pytest.raises(ValueError, match="img_size"):
        continual_tasks(["shapes"], img_size=8)
    with pytest.raises(ValueError, match="train_per_class"):
        continual_tasks(["shapes"], train_per_class=0)
    with pytest.raises(ValueError, match="n must be"):
        proxy_task(n=3)
    assert [t.name for t in continual_tasks("digits_5_9", train_per_class=1)] == ["digits_5_9"]  # a str is one name

"""Parity metrics, bounds, input checks and the likely-cause diagnosis (no converter needed)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from vizoo.data.bundled import normalize
from vizoo.export.errors import InputSizeError, known_fix, op_from_message
from vizoo.export.spec import resolve_spec
from vizoo.export.verify import BOUNDS, RunFunction, parity, parity_inputs, verify_functions

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tiny_classifier(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(  # a MobileNet-style stem: conv, depthwise, pointwise, pooled head
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes)).eval()
    m.pretrained_cfg = {"input_size": (3, 32, 32), "mean": MEAN, "std": STD, "num_classes": num_classes}
    return m


def export_labelled_tiny(out, formats: str, precisions: tuple[str, ...], latency: bool, **options):
    """The tiny classifier with class labels, exported: the fixture of the per-format tests."""
    from vizoo.export import export_model

    model = tiny_classifier()
    model.labels = [f"class_{i}" for i in range(10)]
    report = export_model(model, formats=formats, precision=precisions, out_dir=out, name="tiny",
                          latency=latency, **options)
    return model, report, out


def test_parity_metrics_match_direct_numpy():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((6, 5)).astype(np.float32)
    got = ref.copy()
    got[2, 1] += 0.5                 # one logit off
    got[3] = got[3][::-1]            # one image with another order of classes
    p = parity([ref], [got], classifier=True)
    assert p.max_abs_diff == pytest.approx(np.abs(ref - got).max())
    assert p.output_range == pytest.approx(ref.max() - ref.min())
    cos = [float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(ref, got)]
    assert p.cosine_min == pytest.approx(min(cos), abs=1e-6)
    assert p.top1_agreement == pytest.approx(np.mean(ref.argmax(1) == got.argmax(1)))
    assert BOUNDS["fp32"].failures(p)                      # clearly not an fp32 match
    same = parity([ref], [ref.copy()], classifier=True)
    assert same.max_abs_diff == 0 and same.top1_agreement == 1 and not BOUNDS["fp32"].failures(same)


def test_non_finite_output_fails_every_bound():
    ref = np.ones((2, 3), np.float32)
    got = ref.copy()
    got[0, 0] = np.nan
    p = parity([ref], [got], classifier=False)
    assert BOUNDS["fp32"].failures(p) and BOUNDS["int8"].failures(p)


def test_parity_inputs_are_real_photos_rounded_to_8_bits():
    spec = resolve_spec(tiny_classifier())
    pin = parity_inputs(spec, 20)
    assert len(pin.samples) == 20 and pin.images01 is not None
    x01 = torch.cat(pin.images01)
    assert torch.equal(torch.round(x01 * 255) / 255, x01)          # 8-bit pixels
    assert x01.std() > 0.1                                          # photographs, not a constant
    assert torch.allclose(torch.cat([s[0] for s in pin.samples]), normalize(x01, MEAN, STD))


def test_bad_input_sizes_are_refused_before_conversion():
    model = tiny_classifier()
    with pytest.raises(InputSizeError, match="channels"):
        resolve_spec(model, input_size=(1, 32, 32))
    with pytest.raises(InputSizeError, match="not valid"):
        resolve_spec(model, input_size=(3, 0, 32))
    with pytest.raises(InputSizeError, match="input_size"):
        resolve_spec(nn.Conv2d(3, 4, 3))                          # plain module, no config

    class FixedSize(nn.Module):                                   # like a ViT's position embedding
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(1, 4, 16, 16))
            self.proj = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return (self.proj(x) + self.pos).mean((2, 3))

    with pytest.raises(InputSizeError, match="cannot run at input size"):
        resolve_spec(FixedSize(), input_size=(3, 32, 32))


def _function(model: nn.Module, transform) -> RunFunction:
    """A deployed copy of ``model`` whose app-side preprocessing is ``transform``."""
    @torch.no_grad()
    def run(sample):
        return [model(transform(sample[0])).numpy()]
    return RunFunction("serving_default", "tensor", run)


@pytest.mark.parametrize("transform, cause", [
    (lambda x: x.transpose(-1, -2), "layout"),
    (lambda x: x.flip(1), "channel order"),
    (lambda x: (x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)),
     "normalisation"),
])
def test_mismatch_names_the_likely_cause(transform, cause):
    model = tiny_classifier()
    spec = resolve_spec(model)
    pin = parity_inputs(spec, 8)
    ref = spec.reference(pin.samples)
    # The "file" expects its input transformed: feeding it plain inputs is the bug to find.
    inverse = {"layout": lambda x: x.transpose(-1, -2), "channel order": lambda x: x.flip(1),
               "normalisation": lambda x: normalize(x, MEAN, STD)}[cause]
    result = verify_functions([_function(model, inverse)], spec, "fp32", pin, ref, None)
    assert result["status"] == "failed"
    assert cause in result["functions"]["serving_default"]["cause"]


def test_exact_copy_passes_fp32_bounds():
    model = tiny_classifier()
    spec = resolve_spec(model)
    pin = parity_inputs(spec, 8)
    ref = spec.reference(pin.samples)
    result = verify_functions([_function(model, lambda x: x)], spec, "fp32", pin, ref, None)
    assert result["status"] == "ok"


def test_converter_messages_give_op_and_fix():
    assert op_from_message("NotImplementedError: Unsupported fx node fft_rfft2, kind fft_rfft2") == "fft_rfft2"
    assert op_from_message("Didn't find op for builtin opcode 'STABLEHLO_SORT' version '1'") == "STABLEHLO_SORT"
    assert "topk" in known_fix("STABLEHLO_SORT")
    assert "cos/sin" in known_fix("fft_rfft2")


def test_labelled_inputs_report_accuracy_of_file_and_model():
    from vizoo.export.verify import labelled_inputs

    model = tiny_classifier()
    spec = resolve_spec(model)
    torch.manual_seed(1)
    images = torch.rand(12, 3, 32, 32)
    labels = torch.randint(0, 10, (12,))
    pin = labelled_inputs(spec, images, labels)
    ref = spec.reference(pin.samples)
    flipped = _function(model, lambda x: x.flip(-1))  # a "file" that differs from the model
    p = verify_functions([flipped], spec, "int8", pin, ref, None)["functions"]["serving_default"]["parity"]
    with torch.no_grad():
        x = normalize(torch.round(images * 255) / 255, MEAN, STD)
        truth = labels.numpy()
        expect_model = (model(x).argmax(1).numpy() == truth).mean()
        expect_file = (model(x.flip(-1)).argmax(1).numpy() == truth).mean()
    assert p["reference_accuracy"] == pytest.approx(expect_model)
    assert p["accuracy"] == pytest.approx(expect_file)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        labelled_inputs(spec, torch.rand(4, 3, 16, 16))

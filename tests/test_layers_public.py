"""`vizoo.layers` is the public home of the reusable blocks (as timm.layers is timm's)."""
import subprocess
import sys

import torch

import vizoo.layers


def test_evonorm_importable_from_the_package():
    from vizoo.layers import EvoNorm2dB0, EvoNorm2dS0

    x = torch.randn(2, 8, 4, 4)
    assert EvoNorm2dS0(8, group_size=4)(x).shape == x.shape
    assert EvoNorm2dB0(8).train()(x).shape == x.shape


def test_every_public_name_resolves():
    names = vizoo.layers.__all__
    assert len(names) == len(set(names))
    missing = [n for n in names if not hasattr(vizoo.layers, n)]
    assert not missing, missing
    for expected in ("EvoNorm2dS0", "EvoNorm2dB0", "ULSAM", "AdaptiveFrequencyFilter",
                     "TokenReorganizer", "export_mode", "ExportAware", "convert_norm_act"):
        assert expected in names


def test_no_import_cycle_in_a_fresh_interpreter():
    # the package first (before `import vizoo`) and after it: neither order may hit a cycle
    for code in ("from vizoo.layers import EvoNorm2dS0",
                 "import vizoo; from vizoo.layers import EvoNorm2dS0, EvoNorm2dB0"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]

"""Files that stay on XNNPACK's fast path: the grouped EvoNorms' export form (equal to the eager
form; one delegate partition, where the eager form's graph splits), the partition count read from
the interpreter, int8 files in one partition, and int8_mode auto's latency rule.

References are independent of the code under test: eager PyTorch for the export form, and the
ai-edge-litert interpreter's own node list / the flatbuffer's op table for the partitions.
Timings live in benchmarks/fast_path.py, not here.
"""
import collections
import json

import pytest
import torch
import torch.nn as nn

from vizoo.layers.evonorm import EvoNorm2dB0, EvoNorm2dB1, EvoNorm2dS0, EvoNorm2dS0a, EvoNorm2dS1
from vizoo.layers.export_mode import export_mode

GROUPED = [EvoNorm2dS0, EvoNorm2dS0a, EvoNorm2dS1]


def _randomise(layer: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1.0)
    return layer.eval()


@pytest.mark.parametrize("cls", GROUPED)
@pytest.mark.parametrize("channels,groups", [(48, 32), (64, 8), (16, 16), (144, 32)])
@pytest.mark.parametrize("apply_act", [True, False])
def test_export_form_equals_eager_form(cls, channels, groups, apply_act):
    """Within the fp32 parity bound (1e-4 of the output range), also for a batch of 3 and for
    inputs far from zero mean (where a one-pass E[x²] - E[x]² would lose the variance)."""
    layer = _randomise(cls(channels, groups=groups, apply_act=apply_act), seed=channels + groups)
    g = torch.Generator().manual_seed(1)
    for shift in (0.0, 50.0):
        x = torch.randn(3, channels, 7, 5, generator=g) * 2 + shift
        with torch.no_grad():
            eager = layer(x)
            with export_mode(layer):
                exported = layer(x)
        assert layer.exporting is False                      # export_mode restores the eager form
        rng = (eager.max() - eager.min()).item()
        assert (exported - eager).abs().max().item() <= 1e-5 * rng, (shift, rng)


@pytest.mark.parametrize("cls", [EvoNorm2dB0, EvoNorm2dB1])
def test_b_variants_export_form_equals_eager_form(cls):
    """B0/B1 at inference: eps of the per-sample statistic enters as a conv bias, nothing else moves."""
    layer = _randomise(cls(40), seed=4)
    layer.running_var.uniform_(0.3, 3.0)
    x = torch.randn(2, 40, 6, 6, generator=torch.Generator().manual_seed(5)) * 2 + 0.5
    with torch.no_grad():
        eager = layer(x)
        with export_mode(layer):
            exported = layer(x)
    torch.testing.assert_close(exported, eager, rtol=1e-5, atol=1e-5 * (eager.max() - eager.min()).item())


def test_swapped_standard_layers_equal_the_originals_and_are_put_back():
    """Padded max-pool: bit-identical (edge replication instead of -inf); GroupNorm: fp32 rounding."""
    from vizoo.layers.export_swaps import GroupNormExport, MaxPool2dExport

    net = nn.Sequential(nn.GroupNorm(4, 16), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, (0, 1)),
                        nn.MaxPool2d(2, 2), nn.GroupNorm(16, 16, affine=False)).eval()
    with torch.no_grad():
        net[0].weight.uniform_(0.5, 1.5)
        net[0].bias.uniform_(-1, 1)
    originals = list(net)
    for shape in [(2, 16, 17, 14), (1, 16, 32, 32)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(6)) * 3 + 5
        with torch.no_grad():
            eager = net(x)
            pooled = net[1](x)
            with export_mode(net):
                assert [type(m) for m in net][:3] == [GroupNormExport, MaxPool2dExport, MaxPool2dExport]
                assert type(net[3]) is nn.MaxPool2d                       # unpadded: left alone
                exported = net(x)
                assert torch.equal(net[1](x), pooled)
        torch.testing.assert_close(exported, eager, rtol=0, atol=1e-5 * (eager.max() - eager.min()).item())
    assert list(net) == originals and not any(hasattr(m, "norm") or hasattr(m, "pool") for m in net)
    tokens = nn.GroupNorm(4, 16).eval()            # (B, C, T): diffusers' attention blocks norm tokens
    x = torch.randn(2, 16, 36, generator=torch.Generator().manual_seed(7)) * 3 + 5
    seq = nn.Sequential(tokens)
    with torch.no_grad():
        eager = seq(x)
        with export_mode(seq):
            assert type(seq[0]) is GroupNormExport
            exported = seq(x)
    torch.testing.assert_close(exported, eager, rtol=0, atol=1e-5 * (eager.max() - eager.min()).item())


def test_export_form_has_no_reshape_or_expand():
    """The group average is a grouped 1x1 conv: no reshape/expand/view of activations, only 4-D."""
    layer = _randomise(EvoNorm2dS0(48, groups=32), seed=2)   # TF rule: 24 groups of 2 channels
    with export_mode(layer):
        ep = torch.export.export(layer, (torch.randn(1, 48, 8, 8),))
    targets = collections.Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")
    assert not [t for t in targets if "expand" in t or "reshape" in t or "_unsafe_view" in t], targets
    assert targets["aten.conv2d.default"] == 2
    ranks = {len(n.meta["val"].shape) for n in ep.graph.nodes
             if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 1}
    assert ranks == {4}, ranks


def _flatbuffer_op_counts(data: bytes) -> collections.Counter:
    """Ops of the main subgraph, read from the flatbuffer schema (not from the interpreter)."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.Model.GetRootAsModel(data, 0)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.Subgraphs(0)
    out = collections.Counter()
    for i in range(graph.OperatorsLength()):
        code = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
        out[names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]] += 1
    return out


class _EvoNet(nn.Module):
    """Every grouped EvoNorm, with groups < C (conv form) and groups == C (eps in a depthwise conv),
    B0/B1, and the standard layers the exporter swaps (padded max-pool, GroupNorm)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 48, 3, stride=2, padding=1), EvoNorm2dS0(48),        # 24 groups of 2
            nn.MaxPool2d(3, stride=2, padding=1), nn.GroupNorm(8, 48),        # -inf pad; 5-D stats
            nn.Conv2d(48, 16, 1), EvoNorm2dS0(16, groups=16),                 # one channel per group
            nn.Conv2d(16, 32, 1), EvoNorm2dS0a(32, groups=8),
            nn.Conv2d(32, 32, 3, padding=1, groups=32), EvoNorm2dS1(32, groups=4),
            nn.Conv2d(32, 24, 1), EvoNorm2dB0(24), nn.Conv2d(24, 24, 1), EvoNorm2dB1(24))
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3), keepdim=True).flatten(1))  # no NCHW transpose


@pytest.fixture(scope="module")
def evonet_files(tmp_path_factory):
    """The net exported by vizoo (fp32 + full int8), and the eager form converted directly."""
    import litert_torch

    import vizoo

    torch.manual_seed(0)
    net = _EvoNet()
    for m in net.modules():
        if isinstance(m, (EvoNorm2dB0, EvoNorm2dB1)):
            m.running_var.uniform_(0.5, 2.0)
    for m in net.modules():
        if hasattr(m, "v") and m.v is not None:
            _randomise(m, seed=3)
    net.eval().pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3}
    out = tmp_path_factory.mktemp("fastpath")
    report = vizoo.export(net, formats="tflite", precision=["fp32", "int8"], out_dir=out,
                          verify_images=8, latency=False, int8_mode="full")
    litert_torch.config.show_progress = False
    x = torch.rand(1, 32, 32, 3)
    eager = bytes(litert_torch.convert(litert_torch.to_channel_last_io(net, args=[0]).eval(), (x,)).model_content())
    return net, report, eager


def test_evonorm_file_runs_in_one_xnnpack_partition(evonet_files):
    from ai_edge_litert.interpreter import Interpreter

    _, report, _ = evonet_files
    r = report.result("tflite", "fp32")
    assert r.status == "ok", r.reason
    assert r.parity()["rel_max_abs_diff"] <= 1e-4 and r.parity()["top1_agreement"] == 1.0
    info = r.details["xnnpack"]
    assert info["partitions"] == 1 and info["ops_outside"] == {}
    data = open(r.file, "rb").read()
    graph_ops = _flatbuffer_op_counts(data)
    assert graph_ops["BROADCAST_TO"] == 0 and graph_ops["TRANSPOSE"] == 0
    assert graph_ops["CONV_2D"] >= 8                   # the group averages are convolutions
    assert info["op_counts"] == dict(graph_ops) and info["ops"] == sum(graph_ops.values())
    it = Interpreter(model_path=r.file)               # the interpreter's own word, independently
    it.allocate_tensors()
    assert [n["op_name"] for n in it._get_ops_details()].count("DELEGATE") == 1
    assert "1 XNNPACK partition" in r.summary()


def test_eager_form_splits_and_the_report_names_the_op(evonet_files):
    """The counter against a graph known to split: the eager group averages' BROADCAST_TOs and the
    max-pool's -inf PADV2 run outside XNNPACK, and the graph falls into many partitions."""
    from ai_edge_litert.interpreter import Interpreter

    from vizoo.export.tflite import describe_delegation, xnnpack_delegation

    _, _, eager = evonet_files
    graph_ops = _flatbuffer_op_counts(eager)
    info = xnnpack_delegation(eager)
    assert graph_ops["BROADCAST_TO"] >= 8 and graph_ops["PADV2"] == 1
    assert info["ops_outside"] == {"BROADCAST_TO": graph_ops["BROADCAST_TO"], "PADV2": 1}
    it = Interpreter(model_content=eager)
    it.allocate_tensors()
    assert info["partitions"] == [n["op_name"] for n in it._get_ops_details()].count("DELEGATE") >= 6
    assert describe_delegation(info).endswith(f"(outside: BROADCAST_TO×{graph_ops['BROADCAST_TO']}, PADV2×1)")


def test_full_int8_stays_in_one_partition_with_rsqrt_in_float(evonet_files):
    from test_export_tflite import _op_input_types

    _, report, _ = evonet_files
    r = report.result("tflite", "int8")
    assert r.status == "ok", r.reason
    assert r.details["io"]["inputs"][0]["dtype"] == "int8"
    assert r.details["xnnpack"]["partitions"] == 1 and r.details["xnnpack"]["ops_outside"] == {}
    types = _op_input_types(r.file)
    assert types["RSQRT"] == {"FLOAT32"}                          # XNNPACK has no int8 RSQRT
    assert types["CONV_2D"] == {"INT8"} and types["LOGISTIC"] == {"INT8"}


def test_dynamic_int8_keeps_depthwise_in_float_and_one_partition(evonet_files):
    from vizoo.export import quantize
    from vizoo.export.tflite import xnnpack_delegation

    _, report, _ = evonet_files
    data = quantize.tflite_int8_dynamic(open(report.result("tflite", "fp32").file, "rb").read())
    info = xnnpack_delegation(data)
    assert info["partitions"] == 1 and info["ops_outside"] == {}, info
    assert info["op_counts"]["DEPTHWISE_CONV_2D"] >= 1


def test_int8_auto_keeps_the_fastest_verified_mode_when_none_beats_fp32(tmp_path, monkeypatch):
    """The decision rule, with the timings fixed (the real ones are machine noise at this size):
    every verified mode slower than fp32 -> the fastest one, its own file restored on disk."""
    import vizoo
    from vizoo.export import api

    from test_export_verify import tiny_classifier

    ratios = {"full": 1.6, "mixed": 1.2, "dynamic": 2.5}

    def fake_timing(spec, result, options, threads):
        mode = result.details["quantization"]["int8_mode"]
        return {"latency_ms": ratios[mode], "fp32_latency_ms": 1.0, "latency_ratio": ratios[mode]}

    monkeypatch.setattr(api, "_int8_against_fp32", fake_timing)
    report = vizoo.export(tiny_classifier(), formats="tflite", precision="int8", out_dir=tmp_path,
                          verify_images=8, latency=False)
    r = report.result("tflite", "int8")
    assert r.status == "ok" and r.details["int8_mode"] == "mixed"
    assert [a["int8_mode"] for a in r.details["int8_attempts"]] == ["full", "mixed", "dynamic"]
    assert [a["latency_ratio"] for a in r.details["int8_attempts"]] == [1.6, 1.2, 2.5]
    assert r.details["int8_decision"]["faster_than_fp32"] is False
    assert "no verified int8 mode is faster than the fp32 file" in r.reason
    assert "Cause: " in r.details["int8_decision"]["cause"]
    # the file on disk and its sidecar are the mixed one (float I/O), not the last attempt
    assert r.details["io"]["inputs"][0]["dtype"] == "float32"
    side = json.loads(open(r.details["sidecar_file"]).read())
    assert side["quantization"]["int8_mode"] == "mixed"
    from vizoo.export.tflite import read_metadata
    assert read_metadata(r.file)["quantization"]["int8_mode"] == "mixed"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]   # no set-aside left


def test_int8_auto_goes_on_past_a_verified_but_slower_mode(tmp_path, monkeypatch):
    import vizoo
    from vizoo.export import api

    from test_export_verify import tiny_classifier

    ratios = {"full": 1.3, "mixed": 0.7, "dynamic": 0.5}
    monkeypatch.setattr(api, "_int8_against_fp32", lambda spec, result, options, threads: {
        "latency_ms": ratios[result.details["quantization"]["int8_mode"]], "fp32_latency_ms": 1.0,
        "latency_ratio": ratios[result.details["quantization"]["int8_mode"]]})
    report = vizoo.export(tiny_classifier(), formats="tflite", precision="int8", out_dir=tmp_path,
                          verify_images=8, latency=False)
    r = report.result("tflite", "int8")
    assert r.details["int8_mode"] == "mixed"                  # the first verified one not slower
    assert [a["int8_mode"] for a in r.details["int8_attempts"]] == ["full", "mixed"]
    assert r.details["int8_attempts"][0]["reason"].startswith("verified, but 1.30x the fp32 file's latency")
    assert r.details["int8_decision"]["faster_than_fp32"] is True
    assert r.reason.startswith("int8_mode auto chose mixed (full: verified, but 1.30x")


def test_diffusers_upsample_export_form_is_bit_identical():
    """diffusers' 2x nearest upsampling (RESIZE_NEAREST_NEIGHBOR, outside XNNPACK) becomes stacked copies."""
    upsampling = pytest.importorskip("diffusers.models.upsampling")
    from vizoo.layers.export_swaps import Upsample2DExport

    torch.manual_seed(0)
    net = nn.Sequential(upsampling.Upsample2D(8, use_conv=True), upsampling.Upsample2D(8, use_conv=False)).eval()
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        eager = net(x)
        with export_mode(net):
            assert all(type(m) is Upsample2DExport for m in net)
            exported = net(x)
    assert torch.equal(exported, eager)
    assert all(type(m) is upsampling.Upsample2D for m in net)


def test_small_embedding_export_form_is_bit_identical():
    """A class-label lookup (EMBEDDING_LOOKUP, outside XNNPACK) becomes a one-hot row times the table."""
    from vizoo.layers.export_swaps import EmbeddingExport

    torch.manual_seed(0)
    net = nn.ModuleList([nn.Embedding(10, 32), nn.Embedding(5000, 4)]).eval()
    ids = torch.tensor([[0, 9, 3], [7, 7, 1]])
    with torch.no_grad():
        eager = net[0](ids)
        with export_mode(net):
            assert type(net[0]) is EmbeddingExport and type(net[1]) is nn.Embedding  # large tables stay
            assert net[0].weight is net[0].embedding.weight  # read directly (learned query tables)
            exported = net[0](ids)
    assert torch.equal(exported, eager)
    assert type(net[0]) is nn.Embedding

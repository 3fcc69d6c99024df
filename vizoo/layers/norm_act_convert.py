"""Turn a CNN's BatchNorm + activation pairs into single EvoNorm layers, as the paper does.

The paper evaluates EvoNorm by replacing every BN-ReLU (BN-Swish in EfficientNets) of a network
with one EvoNorm layer; a BN that is *not* followed by an activation becomes an EvoNorm with the
nonlinearity off, i.e. the affine ``x·γ + β`` of the TF reference (``nonlinearity=False``).

What :func:`convert_norm_act` handles, in this order:

1. timm norm-act modules (``BatchNormAct2d``, ``SyncBatchNormAct``, ``FrozenBatchNormAct2d``):
   replaced in place; their activation is absorbed, or ``apply_act=False`` when it is ``Identity``.
2. ``nn.Sequential`` children (e.g. torchvision's ``Conv2dNormActivation``) where a BN is directly
   followed by a supported activation: the BN becomes EvoNorm, the activation ``nn.Identity``
   (state-dict keys keep their positions).
3. Every other 2-D BN: the model is traced with ``torch.fx`` to see what consumes the BN's output.
   A BN whose only consumer is a supported activation (module or function, e.g. torchvision
   ResNet's shared ``self.relu`` or ``F.relu``) is paired; any other BN becomes affine-only.
   If each absorbed activation is a module called exactly once, it is set to ``nn.Identity`` in
   place and the model keeps its class. Otherwise (a shared ``relu`` module, a functional call) the
   graph is rewritten and a ``torch.fx.GraphModule`` is returned: same parameters and outputs, but
   methods of the original class (``forward_features``...) are gone.

What it does not handle (it raises :class:`NormActConversionError` instead of guessing):
a model that ``torch.fx`` cannot trace (data-dependent control flow) while step 3 is needed; a BN
module called at several places with different consumers; timm norm-act modules with a
non-identity ``drop`` (DropBlock) between norm and activation. Norms other than 2-D BatchNorm
(GroupNorm, LayerNorm, 1-D BN) and activations outside :data:`ACTIVATION_MODULES` are left as they
are. New EvoNorm layers are freshly initialised (γ=1, β=0, v=1): a BN's statistics have no EvoNorm
meaning, so the converted model is meant to be trained.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .evonorm import EVONORM_LAYERS, get_evonorm_layer

_logger = logging.getLogger(__name__)

__all__ = ["convert_norm_act", "NormActConversionError", "ACTIVATION_MODULES", "ACTIVATION_FUNCTIONS"]


class NormActConversionError(RuntimeError):
    """The converter cannot tell safely which BNs feed an activation; the message says what to do."""


def _timm_types(names: tuple[str, ...], module: str) -> tuple[type, ...]:
    try:
        mod = __import__(module, fromlist=list(names))
    except ImportError:
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


#: Activation modules absorbed into EvoNorm. PReLU is excluded (its parameters would be lost).
ACTIVATION_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU,
) + _timm_types(("Swish", "HardSwish", "Mish", "HardMish", "GELU", "GELUTanh", "QuickGELU"),
                "timm.layers.activations")
#: The same activations called as functions / tensor methods in a traced graph.
ACTIVATION_FUNCTIONS: frozenset = frozenset({
    F.relu, F.relu_, F.relu6, F.silu, F.hardswish, F.gelu, F.mish, F.leaky_relu, F.elu, F.celu, F.selu,
    torch.relu, torch.relu_, torch.selu, torch.celu,
})
ACTIVATION_METHODS: frozenset = frozenset({"relu", "relu_"})

_NORM_ACT_TYPES: tuple[type, ...] = _timm_types(
    ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"), "timm.layers.norm_act")
_FROZEN_BN_TYPES: tuple[type, ...] = (
    _timm_types(("FrozenBatchNorm2d",), "timm.layers.norm_act")
    + _timm_types(("FrozenBatchNorm2d",), "torchvision.ops.misc"))


def _is_bn2d(m: nn.Module) -> bool:
    return (isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm) + _FROZEN_BN_TYPES)
            and not isinstance(m, _NORM_ACT_TYPES))


def _num_features(m: nn.Module) -> int:
    if hasattr(m, "num_features"):
        return int(m.num_features)
    return int(m.weight.shape[0])


def _factory_kwargs(m: nn.Module) -> dict[str, Any]:
    ref = next(iter(m.parameters()), None)
    if ref is None:
        ref = next(iter(m.buffers()), None)
    return {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}


def convert_norm_act(model: nn.Module, layer: str | type[nn.Module] = "s0", *, timm_compatible: bool = False,
                     **layer_kwargs: Any) -> nn.Module:
    """Replace BN(+activation) pairs of ``model`` by EvoNorm layers (see the module docstring).

    ``layer``: ``'b0'``, ``'s0'`` (``'b1'``, ``'s0a'``, ``'s1'``) or an EvoNorm class;
    ``timm_compatible`` and ``layer_kwargs`` (eps, groups, ...) go to every new layer.
    Modifies ``model`` in place and returns it, or returns a ``torch.fx.GraphModule`` when an
    absorbed activation had to be removed from the graph.
    """
    cls = get_evonorm_layer(layer) if isinstance(layer, str) else layer
    if cls not in EVONORM_LAYERS.values():
        raise ValueError(f"layer must be one of {sorted(EVONORM_LAYERS)} or an EvoNorm class, got {layer!r}")

    def make(bn: nn.Module, apply_act: bool) -> nn.Module:
        return cls(_num_features(bn), apply_act=apply_act, timm_compatible=timm_compatible,
                   **{**_factory_kwargs(bn), **layer_kwargs})

    summary = {"norm_act": 0, "sequential": 0, "traced": 0, "affine_only": 0}
    _convert_norm_act_modules(model, make, summary)
    _convert_sequential_pairs(model, make, summary)
    remaining = [n for n, m in model.named_modules() if _is_bn2d(m)]
    result = model
    if remaining:
        result = _convert_traced(model, remaining, make, summary)
    _logger.info("EvoNorm conversion (%s): %s", cls.__name__, summary)
    return result


def _convert_norm_act_modules(model: nn.Module, make: Callable, summary: dict) -> None:
    for name, m in list(model.named_modules()):
        if not isinstance(m, _NORM_ACT_TYPES):
            continue
        drop = getattr(m, "drop", None)
        if drop is not None and not isinstance(drop, nn.Identity):
            raise NormActConversionError(
                f"{name}: {type(m).__name__} applies {type(drop).__name__} between norm and activation; "
                "EvoNorm has no place for it. Remove the drop layer (drop_block_rate=0) before converting.")
        apply_act = not isinstance(getattr(m, "act", nn.Identity()), nn.Identity)
        model.set_submodule(name, make(m, apply_act))
        summary["norm_act" if apply_act else "affine_only"] += 1


def _convert_sequential_pairs(model: nn.Module, make: Callable, summary: dict) -> None:
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            bn, act = seq._modules[first], seq._modules[second]
            if _is_bn2d(bn) and isinstance(act, ACTIVATION_MODULES):
                seq._modules[first] = make(bn, True)
                seq._modules[second] = nn.Identity()
                summary["sequential"] += 1


class _LeafTracer(fx.Tracer):
    """Keeps EvoNorm layers (already converted) and BNs as single graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, tuple(EVONORM_LAYERS.values())) or _is_bn2d(m):
            return True
        return super().is_leaf_module(m, qualname)


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    if node.op == "call_method":
        return node.target in ACTIVATION_METHODS
    return False


def _convert_traced(model: nn.Module, remaining: list[str], make: Callable, summary: dict) -> nn.Module:
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # tracing fails in many ways (control flow, unsupported ops)
        raise NormActConversionError(
            f"{len(remaining)} BatchNorm2d modules ({', '.join(remaining[:5])}...) are not in a timm "
            f"norm-act module or a Sequential, and torch.fx cannot trace {type(model).__name__} to see "
            f"what follows them ({type(e).__name__}: {str(e)[:200]}). Put each BN and its activation "
            "in an nn.Sequential (or timm's BatchNormAct2d) and convert again.") from e
    modules = dict(model.named_modules())
    targets = set(remaining)
    module_calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module_calls[node.target] = module_calls.get(node.target, 0) + 1

    decision: dict[str, bool] = {}  # BN name -> followed by an activation
    pairs: list[tuple[fx.Node, fx.Node]] = []
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in targets:
            continue
        users = list(node.users)
        paired = len(users) == 1 and _is_activation(users[0], modules)
        if decision.setdefault(node.target, paired) != paired:
            raise NormActConversionError(
                f"{node.target} is called at several places, followed by an activation at some and not "
                "at others; give each call its own BatchNorm2d module before converting.")
        if paired:
            pairs.append((node, users[0]))

    for name in remaining:
        if name not in decision:  # registered but never called: nothing follows it
            decision[name] = False
        model.set_submodule(name, make(modules[name], decision[name]))
        summary["traced" if decision[name] else "affine_only"] += 1

    in_place = all(act.op == "call_module" and module_calls[act.target] == 1 for _, act in pairs)
    if in_place:
        for _, act in pairs:
            model.set_submodule(act.target, nn.Identity())
        return model
    for bn_node, act_node in pairs:
        act_node.replace_all_uses_with(bn_node)
        graph.erase_node(act_node)
    graph.lint()
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "EvoNorm")
    for attr in ("num_classes", "pretrained_cfg", "default_cfg"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    _logger.info("EvoNorm conversion rewrote the graph of %s: returning a torch.fx.GraphModule",
                 type(model).__name__)
    return gm

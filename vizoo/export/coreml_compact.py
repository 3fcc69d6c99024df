"""Compact ML Program descriptions: deduplicated constants and short value names.

An ML Program package holds the weights (``weights/weight.bin``) and the program's description
(``model.mlmodel``, a protobuf naming every op and value). With 4-bit weights the description is
no longer small beside them: for the 1.16 M-parameter QuEST UNet it is about 300 KB next to 660 KB
of weights, because the converter writes one constant per op parameter (a conv's strides, pads,
dilations and groups each time) and long value names (``dequantize_per_channel_13_data_0``, each
written three times). Merging constants with identical values and renaming internal values to
short ids keeps the program op for op and value for value (the function's inputs and outputs keep
their names) and halves the description. The ExecuTorch debug-handle map coremltools writes beside
the model (``executorch_debug_handle_mapping.json``, not part of the Core ML model) is dropped.
(Small float constants are kept out of the weight file while converting: see
``vizoo.export.coreml.INLINE_FLOAT_ELEMENTS``.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

#: coremltools writes this beside a model converted from torch.export; Core ML never reads it
DEBUG_MAP = "executorch_debug_handle_mapping.json"


def compact_package(path: str | Path) -> dict[str, int]:
    """Compact the ``.mlpackage`` at ``path`` in place; returns bytes before/after and counts."""
    from coremltools.proto import Model_pb2

    path = Path(path)
    model_file = next(path.glob("Data/*/model.mlmodel"))
    spec = Model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    before = model_file.stat().st_size
    stats = compact_spec(spec)
    model_file.write_bytes(spec.SerializeToString())
    debug = path / DEBUG_MAP
    if debug.exists():
        stats["debug_map_bytes_dropped"] = debug.stat().st_size
        debug.unlink()
    stats.update(description_bytes_before=before, description_bytes_after=model_file.stat().st_size)
    return stats


def compact_spec(spec: Any) -> dict[str, int]:
    """Deduplicate constants and shorten internal value names of every function (in place)."""
    removed = renamed = 0
    for function in spec.mlProgram.functions.values():
        keep = {v.name for v in function.inputs}
        for block in function.block_specializations.values():
            keep |= set(block.outputs)
            removed += _dedupe_consts(block)
            renamed += _shorten_names(block, keep)
    return {"constants_merged": removed, "values_renamed": renamed}


def _const_key(op: Any) -> bytes | None:
    """Identity of a constant: its type and its value as serialized (a blob reference counts as
    its file and offset, so only the very same stored bytes merge)."""
    if op.type != "const" or len(op.outputs) != 1 or "val" not in op.attributes:
        return None
    return op.outputs[0].type.SerializeToString() + b"|" + op.attributes["val"].SerializeToString()


def _dedupe_consts(block: Any) -> int:
    """Drop constants equal to an earlier one and point their users at it."""
    first: dict[bytes, str] = {}
    alias: dict[str, str] = {}
    keep_ops = []
    for op in block.operations:
        key = _const_key(op)
        if key is not None and op.outputs[0].name not in block.outputs:
            name = op.outputs[0].name
            if key in first:
                alias[name] = first[key]
                continue
            first[key] = name
        keep_ops.append(op)
    if alias:
        _rewrite(keep_ops, alias)
        del block.operations[:]
        block.operations.extend(keep_ops)
    return len(alias)


def _shorten_names(block: Any, keep: set[str]) -> int:
    """Give every value produced inside ``block`` (and nested blocks) a short id."""
    mapping: dict[str, str] = {}

    def visit(b: Any) -> None:
        for op in b.operations:
            for out in op.outputs:
                if out.name not in keep and out.name not in mapping:
                    mapping[out.name] = _short(len(mapping))
            for inner in op.blocks:
                visit(inner)

    visit(block)
    _rewrite(block.operations, mapping)
    return len(mapping)


def _rewrite(ops: Any, mapping: dict[str, str]) -> None:
    """Apply a value renaming to ops (outputs, inputs, their ``name`` attribute, nested blocks)."""
    for op in ops:
        for out in op.outputs:
            out.name = mapping.get(out.name, out.name)
        for arg in op.inputs.values():
            for binding in arg.arguments:
                if binding.WhichOneof("binding") == "name":
                    binding.name = mapping.get(binding.name, binding.name)
        if "name" in op.attributes and op.outputs:
            strings = op.attributes["name"].immediateValue.tensor.strings.values
            if len(strings) == 1:
                strings[0] = op.outputs[0].name
        for inner in op.blocks:
            for i, name in enumerate(inner.outputs):
                inner.outputs[i] = mapping.get(name, name)
            _rewrite(inner.operations, mapping)


def _short(i: int) -> str:
    """v0, v1, ..., base 36: valid MIL identifiers."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if i == 0:
            return "v" + out

"""Reading a saved ``.mlpackage`` back into a runnable MIL program (works on Linux).

coremltools can convert and save on Linux but not predict; its milproto loader can still
turn the saved protobuf + weight blob back into a PyMIL program, which the executor walks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .dtypes import numpy_dtype
from .image import ImageSpec, image_spec_from_feature


@dataclass(frozen=True)
class InputDescription:
    """One function input: its declared shape (None for flexible dims), dtype and image info."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    image: ImageSpec | None = None


@dataclass
class Program:
    """One function of an ML Program, with the I/O description the app sees."""

    mil: Any  # coremltools.converters.mil.mil.Program
    function_name: str = "main"
    inputs: dict[str, InputDescription] = field(default_factory=dict)
    output_names: list[str] = field(default_factory=list)
    path: Path | None = None
    spec_version: int | None = None

    @property
    def function(self) -> Any:
        return self.mil.functions[self.function_name]

    @property
    def opset(self) -> int:
        version = self.function.opset_version
        return int(version.value) if version is not None else 8  # iOS17, the exporter's floor

    def op_types(self) -> set[str]:
        return {op.op_type for op in iter_ops(self.function)}

    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        from .executor import run_program

        return run_program(self, inputs)


def iter_ops(block: Any):
    """All ops of a block, including those inside nested blocks (control flow)."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from iter_ops(inner)


def load_program(source: str | Path | Any, function_name: str | None = None) -> Program:
    """Load a saved ``.mlpackage`` (or an in-memory ``ct.models.MLModel``) for execution.

    ``function_name`` picks a function of a multifunction package; default: the package's
    default function (``main`` for ordinary packages).
    """
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no Core ML model at {path}")
        model = ct.models.MLModel(str(path), skip_model_load=True)
    else:
        model, path = source, None
    spec = model.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(
            f"{path or 'model'} is a '{spec.WhichOneof('Type')}' Core ML model; the reference "
            "executor runs ML Programs only (convert with convert_to='mlprogram')"
        )
    try:
        mil = milproto.load(spec, spec.specificationVersion, model.weights_dir)
    except Exception as err:  # the loader re-runs coremltools' type inference
        raise RuntimeError(f"coremltools could not read the ML Program back: {err}") from err

    description = spec.description
    functions = list(description.functions)
    if functions:
        names = [f.name for f in functions]
        chosen = function_name or description.defaultFunctionName or names[0]
        if chosen not in names:
            raise ValueError(f"function {chosen!r} not in the package; it has {names}")
        fdesc = functions[names.index(chosen)]
        in_features, out_features = list(fdesc.input), list(fdesc.output)
    else:
        chosen = function_name or "main"
        if chosen not in mil.functions:
            raise ValueError(f"function {chosen!r} not in the program; it has {list(mil.functions)}")
        in_features, out_features = list(description.input), list(description.output)

    func = mil.functions[chosen]
    features = {f.name: f for f in in_features}
    inputs: dict[str, InputDescription] = {}
    for name, var in func.inputs.items():
        shape = tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in var.shape)
        image = image_spec_from_feature(features[name]) if name in features else None
        inputs[name] = InputDescription(name, shape, numpy_dtype(var.dtype), image)

    output_names = [f.name for f in out_features]
    if len(output_names) != len(func.outputs):
        output_names = [v.name for v in func.outputs]
    return Program(mil, chosen, inputs, output_names, path, int(spec.specificationVersion))

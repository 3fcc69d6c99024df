"""Model families; importing this package registers every model.

Each family is one module. A family whose module fails to import is a bug, so errors propagate.
"""
from importlib import import_module

_FAMILIES = (
    "evonorm_nets",
    "mobilenet_ulsam",
    "affnet",
    "evit",
    "stageinteractor",
    "clr",
    "diffusion",
)

for _name in _FAMILIES:
    try:
        import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # a family not written yet
        if _e.name != f"{__name__}.{_name}":
            raise

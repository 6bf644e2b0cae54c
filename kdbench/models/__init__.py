"""Model registry: plain ``nn.Module``s built by name, timm style.

Add an architecture by decorating its constructor with ``@register_model("name")`` in a module
of this package and giving it a ``default_taps`` dict (see :mod:`kdbench.taps`): which module
paths hold the stage outputs, the hint layer and the pooled embedding. A teacher or student
config then names it with ``arch: name``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from torch import nn

from kdbench.errors import KdbenchError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorator


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def list_models() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def create_model(
    name: str, *, num_classes: int, input_shape: tuple[int, ...], **kwargs
) -> nn.Module:
    """Build a registered model for inputs of ``input_shape`` (without the batch axis)."""
    _import_all()
    if name not in _REGISTRY:
        raise KdbenchError(f"unknown model arch={name!r}: registered models are {list_models()}")
    try:
        return _REGISTRY[name](num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)
    except TypeError as exc:
        raise KdbenchError(f"cannot build model {name!r} with kwargs {kwargs}: {exc}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

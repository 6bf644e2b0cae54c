"""Model registry: plain ``nn.Module``s built by name, timm style.

Add an architecture by decorating its constructor with ``@register_model("name")`` in a module
of this package and giving it a ``default_taps`` dict (see :mod:`kdbench.taps`): which module
paths hold the stage outputs, the hint layer and the pooled embedding. A teacher or student
config then names it with ``arch: name``.

A model of the user's own needs no registration: a config with ``_target_`` naming any importable
``nn.Module`` class or factory is built by :func:`build_from_spec`, the one builder every role
uses (see :mod:`kdbench.modelspec` for the config side).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import pkgutil
import sys
from collections.abc import Callable, Mapping

from torch import nn

from kdbench.errors import ConfigError, KdbenchError
from kdbench.modelspec import arch_of, model_id, model_name, target_of  # noqa: F401 (re-exported)

# Arguments a factory may take that kdbench fills in from the data (unless kwargs give them).
CLASS_COUNT_ARGS = ("num_classes", "n_classes", "num_labels")

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


def registered(name: str) -> Callable[..., nn.Module]:
    _import_all()
    if name not in _REGISTRY:
        raise KdbenchError(f"unknown model arch={name!r}: registered models are {list_models()}")
    return _REGISTRY[name]


def create_model(
    name: str, *, num_classes: int, input_shape: tuple[int, ...], **kwargs
) -> nn.Module:
    """Build a registered model for inputs of ``input_shape`` (without the batch axis)."""
    return build_from_spec(
        {"arch": name, "kwargs": kwargs}, num_classes, input_shape, "model", check_output=False
    )


def derived_args(num_classes: int, input_shape: tuple[int, ...]) -> dict[str, object]:
    """What kdbench passes a factory that takes it: the class count and the input shape under
    their common names (``in_channels``/``in_chans``: the first axis of a (C, ...) input;
    ``in_features``: the flattened size)."""
    shape = tuple(int(d) for d in input_shape)
    args: dict[str, object] = dict.fromkeys(CLASS_COUNT_ARGS, int(num_classes))
    args.update(input_shape=shape, in_features=math.prod(shape))
    if len(shape) >= 2:
        args["in_channels"] = args["in_chans"] = shape[0]
    return args


def locate(target: str, where: str) -> Callable:
    """The object a dotted ``_target_`` names; the working directory is importable (after the
    installed packages), as for ``python -m``."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name + ".").startswith(exc.name + "."):
                continue  # this prefix is not a module: try a shorter one
            raise KdbenchError(
                f"{where}._target_={target!r} cannot be imported: importing {module_name} "
                f"failed ({exc})"
            ) from None
        except Exception as exc:  # noqa: BLE001 - the user's module fails to import
            raise KdbenchError(
                f"{where}._target_={target!r} cannot be imported: importing {module_name} "
                f"raised {type(exc).__name__}: {_first_line(exc)}"
            ) from None
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                found = sorted(
                    n
                    for n, v in vars(obj).items()
                    if isinstance(v, type) and issubclass(v, nn.Module) and not n.startswith("_")
                )
                hint = f"; its nn.Module classes: {', '.join(found)}" if found else ""
                raise KdbenchError(
                    f"{where}._target_={target!r} is invalid: {obj.__name__} has no attribute "
                    f"{attr!r}{hint}"
                )
            obj = getattr(obj, attr)
        if not callable(obj):
            raise KdbenchError(
                f"{where}._target_={target!r} is invalid: it is a {type(obj).__name__}, not an "
                "nn.Module class or a function that returns one"
            )
        return obj
    raise KdbenchError(
        f"{where}._target_={target!r} cannot be imported: no module {parts[0]!r} (put your module "
        "in the working directory or on PYTHONPATH, or install its package)"
    )


def source_digest(target: str, where: str) -> str | None:
    """A hash of the source file that defines ``target`` (None if it has none), so that a cache
    keyed by it (the trained-teacher cache) is not reused after the user edits their model."""
    import hashlib

    obj = locate(target, where)
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:
        path = None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _plain(node) -> dict:
    if node is None:
        return {}
    if isinstance(node, Mapping) and not isinstance(node, dict):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def _parameters(fn: Callable) -> tuple[dict[str, inspect.Parameter], bool] | None:
    """The named parameters of ``fn`` (a class: its constructor) and whether it takes
    ``**kwargs``; None when Python cannot tell (some builtins)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    named = {
        n: p
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return named, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def build_from_spec(
    spec,
    num_classes: int,
    input_shape: tuple[int, ...],
    where: str,
    check_output: bool = True,
    input_dtype=None,
) -> nn.Module:
    """The network of a teacher/student spec: a registered ``arch`` or an importable ``_target_``
    (class or factory), called with ``kwargs`` plus, where its signature takes them and kwargs
    do not give them, the class count (``num_classes``/``n_classes``/``num_labels``) and the
    input shape (``input_shape``, ``in_channels``/``in_chans``, ``in_features``); a factory that
    takes ``**kwargs`` and none of those names gets ``num_classes``. A kwarg the factory does not
    take is an error naming it; a user model is checked to return ``(batch, num_classes)``
    logits on a dummy batch. ``where`` names the spec in messages (``student``)."""
    arch, target = arch_of(spec), target_of(spec)
    if (arch is None) == (target is None):
        raise KdbenchError(f"{where} must name exactly one of arch and _target_")
    fn = registered(arch) if arch is not None else locate(target, where)
    what = f"arch={arch}" if arch is not None else target
    kwargs = _plain(spec.get("kwargs") if hasattr(spec, "get") else None)
    derived = derived_args(num_classes, input_shape)
    params = _parameters(fn)
    args: dict[str, object] = {}
    if params is not None:
        named, var_kw = params
        args = {n: v for n, v in derived.items() if n in named and n not in kwargs}
        if var_kw and not any(n in named or n in kwargs for n in CLASS_COUNT_ARGS):
            args["num_classes"] = int(num_classes)
        if not var_kw:
            _drop_foreign(spec, kwargs, named, what, where)
            for key, value in kwargs.items():
                if key not in named:
                    raise ConfigError(
                        f"{where}.kwargs.{key}",
                        value,
                        f"{what} takes no argument {key!r} (its own arguments: "
                        f"{', '.join(n for n in named if n not in args) or 'none'}): remove it, "
                        f"or clear the kwargs with "
                        f"{where}.kwargs=null",
                    )
        missing = [
            n
            for n, p in named.items()
            if p.default is p.empty and n not in args and n not in kwargs
        ]
        if missing:
            raise KdbenchError(
                f"{where}: {what} needs the argument {missing[0]!r}, which kdbench does not "
                f"derive from the data: give it with +{where}.kwargs.{missing[0]}=..."
            )
    elif arch is not None:
        args = {"num_classes": int(num_classes), "input_shape": derived["input_shape"]}
    try:
        model = fn(**args, **kwargs)
    except KdbenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's constructor failed
        shown = {**args, **kwargs}
        raise KdbenchError(
            f"building {where} {what}({', '.join(f'{k}={v!r}' for k, v in shown.items())}) "
            f"failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise KdbenchError(
            f"{where}._target_={target!r} returned a {type(model).__name__}, not an nn.Module"
        )
    if check_output and target is not None:
        _check_logits(model, num_classes, input_shape, where, target, input_dtype)
    return model


def _drop_foreign(spec, kwargs: dict, named: dict, what: str, where: str) -> None:
    """Drop the kwargs a config file wrote for another arch (``written_for``) than the one now
    chosen, where the new factory does not take them and the old one does, with a notice."""
    written = spec.get("written_for") if hasattr(spec, "get") else None
    if written is None or str(written) in (arch_of(spec), target_of(spec)):
        return
    _import_all()
    old = _REGISTRY.get(str(written))
    old_params = _parameters(old) if old is not None else None
    if old_params is None:
        return
    for key in [k for k in kwargs if k not in named and k in old_params[0]]:
        value = kwargs.pop(key)
        print(
            f"kdbench: {where}.kwargs.{key}={value!r} is for arch={written} (the {where} "
            f"config's model), not for {what}: left out"
        )


def _check_logits(
    model: nn.Module, num_classes: int, input_shape, where: str, target: str, input_dtype=None
):
    """A user's model returns ``(batch, num_classes)`` logits on a dummy batch of the data's
    shape; on token ids (an integer ``input_dtype``: a language model) one row of logits per
    position, ``(batch, *input_shape, num_classes)``."""
    import torch

    shape = (2, *input_shape)
    dtype = input_dtype or torch.float32
    tokens = not dtype.is_floating_point
    expected = (*shape, num_classes) if tokens else (2, num_classes)
    mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape, dtype=dtype))
            if tokens and not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
                out = out.logits
    except Exception as exc:  # noqa: BLE001 - the user's forward fails on the data's shape
        raise KdbenchError(
            f"{where}._target_={target}: its forward pass on a batch of the data's shape "
            f"{shape} failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    finally:
        model.train(mode)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        what = "(batch, length, vocabulary)" if tokens else "(batch, num_classes)"
        raise KdbenchError(
            f"{where}._target_={target}: its forward pass must return logits of shape "
            f"{what} = {expected} on a batch of shape {shape}, got {got}: "
            "take num_classes as an argument, or wrap the model so that forward returns logits"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

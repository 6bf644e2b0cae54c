"""Teacher and student model specs, checked from the config alone (no torch import).

A spec (``student``, ``teacher``, or one of ``teacher.members``) names its network in one of two
ways, never both:

- ``arch``: a model of kdbench's registry (``kdbench/models/``), with its ``default_taps``;
- ``_target_``: any importable ``nn.Module`` class or factory (``mymodels.TinyNet``,
  ``torchvision.models.resnet18``), built with the number of classes and the input shape where
  its signature takes them (see :func:`kdbench.models.build_from_spec`); taps are module paths.

``kwargs`` are the factory's own arguments. ``written_for`` records the arch a config file's
``name`` and ``kwargs`` were written for: with another ``arch`` on the command line the file's
name no longer applies and the kwargs only the old arch takes are dropped (with a notice).
Every other key is refused: a key kdbench does not use must never be silently ignored.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig, ListConfig, OmegaConf

from kdbench.errors import ConfigError

MODEL_KEYS = ("name", "arch", "_target_", "kwargs", "taps", "written_for")
TEACHER_RECIPE_KEYS = ("checkpoint", "seed", "epochs", "batch_size", "optim")
ENSEMBLE_KEYS = ("members", "feature_member", "weighting")
# as kdbench.taps.TAP_NAMES (that module needs torch)
TAP_NAMES = ("stages", "hint", "embedding", "hidden", "attention", "values", "final")
ALLOWED_KEYS = {
    "student": MODEL_KEYS,
    "teacher": MODEL_KEYS + TEACHER_RECIPE_KEYS + ENSEMBLE_KEYS,
    "member": MODEL_KEYS + TEACHER_RECIPE_KEYS,
}
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _get(spec, key: str):
    """``spec[key]``, or None when the key is absent or still ``???``."""
    if isinstance(spec, DictConfig):
        if key not in spec or OmegaConf.is_missing(spec, key):
            return None
        return spec[key]
    return (spec or {}).get(key)


def target_of(spec) -> str | None:
    """The ``_target_`` of a spec (None when it names a registered ``arch``)."""
    value = _get(spec, "_target_")
    return None if value is None else str(value)


def arch_of(spec) -> str | None:
    value = _get(spec, "arch")
    return None if value is None else str(value)


def applies(spec) -> bool:
    """Whether the spec's ``name`` and ``kwargs`` are those of the network it builds: False when
    ``written_for`` names another arch than the one now chosen (``student.arch=...``)."""
    written = _get(spec, "written_for")
    return written is None or str(written) == (arch_of(spec) or target_of(spec))


def model_name(spec) -> str:
    """The name a model goes by in MLflow, the leaderboard, the tuner and cache file names: the
    config's ``name``, else its ``arch``, else the last component of its ``_target_``."""
    name = _get(spec, "name") if applies(spec) else None
    if name is None:
        name = arch_of(spec) or (target_of(spec) or "model").rsplit(".", 1)[-1]
    return re.sub(r"[^\w.+-]", "_", str(name))


def model_id(spec) -> str:
    """What the network is: its registered arch or its full ``_target_`` (the MLflow tag)."""
    return arch_of(spec) or target_of(spec) or "?"


def _check_keys(spec, where: str, allowed: tuple[str, ...]) -> None:
    for key in spec:
        if key not in allowed:
            raise ConfigError(
                f"{where}.{key}",
                spec[key],
                f"{where} has no key {key!r} (kdbench would ignore it): its keys are "
                f"{', '.join(allowed)}; a network's own arguments go in {where}.kwargs",
            )


def _check_network(spec, where: str, group: str | None) -> None:
    arch, target = arch_of(spec), target_of(spec)
    if arch is not None and target is not None:
        pick = f"{group}=custom " if group else ""
        raise ConfigError(
            f"{where}._target_",
            target,
            f"{where} already names arch={arch}: for a model of your own use "
            f"{pick}{where}._target_={target}",
        )
    if arch is None and target is None:
        raise ConfigError(
            f"{where}._target_",
            "???",
            f"{where} names no network: set {where}._target_=<module>.<Class or factory> "
            f"(e.g. mymodels.TinyNet) or {where}.arch=<registered arch>",
        )
    if target is not None and not _DOTTED.match(target):
        raise ConfigError(
            f"{where}._target_",
            target,
            "must be the dotted import path of an nn.Module class or factory, "
            "e.g. mymodels.TinyNet or torchvision.models.resnet18",
        )
    if arch is not None and not isinstance(_get(spec, "arch"), str):
        raise ConfigError(f"{where}.arch", _get(spec, "arch"), "must be a registered model name")
    kwargs = _get(spec, "kwargs")
    if kwargs is not None and not isinstance(kwargs, DictConfig | dict):
        raise ConfigError(
            f"{where}.kwargs", kwargs, "must be a mapping of the network's arguments (or null)"
        )
    for key in kwargs or {}:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"{where}.kwargs.{key}", kwargs[key], "is not an argument name")
    taps = _get(spec, "taps")
    if taps is not None and not isinstance(taps, DictConfig | dict):
        raise ConfigError(f"{where}.taps", taps, f"must map taps ({', '.join(TAP_NAMES)}) to paths")
    for key, value in (taps or {}).items():
        if key not in TAP_NAMES:
            raise ConfigError(
                f"{where}.taps.{key}", value, f"is not a tap: the taps are {', '.join(TAP_NAMES)}"
            )
        paths = list(value) if isinstance(value, ListConfig | list) else [value]
        if not all(p is None or isinstance(p, str) for p in paths):
            raise ConfigError(f"{where}.taps.{key}", value, "must be module paths (or null)")


def check_model_config(cfg: DictConfig) -> None:
    """Refuse unknown or unused keys and malformed specs of ``student`` and ``teacher`` (and of
    ``teacher.members``), before anything is imported or built."""
    for role in ("student", "teacher"):
        spec = cfg.get(role)
        if not isinstance(spec, DictConfig):
            raise ConfigError(role, spec, f"must be a {role} config (a mapping)")
        _check_keys(spec, role, ALLOWED_KEYS[role])
    teacher = cfg.teacher
    _check_network(cfg.student, "student", "student")
    if arch_of(teacher) != "ensemble":
        for key in ENSEMBLE_KEYS:
            if _get(teacher, key) is not None:
                raise ConfigError(
                    f"teacher.{key}", teacher[key], "is used by teacher=ensemble only"
                )
        _check_network(teacher, "teacher", "teacher")
        return
    if target_of(teacher) is not None:
        raise ConfigError(
            "teacher._target_", target_of(teacher), "teacher=ensemble: put it in a member"
        )
    for key in ("checkpoint", "kwargs", "taps"):
        value = _get(teacher, key)
        if value and (
            not isinstance(value, DictConfig) or any(v is not None for v in value.values())
        ):
            raise ConfigError(
                f"teacher.{key}",
                value,
                f"teacher=ensemble does not use it: give each member its own {key} "
                "(teacher.members)",
            )
    members = _get(teacher, "members")
    if not isinstance(members, ListConfig | list):
        raise ConfigError("teacher.members", members, "must be a list of teacher specs")
    for i, member in enumerate(members):
        where = f"teacher.members[{i}]"
        if not isinstance(member, DictConfig | dict):
            raise ConfigError(where, member, "must be a teacher spec (a mapping)")
        _check_keys(member, where, ALLOWED_KEYS["member"])
        _check_network(member, where, None)

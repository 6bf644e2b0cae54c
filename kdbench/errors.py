"""Errors that kdbench reports to the user as one line, without a traceback."""

from __future__ import annotations

import sys


class KdbenchError(Exception):
    """A problem the user can fix: the message names it and says how (one line)."""


class ConfigError(KdbenchError):
    """An invalid configuration value, found before any work starts."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        super().__init__(f"{key}={value!r} is invalid: {allowed}")
        self.key = key
        self.value = value


class NonFiniteLossError(KdbenchError):
    """A loss term became NaN or infinite during training."""


def checked_instantiate(node, **kwargs):
    """``hydra.utils.instantiate`` that lets a :class:`KdbenchError` from the constructor through
    as itself (Hydra wraps it), and turns other construction errors into one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, KdbenchError):
            raise cause from None
        detail = str(cause or exc).strip().splitlines()[0] if str(cause or exc).strip() else ""
        raise KdbenchError(f"cannot build {node.get('_target_')}: {detail}") from None


def run_or_exit(fn, *args):
    """``fn(*args)``; a :class:`KdbenchError` becomes one line on stderr and exit code 2."""
    try:
        return fn(*args)
    except KdbenchError as exc:
        print(f"kdbench: error: {exc}", file=sys.stderr)
        sys.exit(2)

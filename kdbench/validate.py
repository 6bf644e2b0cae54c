"""Checks of the composed config that need nothing but the config (no torch, no Lightning).

The CLI runs them before importing anything heavy, so a bad value is reported in well under
2 seconds; :func:`kdbench.run.prepare` runs them too (for the Python API and the tuner), and
then checks what needs the models and data (taps, shapes, trainer options).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from kdbench.errors import ConfigError

KNOWLEDGE_TYPES = ("none", "response", "feature", "attention", "relation")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "multistep", "none")


def _number(key: str, value, low: float, strict: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isinf(value)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        raise ConfigError(key, value, f"must be a finite number {'>' if strict else '>='} {low}")


def check_method(m: DictConfig) -> None:
    if m.knowledge not in KNOWLEDGE_TYPES:
        raise ConfigError(
            "method.knowledge", m.knowledge, f"must be one of {list(KNOWLEDGE_TYPES)}"
        )
    for key in ("gamma", "alpha", "beta"):
        _number(f"method.{key}", m[key], 0, strict=False)
    _number("method.temperature", m.temperature, 0, strict=True)
    if m.gamma == 0 and m.alpha == 0 and m.beta == 0:
        raise ConfigError("method.gamma", 0, "gamma, alpha and beta are all 0: nothing to train on")
    if m.beta > 0 and m.get("term") is None:
        raise ConfigError(
            "method.beta",
            m.beta,
            f"method {m.name} has no method term: leave beta at 0 or pick a method that has one",
        )


def check_optim(o: DictConfig, key: str) -> None:
    if str(o.name).lower() not in OPTIMIZERS:
        raise ConfigError(f"{key}.name", o.name, f"must be one of {', '.join(OPTIMIZERS)}")
    _number(f"{key}.lr", o.lr, 0, strict=True)
    _number(f"{key}.weight_decay", o.get("weight_decay", 0.0), 0, strict=False)
    scheduler = o.get("scheduler", "none")
    if str(scheduler).lower() not in SCHEDULERS:
        raise ConfigError(f"{key}.scheduler", scheduler, f"must be one of {', '.join(SCHEDULERS)}")
    fused = o.get("fused", "auto")
    if fused != "auto" and not isinstance(fused, bool):
        raise ConfigError(f"{key}.fused", fused, "must be auto, true or false")


def _positive_int(key: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(key, value, "must be an integer >= 1")


def check_config(cfg: DictConfig) -> None:
    """Every check that needs the config alone; raises :class:`ConfigError` (one line)."""
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError("seed", cfg.seed, "must be an integer >= 0")
    _positive_int("trainer.max_epochs", cfg.trainer.get("max_epochs"))
    _positive_int("teacher.epochs", cfg.teacher.get("epochs"))
    _positive_int("dataset.batch_size", cfg.dataset.get("batch_size"))
    check_method(cfg.method)
    check_optim(cfg.optim, "optim")
    check_optim(cfg.teacher.optim, "teacher.optim")
    if cfg.get("resume") not in (None, False, True) and not isinstance(cfg.resume, str):
        raise ConfigError("resume", cfg.resume, "must be true, false or a checkpoint path")

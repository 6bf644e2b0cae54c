"""Methods: WHAT knowledge moves from teacher to student.

A method is ``gamma * CE + alpha * KD + beta * term`` where the term is one of a few generic
modules below, configured in ``conf/method/<name>.yaml`` with a pure loss function from
:mod:`kdbench.losses`:

- :class:`LogitTerm`: a loss of the two logit tensors (``hard``, response methods);
- :class:`TapTerm`: a loss of the same tap on both models (``at`` on stages, ``rkd`` on
  embeddings);
- :class:`HintTerm`: FitNets, a trainable regressor from the student's hint to the teacher's.

Adding a method is a loss function and a YAML file; a method that needs its own trainable
modules or state subclasses :class:`Term`. Terms are ``nn.Module``s, so auxiliary parameters
train with the student and are saved with the run, but never count as the deployed student.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import ConfigError, KdbenchError
from kdbench.losses import kd_loss
from kdbench.taps import Outputs

KNOWLEDGE_TYPES = ("none", "response", "feature", "attention", "relation")


class Term(nn.Module):
    """The method's own (beta-weighted) loss term. ``taps`` names what it needs from both models."""

    taps: frozenset[str] = frozenset()

    def build(
        self, method: str, student: Outputs, teacher: Outputs, student_name: str, teacher_name: str
    ) -> None:
        """Check the two models' outputs suit the term (one-line error if not); make modules."""

    def forward(self, s: Outputs, t: Outputs, y: torch.Tensor, epoch: int) -> torch.Tensor:
        raise NotImplementedError


class LogitTerm(Term):
    def __init__(self, loss: Callable) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, s, t, y, epoch):
        return self.loss(s.logits, t.logits)


def _is_map(x: torch.Tensor) -> bool:
    return x.dim() >= 3


class TapTerm(Term):
    """``loss(student[tap], teacher[tap])`` for a tap both models have."""

    def __init__(self, tap: str, loss: Callable, needs_maps: bool = False) -> None:
        super().__init__()
        self.tap, self.loss, self.needs_maps = tap, loss, needs_maps
        self.taps = frozenset({tap})

    def build(self, method, student, teacher, student_name, teacher_name):
        for role, name, out in (
            ("student", student_name, student),
            ("teacher", teacher_name, teacher),
        ):
            value = out.features.get(self.tap)
            values = value if isinstance(value, list) else [value]
            present = value is not None and len(values) > 0
            if self.needs_maps and not (present and all(_is_map(v) for v in values)):
                raise KdbenchError(
                    f"method={method} needs spatial feature maps ({self.tap}) but {role} {name} "
                    f"has none: pick a convolutional {role} (e.g. {role}=cnn1d_small) or set "
                    f"{role}.taps.{self.tap} to modules that output maps"
                )
            if not present:
                raise KdbenchError(
                    f"method={method} needs the {self.tap!r} tap but {role} {name} has none: "
                    f"set {role}.taps.{self.tap} or pick a {role} with {self.tap} outputs"
                )
        s, t = student.features[self.tap], teacher.features[self.tap]
        if isinstance(s, list) and len(s) != len(t):
            raise KdbenchError(
                f"method={method} pairs {self.tap} one to one, but the student taps {len(s)} "
                f"and the teacher {len(t)}: set student.taps.{self.tap} and "
                f"teacher.taps.{self.tap} to lists of equal length"
            )
        with torch.no_grad():
            self.loss(s, t)  # shape problems surface now, not after the first epoch

    def forward(self, s, t, y, epoch):
        return self.loss(s.features[self.tap], t.features[self.tap])


class HintTerm(Term):
    """FitNets: ``loss(r(student hint), teacher hint)`` with a trainable regressor ``r``."""

    def __init__(self, loss: Callable, tap: str = "hint") -> None:
        super().__init__()
        self.loss, self.tap = loss, tap
        self.taps = frozenset({tap})
        self.regressor: nn.Module = nn.Identity()

    def build(self, method, student, teacher, student_name, teacher_name):
        for role, name, out in (
            ("student", student_name, student),
            ("teacher", teacher_name, teacher),
        ):
            if not isinstance(out.features.get(self.tap), torch.Tensor):
                raise KdbenchError(
                    f"method={method} needs one {self.tap!r} tap on the {role} {name}: "
                    f"set {role}.taps.{self.tap} to a module path"
                )
        self.regressor = make_regressor(
            student.features[self.tap].shape, teacher.features[self.tap].shape
        )
        with torch.no_grad():
            self.regressor.eval()
            self.loss(self.regressor(student.features[self.tap]), teacher.features[self.tap])
            self.regressor.train()

    def forward(self, s, t, y, epoch):
        return self.loss(self.regressor(s.features[self.tap]), t.features[self.tap])


class _Unflatten(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)


def make_regressor(s_shape: torch.Size, t_shape: torch.Size) -> nn.Module:
    """Map a student feature of ``s_shape`` to the teacher's ``t_shape`` (batch axis first):
    a conv for maps of the same rank (1x1 for equal sizes, 3x3 stride 2 when the student's map is
    twice as large, a transposed conv when half), a linear layer otherwise; then BatchNorm, ReLU."""
    s_c, t_c = s_shape[1], t_shape[1]
    s_sp, t_sp = tuple(s_shape[2:]), tuple(t_shape[2:])
    if s_sp and t_sp and len(s_sp) == len(t_sp) and len(t_sp) in (1, 2):
        conv = nn.Conv1d if len(t_sp) == 1 else nn.Conv2d
        tconv = nn.ConvTranspose1d if len(t_sp) == 1 else nn.ConvTranspose2d
        bn = nn.BatchNorm1d if len(t_sp) == 1 else nn.BatchNorm2d
        if s_sp == t_sp:
            layer: nn.Module = conv(s_c, t_c, 1)
        elif all(a == 2 * b for a, b in zip(s_sp, t_sp, strict=True)):
            layer = conv(s_c, t_c, 3, stride=2, padding=1)
        elif all(2 * a == b for a, b in zip(s_sp, t_sp, strict=True)):
            layer = tconv(s_c, t_c, 4, stride=2, padding=1)
        else:
            pool = nn.AdaptiveAvgPool1d(t_sp) if len(t_sp) == 1 else nn.AdaptiveAvgPool2d(t_sp)
            layer = nn.Sequential(pool, conv(s_c, t_c, 1))
        return nn.Sequential(layer, bn(t_c), nn.ReLU())
    n_in = math.prod(s_shape[1:])
    if t_sp:
        bn = nn.BatchNorm1d if len(t_sp) == 1 else nn.BatchNorm2d
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_in, math.prod(t_shape[1:])),
            _Unflatten(tuple(t_shape[1:])),
            bn(t_c),
            nn.ReLU(),
        )
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, t_c), nn.BatchNorm1d(t_c), nn.ReLU())


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean CE over the labelled samples (``y >= 0``); 0 for a batch with none."""
    labelled = y >= 0
    if bool(labelled.all()):
        return F.cross_entropy(logits.float(), y)
    if not bool(labelled.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labelled].float(), y[labelled])


class Method(nn.Module):
    """``gamma * CE + alpha * KD(T) + beta * term``, as named loss terms (a dict)."""

    def __init__(
        self,
        name: str,
        knowledge: str,
        gamma: float,
        alpha: float,
        beta: float,
        temperature: float,
        term: Term | None = None,
    ) -> None:
        super().__init__()
        self.name, self.knowledge = name, knowledge
        self.gamma, self.alpha, self.beta = float(gamma), float(alpha), float(beta)
        self.temperature = float(temperature)
        self.term = term

    @property
    def taps(self) -> frozenset[str]:
        return self.term.taps if self.term is not None and self.beta > 0 else frozenset()

    @property
    def uses_teacher(self) -> bool:
        return self.alpha > 0 or (self.term is not None and self.beta > 0)

    def copy(self) -> Method:
        """An independent copy (own auxiliary modules), e.g. one per direction between peers."""
        return copy.deepcopy(self)

    def hard_label_terms(self, s: Outputs, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """``gamma * CE`` on the labelled samples."""
        return {"ce": self.gamma * masked_cross_entropy(s.logits, y)} if self.gamma > 0 else {}

    def distill_terms(
        self, s: Outputs, t: Outputs, y: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        """``alpha * KD`` and ``beta * term`` towards the (detached) teacher outputs ``t``."""
        terms: dict[str, torch.Tensor] = {}
        if self.alpha > 0:
            terms["kd"] = self.alpha * kd_loss(s.logits, t.logits, self.temperature)
        if self.term is not None and self.beta > 0:
            terms[self.name] = self.beta * self.term(s, t, y, epoch)
        return terms

    def forward(
        self, s: Outputs, t: Outputs | None, y: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        terms = self.hard_label_terms(s, y)
        if t is not None:
            terms.update(self.distill_terms(s, t, y, epoch))
        return terms


def build_method(cfg) -> Method:
    """A :class:`Method` from the ``method`` config group, its values checked."""
    from kdbench.errors import checked_instantiate

    if cfg.knowledge not in KNOWLEDGE_TYPES:
        raise ConfigError(
            "method.knowledge", cfg.knowledge, f"must be one of {list(KNOWLEDGE_TYPES)}"
        )
    for key in ("gamma", "alpha", "beta"):
        value = cfg[key]
        if not isinstance(value, int | float) or not value >= 0 or math.isinf(value):
            raise ConfigError(f"method.{key}", value, "must be a finite number >= 0")
    t = cfg.temperature
    if not isinstance(t, int | float) or not t > 0 or math.isinf(t):
        raise ConfigError("method.temperature", t, "must be a finite number > 0")
    if cfg.gamma == 0 and cfg.alpha == 0 and cfg.beta == 0:
        raise ConfigError("method.gamma", 0, "gamma, alpha and beta are all 0: nothing to train on")
    if cfg.beta > 0 and cfg.get("term") is None:
        raise ConfigError(
            "method.beta",
            cfg.beta,
            f"method {cfg.name} has no method term: leave beta at 0 or pick a method that has one",
        )
    term = checked_instantiate(cfg.term) if cfg.get("term") is not None else None
    return Method(cfg.name, cfg.knowledge, cfg.gamma, cfg.alpha, cfg.beta, t, term)

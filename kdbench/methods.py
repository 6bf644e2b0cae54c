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
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.losses import kd_loss, logit_standardize
from kdbench.taps import Outputs


def direct_loss(loss: Callable) -> Callable:
    """A loss from the method config, callable without per-call overhead.

    A ``_partial_: true`` target comes out of Hydra (1.3.8) as a partial that re-authorises its
    target on every call (see the pieces table of results/perf.md), paid once or more per
    training step. A partial of one of kdbench's own functions (``kdbench.losses``: trusted
    code, authorised when the config was instantiated) becomes a plain ``functools.partial``;
    any other callable keeps Hydra's checks."""
    if isinstance(loss, functools.partial) and str(getattr(loss.func, "__module__", "")).startswith(
        "kdbench."
    ):
        return functools.partial(loss.func, *loss.args, **loss.keywords)
    return loss


class Term(nn.Module):
    """The method's own (beta-weighted) loss term. ``taps`` names what it needs from both models."""

    taps: frozenset[str] = frozenset()

    def build(
        self, method: str, student: Outputs, teacher: Outputs, student_name: str, teacher_name: str
    ) -> None:
        """Check the two models' outputs suit the term (one-line error if not); make modules."""

    def single_taps(self, method, student, teacher, student_name, teacher_name):
        """The ``self.tap`` output of both models, each one tensor (one-line error if not)."""
        for role, name, out in (
            ("student", student_name, student),
            ("teacher", teacher_name, teacher),
        ):
            if not isinstance(out.features.get(self.tap), torch.Tensor):
                raise KdbenchError(
                    f"method={method} needs one {self.tap!r} tap on the {role} {name}: "
                    f"set {role}.taps.{self.tap} to a module path"
                )
        return student.features[self.tap], teacher.features[self.tap]

    def bind_data(self, dm) -> None:
        """Called with the data module before each fit (e.g. to size memory banks)."""

    def forward(
        self, s: Outputs, t: Outputs, y: torch.Tensor, epoch: int, index: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


class LogitTerm(Term):
    def __init__(self, loss: Callable) -> None:
        super().__init__()
        self.loss = direct_loss(loss)

    def forward(self, s, t, y, epoch, index):
        return self.loss(s.logits, t.logits)


def _is_map(x: torch.Tensor) -> bool:
    return x.dim() >= 3


class TapTerm(Term):
    """``loss(student[tap], teacher[tap])`` for a tap both models have."""

    def __init__(
        self,
        tap: str,
        loss: Callable,
        needs_maps: bool = False,
        select: int | None = None,
        pairwise: bool = False,
    ) -> None:
        """``select``: use one element of a list tap (e.g. -1, the last stage); ``pairwise``:
        apply ``loss`` to each (student, teacher) pair of a list tap and sum."""
        super().__init__()
        self.tap, self.loss, self.needs_maps = tap, direct_loss(loss), needs_maps
        self.select, self.pairwise = select, pairwise
        self.taps = frozenset({tap})

    def _pick(self, value):
        if isinstance(value, list) and self.select is not None:
            return value[self.select]
        return value

    def _loss(self, s, t):
        if self.pairwise and isinstance(s, list):
            return sum(self.loss(a, b) for a, b in zip(s, t, strict=True))
        return self.loss(s, t)

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
        s, t = self._pick(student.features[self.tap]), self._pick(teacher.features[self.tap])
        if isinstance(s, list) and len(s) != len(t):
            raise KdbenchError(
                f"method={method} pairs {self.tap} one to one, but the student taps {len(s)} "
                f"and the teacher {len(t)}: set student.taps.{self.tap} and "
                f"teacher.taps.{self.tap} to lists of equal length"
            )
        with torch.no_grad():
            self._loss(s, t)  # shape problems surface now, not after the first epoch

    def forward(self, s, t, y, epoch, index):
        return self._loss(self._pick(s.features[self.tap]), self._pick(t.features[self.tap]))


class HintTerm(Term):
    """FitNets: ``loss(r(student hint), teacher hint)`` with a trainable regressor ``r``."""

    def __init__(self, loss: Callable, tap: str = "hint") -> None:
        super().__init__()
        self.loss, self.tap = direct_loss(loss), tap
        self.taps = frozenset({tap})
        self.regressor: nn.Module = nn.Identity()

    def build(self, method, student, teacher, student_name, teacher_name):
        s, t = self.single_taps(method, student, teacher, student_name, teacher_name)
        self.regressor = make_regressor(s.shape, t.shape)
        with torch.no_grad():
            self.regressor.eval()
            self.loss(self.regressor(s), t)
            self.regressor.train()

    def forward(self, s, t, y, epoch, index):
        return self.loss(self.regressor(s.features[self.tap]), t.features[self.tap])


class DKDTerm(Term):
    """Decoupled KD (Zhao et al. 2022): ``min((epoch + 1) / warmup, 1) * dkd_loss``. The target
    class is the label, or the teacher's prediction for unlabelled (transfer) samples."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        warmup_epochs: int = 20,
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.warmup_epochs = warmup_epochs

    def forward(self, s, t, y, epoch, index):
        from kdbench.losses import dkd_loss

        target = torch.where(y >= 0, y, t.logits.argmax(1))
        warm = min((epoch + 1) / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0
        return warm * dkd_loss(s.logits, t.logits, target, self.alpha, self.beta, self.temperature)


def _as_list(value) -> list[torch.Tensor]:
    return value if isinstance(value, list) else [value]


class VIDTerm(Term):
    """Variational information distillation: one :class:`kdbench.losses.VIDLoss` (regressor and
    learned per-channel variances) per (student, teacher) pair of the tap, summed."""

    def __init__(self, tap: str = "stages", init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.tap, self.init_pred_var, self.eps = tap, init_pred_var, eps
        self.taps = frozenset({tap})
        self.pairs = nn.ModuleList()

    def build(self, method, student, teacher, student_name, teacher_name):
        from kdbench.losses import VIDLoss

        s, t = student.features.get(self.tap), teacher.features.get(self.tap)
        if not s or not t or len(_as_list(s)) != len(_as_list(t)):
            raise KdbenchError(
                f"method={method} needs the {self.tap!r} tap on both models, with as many outputs "
                f"on each: set student.taps.{self.tap} / teacher.taps.{self.tap} "
                f"(or method.term.tap=hint)"
            )
        self.pairs = nn.ModuleList(
            VIDLoss(
                a.shape[1],
                b.shape[1],
                init_pred_var=self.init_pred_var,
                eps=self.eps,
                spatial_dims=b.dim() - 2,
            )
            for a, b in zip(_as_list(s), _as_list(t), strict=True)
        )
        with torch.no_grad():
            self.pairs.eval()
            self.forward(student, teacher, None, 0, None)
            self.pairs.train()

    def forward(self, s, t, y, epoch, index):
        feats = zip(_as_list(s.features[self.tap]), _as_list(t.features[self.tap]), strict=True)
        return sum(vid(a, b) for vid, (a, b) in zip(self.pairs, feats, strict=True))


class CRDTerm(Term):
    """Contrastive representation distillation: embedding heads, two memory banks sized to the
    training set (train + transfer), each anchor against ``nce_k`` distinct negatives sampled
    per step (of other classes for labelled anchors, without replacement as the reference's
    ``mode='exact'``: :meth:`kdbench.losses.CRDLoss.sample_negatives`). Needs the sample index of
    every batch."""

    def __init__(
        self,
        tap: str = "embedding",
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
    ) -> None:
        super().__init__()
        self.tap, self.feat_dim, self.nce_k, self.nce_t, self.nce_m = (
            tap,
            feat_dim,
            nce_k,
            nce_t,
            nce_m,
        )
        self.taps = frozenset({tap})
        self.dims: tuple[int, int] | None = None
        self.crd: nn.Module | None = None

    def build(self, method, student, teacher, student_name, teacher_name):
        s, t = self.single_taps(method, student, teacher, student_name, teacher_name)
        self.dims = (math.prod(s.shape[1:]), math.prod(t.shape[1:]))
        self.bind_size(self.nce_k + 1)  # provisional banks; sized to the data by bind_data

    def bind_size(self, n_data: int) -> None:
        from kdbench.losses import CRDLoss

        if self.nce_k >= n_data:  # the negatives come from the training set
            print(
                f"kdbench: method.term.nce_k={self.nce_k} reduced to {n_data - 1}: the training "
                f"set has {n_data} samples"
            )
            self.nce_k = n_data - 1
        self.crd = CRDLoss(
            *self.dims,
            n_data,
            feat_dim=self.feat_dim,
            nce_k=self.nce_k,
            nce_t=self.nce_t,
            nce_m=self.nce_m,
        )

    def bind_data(self, dm) -> None:
        ds = dm.distill_set()
        if self.crd is None or self.crd.memory_s.shape[0] != len(ds):
            self.bind_size(len(ds))
        self.register_buffer("labels", ds.y.clone(), persistent=False)

    def forward(self, s, t, y, epoch, index):
        labels = self.labels.to(index.device)
        negatives = self.crd.sample_negatives(index, labels, len(labels), self.nce_k)
        return self.crd(s.features[self.tap], t.features[self.tap], index, negatives)


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
    """Mean CE over the labelled samples (``y >= 0``; unlabelled ones carry -1); 0 for a batch
    with none. Computed without reading anything back to the host (no boolean indexing, no
    branch on the data): a sum that ignores label -1, over the labelled count (at least 1)."""
    total = F.cross_entropy(logits.float(), y, ignore_index=-1, reduction="sum")
    return total / (y >= 0).sum().clamp_min(1)


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
        logit_std: bool = False,
    ) -> None:
        super().__init__()
        self.name, self.knowledge = name, knowledge
        self.gamma, self.alpha, self.beta = float(gamma), float(alpha), float(beta)
        self.temperature = float(temperature)
        self.term = term
        self.logit_std = bool(logit_std)  # standardise logits before every distillation term

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
        self, s: Outputs, t: Outputs, y: torch.Tensor, epoch: int, index: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``alpha * KD`` and ``beta * term`` towards the (detached) teacher outputs ``t``."""
        if self.logit_std:  # Sun et al. 2024: z -> (z - mean) / std before the logit losses
            s = Outputs(logit_standardize(s.logits), s.features)
            t = Outputs(logit_standardize(t.logits), t.features)
        terms: dict[str, torch.Tensor] = {}
        if self.alpha > 0:
            terms["kd"] = self.alpha * kd_loss(s.logits, t.logits, self.temperature)
        if self.term is not None and self.beta > 0:
            terms[self.name] = self.beta * self.term(s, t, y, epoch, index)
        return terms

    def forward(
        self, s: Outputs, t: Outputs | None, y: torch.Tensor, epoch: int, index=None
    ) -> dict[str, torch.Tensor]:
        terms = self.hard_label_terms(s, y)
        if t is not None:
            terms.update(self.distill_terms(s, t, y, epoch, index))
        return terms


def build_method(cfg) -> Method:
    """A :class:`Method` from the ``method`` config group, its values checked."""
    from kdbench.errors import checked_instantiate
    from kdbench.validate import check_method

    check_method(cfg)
    term = checked_instantiate(cfg.term) if cfg.get("term") is not None else None
    return Method(
        cfg.name,
        cfg.knowledge,
        cfg.gamma,
        cfg.alpha,
        cfg.beta,
        cfg.temperature,
        term,
        cfg.get("logit_std", False),
    )

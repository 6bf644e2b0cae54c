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
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

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


class TermOutput(NamedTuple):
    """What a term's ``forward`` may return instead of one tensor: its value (weighted by beta)
    and named extra terms added as they are, e.g. an adversary's own loss (trained by its own
    optimizer, see :func:`kdbench.schemes.base.own_optimizer`) and metrics (names ending in
    ``#``: logged, not optimised)."""

    value: torch.Tensor
    extra: dict[str, torch.Tensor]


class Term(nn.Module):
    """The method's own (beta-weighted) loss term. ``taps`` names what it needs from both models."""

    taps: frozenset[str] = frozenset()
    # Language models (logits [B, L, V]): a term that works per token. ``token_rows``: it reads
    # the logits, one row per token that counts (LogitTerm, DKD); ``token_features``: it reads
    # per-token feature taps [B, L, ...] and masks them itself with the labels y [B, L]
    # (padding: y == PAD_LABEL). Any other term (relations, maps, hints) is refused for LMs.
    token_rows: bool = False
    token_features: bool = False
    # Whether it needs the teacher's whole distribution (refused with method.teacher_topk)
    needs_full_teacher: bool = True
    # False: the term makes its own targets and reads no teacher output (Tf-KD's virtual
    # teacher); a method made of such terms needs no teacher network (Method.teacher_free)
    needs_teacher: bool = True

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
    token_rows = True
    needs_full_teacher = False  # a divergence of two distributions: top-k buckets serve

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
        symmetric: bool = False,
    ) -> None:
        """``select``: use one element of a list tap (e.g. -1, the last stage); ``pairwise``:
        apply ``loss`` to each (student, teacher) pair of a list tap and sum; ``symmetric``: the
        loss is symmetric in its two arguments and takes ``teacher_grad=True`` (gradients on
        both): two online peers then share one call (:meth:`pair_loss`)."""
        super().__init__()
        self.tap, self.loss, self.needs_maps = tap, direct_loss(loss), needs_maps
        self.select, self.pairwise, self.symmetric = select, pairwise, bool(symmetric)
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

    def pair_loss(self, a: Outputs, b: Outputs) -> torch.Tensor:
        """A symmetric loss between two peers that both learn (``symmetric``): its gradient
        with respect to each side is that side's own direction's (the other side detached)."""
        return self.loss(
            self._pick(a.features[self.tap]), self._pick(b.features[self.tap]), teacher_grad=True
        )


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

    token_rows = True

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
        teacher_topk: int | None = None,
    ) -> None:
        super().__init__()
        self.name, self.knowledge = name, knowledge
        self.gamma, self.alpha, self.beta = float(gamma), float(alpha), float(beta)
        self.temperature = float(temperature)
        self.term = term
        self.logit_std = bool(logit_std)  # standardise logits before every distillation term
        # K: the teacher is a black box that exposes its top-K tokens per position (an API):
        # the schemes wrap it in TopKTeacher, whose logits are K+1 buckets (see student_buckets)
        self.teacher_topk = int(teacher_topk) if teacher_topk else None

    @property
    def taps(self) -> frozenset[str]:
        return self.term.taps if self.term is not None and self.beta > 0 else frozenset()

    @property
    def uses_teacher(self) -> bool:
        """Whether a teacher's outputs enter the loss (its KD term, or a term that reads them)."""
        term = self.term is not None and self.beta > 0 and self.term.needs_teacher
        return self.alpha > 0 or term

    @property
    def teacher_free(self) -> bool:
        """Whether the method distils from no teacher network at all: its term makes its own
        targets (``Term.needs_teacher`` False, e.g. Tf-KD's virtual teacher) and alpha is 0.
        (``none`` is not: it trains without a teacher but is compared with one.)"""
        return not self.uses_teacher and self.term is not None and self.beta > 0

    def copy(self) -> Method:
        """An independent copy (own auxiliary modules), e.g. one per direction between peers."""
        return copy.deepcopy(self)

    def hard_label_terms(self, s: Outputs, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """``gamma * CE`` on the labelled samples (a language model's: labelled tokens)."""
        if self.gamma <= 0:
            return {}
        if s.logits.dim() == 3:
            (z,), y = token_rows([s.logits], y)
            return {"ce": self.gamma * masked_cross_entropy(z, y)}
        return {"ce": self.gamma * masked_cross_entropy(s.logits, y)}

    def distill_terms(
        self,
        s: Outputs,
        t: Outputs,
        y: torch.Tensor,
        epoch: int,
        index: torch.Tensor | None = None,
        term: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``alpha * KD`` and ``beta * term`` towards the (detached) teacher outputs ``t``; with
        ``t`` None only a term that needs no teacher (``Term.needs_teacher`` False) runs;
        ``term=False``: KD alone (a caller that computes the term itself)."""
        if s.logits.dim() == 3:  # a language model: per token
            return self.token_distill_terms(s, t, y, epoch)
        if self.logit_std:  # Sun et al. 2024: z -> (z - mean) / std before the logit losses
            s = Outputs(logit_standardize(s.logits), s.features)
            if t is not None:  # None: a teacher-free method (no teacher outputs)
                t = Outputs(logit_standardize(t.logits), t.features)
        terms: dict[str, torch.Tensor] = {}
        if self.alpha > 0 and t is not None:
            terms["kd"] = self.alpha * kd_loss(s.logits, t.logits, self.temperature)
        term = term and self.term is not None and self.beta > 0
        if term and (t is not None or not self.term.needs_teacher):
            out = self.term(s, t, y, epoch, index)
            if isinstance(out, TermOutput):
                terms[self.name] = self.beta * out.value
                terms.update(out.extra)
            else:
                terms[self.name] = self.beta * out
        return terms

    def token_distill_terms(self, s: Outputs, t: Outputs | None, y: torch.Tensor, epoch: int):
        """Per-token distillation of a language model: logits ``[B, L, V]`` and labels
        ``[B, L]`` become rows ``[N, V]`` and ``[N]`` of the N tokens that count (padding,
        ``y == PAD_LABEL``, dropped: :func:`token_rows`), so every response loss is a mean over
        tokens, each token weighing the same whatever its sequence's length. A token-feature
        term (``Term.token_features``: hidden_cos, minilm) gets the outputs as they are and the
        labels ``[B, L]`` (its mask). With a top-K teacher (``teacher_topk``) the student's
        rows are bucketed by the teacher's top-K token ids (``topk_student_logits``)."""
        feature_term = self.term is not None and self.term.token_features
        terms: dict[str, torch.Tensor] = {}
        if t is not None and (self.alpha > 0 or not feature_term):  # the response terms: rows
            z_t = [t.logits]
            if self.teacher_topk:
                z_t.append(t.features["topk_index"])
            (z_s, *z_t), y_rows = token_rows([s.logits, *z_t], y)
            if self.teacher_topk:
                from kdbench.losses import topk_student_logits

                z_s = topk_student_logits(z_s, z_t[1].long(), self.temperature)
            rows_s, rows_t = Outputs(z_s), Outputs(z_t[0])
            terms = self.distill_terms(rows_s, rows_t, y_rows, epoch, None, term=not feature_term)
        term_on_sequences = t is None or feature_term  # (a feature term masks them itself)
        if term_on_sequences and self.beta > 0 and (t is not None or not self.term.needs_teacher):
            terms[self.name] = self.beta * self.term(s, t, y, epoch, None)
        return terms

    def forward(
        self, s: Outputs, t: Outputs | None, y: torch.Tensor, epoch: int, index=None
    ) -> dict[str, torch.Tensor]:
        terms = self.hard_label_terms(s, y)
        if t is not None or self.teacher_free:  # teacher-free: the term's own targets
            terms.update(self.distill_terms(s, t, y, epoch, index))
        return terms


def token_rows(tensors: list[torch.Tensor], y: torch.Tensor):
    """``([t.flatten(0, 1)[keep] for t in tensors], y.flatten()[keep])``: a language model's
    per-position tensors ``[B, L, ...]`` and labels ``[B, L]`` as rows of the positions that
    count (``y != PAD_LABEL``). One host sync (the count of rows)."""
    from kdbench.data.base import PAD_LABEL

    keep = (y != PAD_LABEL).flatten().nonzero().squeeze(1)
    rows = [t.flatten(0, 1).index_select(0, keep) for t in tensors]
    return rows, y.flatten().index_select(0, keep)


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
        cfg.get("teacher_topk"),
    )


class Discriminator(nn.Module):
    """An MLP giving one raw score per sample (``D = sigmoid(score)``): linear layers of widths
    ``hidden`` with LeakyReLU(0.2) between them (the DCGAN discriminator's activation, Radford
    et al. 2016), then one output. ``frozen=True`` runs it with its parameters detached: the
    student's adversarial loss reaches the student, never D (D's own loss trains D)."""

    def __init__(self, in_features: int, hidden: list[int]) -> None:
        super().__init__()
        widths = [in_features, *hidden, 1]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        x = x.flatten(1).float()
        last = len(self.layers) - 1
        for k, layer in enumerate(self.layers):
            w, b = layer.weight, layer.bias
            if frozen:
                w, b = w.detach(), b.detach()
            x = F.linear(x, w, b)
            if k < last:
                x = F.leaky_relu(x, 0.2)
        return x.squeeze(1)


class AdversarialTerm(Term):
    """Adversarial distillation (METHODS.md "Variants"; Xu et al. 2018, "Training Shallow and
    Thin Networks for Acceleration via Knowledge Distillation with Conditional Adversarial
    Networks"; Wang et al. 2018, KDGAN): a discriminator D tells the teacher's ``phi(T(x))``
    (real) from the student's ``phi(S(x))`` (fake), ``phi`` the logits or a feature tap
    (``on``), in the game ``min_S max_D E[log D(phi(T(x)))] + E[log(1 - D(phi(S(x))))]``.

    Per step, from one forward of each model and one backward (simultaneous updates):

    - D's loss :func:`kdbench.losses.discriminator_loss` on the detached outputs, term
      ``disc``, trained by D's own optimizer (``optim``: :func:`kdbench.schemes.base.
      own_optimizer`);
    - the student's loss :func:`kdbench.losses.adversarial_generator_loss` through D with its
      parameters detached, the term's value (weighted by beta), non-saturating by default
      (``saturating=true``: the literal minimax ``log(1 - D)``);
    - D's accuracy :func:`kdbench.losses.discriminator_accuracy`, logged as
      ``train/disc_acc`` (0.5: D cannot tell them apart).

    A student feature of another width than the teacher's goes through a linear adapter (trained
    with the student, not part of it). Under ``scheme=online`` each direction has its own D
    (one method copy per ordered pair), as in Chung et al. 2020 (AFD). D and the adapter are
    auxiliary parameters, never the deployed student's."""

    def __init__(
        self,
        on: str = "logits",
        hidden: list[int] | tuple[int, ...] = (64, 64),
        optim=None,
        saturating: bool = False,
    ) -> None:
        super().__init__()
        self.on, self.hidden, self.saturating = str(on), [int(h) for h in hidden], bool(saturating)
        self.optim = dict(optim) if optim is not None else {"name": "adam", "lr": 2e-4}
        self.tap = self.on
        self.taps = frozenset() if self.on == "logits" else frozenset({self.on})
        self.adapter: nn.Module = nn.Identity()
        self.disc: Discriminator | None = None

    def _phi(self, out: Outputs) -> torch.Tensor:
        return out.logits if self.on == "logits" else out.features[self.on]

    def build(self, method, student, teacher, student_name, teacher_name):
        from kdbench.schemes.base import own_optimizer

        if self.on == "logits":
            s, t = student.logits, teacher.logits
        else:
            s, t = self.single_taps(method, student, teacher, student_name, teacher_name)
        s_dim, t_dim = math.prod(s.shape[1:]), math.prod(t.shape[1:])
        if s_dim != t_dim:
            self.adapter = nn.Sequential(nn.Flatten(), nn.Linear(s_dim, t_dim))
        self.disc = own_optimizer(Discriminator(t_dim, self.hidden), self.optim)

    def forward(self, s, t, y, epoch, index):
        from kdbench.losses import (
            adversarial_generator_loss,
            discriminator_accuracy,
            discriminator_loss,
        )

        fake = self.adapter(self._phi(s)).flatten(1)
        real = self._phi(t).detach().flatten(1)
        scores = self.disc(torch.cat([real, fake.detach().to(real.dtype)]))
        d_real, d_fake = scores[: len(real)], scores[len(real) :]
        student = adversarial_generator_loss(self.disc(fake, frozen=True), self.saturating)
        return TermOutput(
            student,
            {
                "disc": discriminator_loss(d_real, d_fake),
                "disc_acc#": discriminator_accuracy(d_real, d_fake),
            },
        )


class TfKDTerm(Term):
    """Tf-KD_reg (Yuan et al. 2020, "Revisiting Knowledge Distillation via Label Smoothing
    Regularization"): a virtual teacher with probability ``a = correct_prob`` on the true class
    and ``(1 - a) / (K - 1)`` on each other class, distilled at ``temperature``
    (:func:`kdbench.losses.tfkd_loss`; ``form`` the reference code's or METHODS.md's KD form).
    It reads no teacher output (``needs_teacher`` False): a method made of it alone
    (``alpha`` 0, ``Method.teacher_free``) trains no teacher and loads none under
    ``scheme=offline``, the "is KD just label smoothing?" control beside ``kd``. Unlabelled
    (transfer, ``y = -1``) samples have no true class: skipped."""

    needs_teacher = False

    def __init__(
        self, correct_prob: float = 0.99, temperature: float = 20.0, form: str = "reference"
    ) -> None:
        """Values checked with the config (:func:`kdbench.validate.check_variants_self`)."""
        super().__init__()
        self.correct_prob, self.temperature, self.form = correct_prob, temperature, form

    def forward(self, s, t, y, epoch, index):
        from kdbench.losses import tfkd_loss

        return tfkd_loss(s.logits, y, self.correct_prob, self.temperature, self.form)


def _last_tap(out: Outputs, tap: str) -> torch.Tensor | None:
    """The ``tap`` output of a model, the last element of a list tap (e.g. the last block's)."""
    value = out.features.get(tap)
    if isinstance(value, list):
        value = value[-1] if value else None
    return value if isinstance(value, torch.Tensor) else None


def _token_mask(y: torch.Tensor | None, leading: torch.Size) -> torch.Tensor | None:
    """``y != PAD_LABEL`` when ``y`` holds one label per token (``B x L``, a language model);
    None (every token) otherwise, e.g. a sequence classifier's ``B`` labels."""
    from kdbench.data.base import PAD_LABEL

    if y is None or tuple(y.shape) != tuple(leading):
        return None
    return y != PAD_LABEL


def _refuse_missing_tap(method, tap, role, name) -> None:
    raise KdbenchError(
        f"method={method} needs the {tap!r} tap on the {role} {name}: set {role}.taps.{tap} "
        f"to a module path or pick a {role} with {tap} outputs (a transformer of the zoo)"
    )


class HiddenCosTerm(Term):
    """DistilBERT's cosine loss (Sanh et al. 2019): ``1 - cos(h_s, h_t)`` per token of the
    ``tap`` hidden states (``B x L x H``; the last element of a list tap such as ``hidden``),
    averaged over the tokens that count (``y != PAD_LABEL``; every token when ``y`` is one
    label per sequence), :func:`kdbench.losses.hidden_cosine_loss`. A student of another
    width goes through a trainable linear projection ``W h_s`` (no bias) to the teacher's
    width: an auxiliary parameter, never the deployed student's."""

    token_features = True

    def __init__(self, tap: str = "final") -> None:
        super().__init__()
        self.tap = tap
        self.taps = frozenset({tap})
        self.proj: nn.Module = nn.Identity()

    def build(self, method, student, teacher, student_name, teacher_name):
        from kdbench.losses import hidden_cosine_loss

        s, t = _last_tap(student, self.tap), _last_tap(teacher, self.tap)
        for role, name, value in (("student", student_name, s), ("teacher", teacher_name, t)):
            if value is None:
                _refuse_missing_tap(method, self.tap, role, name)
        if s.shape[:-1] != t.shape[:-1]:
            raise KdbenchError(
                f"method={method} compares the {self.tap!r} tap token by token, but the student "
                f"{student_name} gives {tuple(s.shape)} and the teacher {teacher_name} "
                f"{tuple(t.shape)}: tap outputs of shape B x L x width on both"
            )
        if s.shape[-1] != t.shape[-1]:
            self.proj = nn.Linear(s.shape[-1], t.shape[-1], bias=False)
        with torch.no_grad():
            hidden_cosine_loss(self._project(s), t, None)

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj, nn.Linear):
            return self.proj(h.to(self.proj.weight.dtype))
        return h

    def forward(self, s, t, y, epoch, index):
        from kdbench.losses import hidden_cosine_loss

        h_s, h_t = self._project(_last_tap(s, self.tap)), _last_tap(t, self.tap)
        return hidden_cosine_loss(h_s, h_t, _token_mask(y, h_t.shape[:-1]))


class MiniLMTerm(Term):
    """MiniLM (Wang et al. 2020): the last block's self-attention distributions (``tap``,
    ``B x heads x L x L``) and, when both models have the ``values_tap`` (``B x heads x L x
    d_head``), its value relations ``softmax(V V^T / sqrt(d_head))``, each transferred by the
    KL from the teacher's, averaged over heads and the query tokens that count
    (:func:`kdbench.losses.minilm_loss`; ``causal``: a decoder's value relations see no later
    key). The heads pair one to one: both models need as many."""

    token_features = True

    def __init__(
        self, tap: str = "attention", values_tap: str | None = "values", causal: bool | str = "auto"
    ) -> None:
        super().__init__()
        # "auto": a decoder's when the teacher's attention has no weight above the diagonal
        self.tap, self.values_tap = tap, values_tap
        self.causal = causal if causal == "auto" else bool(causal)
        self.taps = frozenset({tap, values_tap} if values_tap else {tap})
        self.use_values = False

    def build(self, method, student, teacher, student_name, teacher_name):
        s, t = _last_tap(student, self.tap), _last_tap(teacher, self.tap)
        for role, name, value in (("student", student_name, s), ("teacher", teacher_name, t)):
            if value is None or value.dim() != 4:
                _refuse_missing_tap(method, self.tap, role, name)
        if s.shape[1] != t.shape[1]:
            raise KdbenchError(
                f"method={method} pairs attention heads one to one, but the student "
                f"{student_name} has {s.shape[1]} heads and the teacher {teacher_name} "
                f"{t.shape[1]}: give the student {t.shape[1]} heads (student.kwargs.n_heads="
                f"{t.shape[1]}) or use method=hidden_cos"
            )
        if s.shape != t.shape:
            raise KdbenchError(
                f"method={method} compares attention maps of the same size, but the student "
                f"{student_name} gives {tuple(s.shape)} and the teacher {teacher_name} "
                f"{tuple(t.shape)}: feed both models the same sequences"
            )
        self.use_values = bool(self.values_tap) and all(
            _last_tap(out, self.values_tap) is not None for out in (student, teacher)
        )
        if self.causal == "auto":  # (the dummy batch: every position real)
            self.causal = bool((t.float().triu(1) == 0).all())
        with torch.no_grad():
            self.forward(student, teacher, None, 0, None)

    def forward(self, s, t, y, epoch, index):
        from kdbench.losses import minilm_loss

        a_s, a_t = _last_tap(s, self.tap), _last_tap(t, self.tap)
        v_s = _last_tap(s, self.values_tap) if self.use_values else None
        v_t = _last_tap(t, self.values_tap) if self.use_values else None
        mask = _token_mask(y, torch.Size((a_t.shape[0], a_t.shape[-1])))
        return minilm_loss(a_s, a_t, mask, v_s, v_t, causal=self.causal)

"""Offline distillation: a pre-trained, frozen teacher teaches the student."""

from __future__ import annotations

import torch

from kdbench import teacher_outputs as output_cache
from kdbench.methods import Method
from kdbench.schemes.base import METRIC, SchemeModule
from kdbench.taps import Outputs, TappedModel
from kdbench.teacher import EnsembleTeacher


class Offline(SchemeModule):
    """The teacher is frozen: eval mode for the whole run (``train()`` is overridden, since
    Lightning switches modules back to train mode every epoch), no gradients, and its
    BatchNorm statistics never move. It is left out of checkpoints."""

    def __init__(
        self,
        student: TappedModel,
        teacher: TappedModel | None,
        method: Method,
        optim_cfg,
        cache_teacher_outputs: bool = True,
        cache_limit_mb: float = 2048,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(optim_cfg)
        self.student, self.method = student, method
        self.teacher = teacher
        if teacher is not None:  # frozen: no gradients, so the optimizer never sees its weights
            teacher.requires_grad_(False)
            teacher.eval()
        self.cache_teacher_outputs = cache_teacher_outputs
        self.cache_limit_mb = cache_limit_mb
        self.cache_dir = cache_dir  # where teacher outputs persist across runs (None: per fit)
        self._teacher_cache: Outputs | None = None
        self.strict_loading = False  # checkpoints hold no teacher weights

    @classmethod
    def from_context(cls, ctx) -> Offline:
        teacher = None if ctx.info.get("teacher_free") else ctx.teacher
        return cls(
            ctx.student,
            topk_view(teacher, ctx.method),
            ctx.method,
            ctx.cfg.optim,
            **cache_options(ctx.cfg),
        )

    @classmethod
    def prepare(cls, ctx) -> None:
        """A method that distils from no teacher network (``Method.teacher_free``: Tf-KD's
        virtual teacher) under plain offline distillation: the run resolves (trains, loads) no
        teacher and evaluates none; the configured teacher only names the pair. (Subclasses
        whose teacher is more than a teacher, e.g. born-again's generation 0, keep it.)"""
        super().prepare(ctx)
        ctx.info["teacher_free"] = cls is Offline and ctx.method.teacher_free

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # -- teacher outputs ------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Teacher outputs over the distillation set, once per fit (or loaded from an earlier
        run's cache): see :mod:`kdbench.teacher_outputs`."""
        self._teacher_cache = None
        dm = self.trainer.datamodule
        if self.teacher is None or not self.method.uses_teacher or dm is None:
            return
        if not self.cache_teacher_outputs:
            self.record_tag("teacher_outputs", "off")
            return
        if getattr(dm, "augment", True):
            self.record_tag("teacher_outputs", "off (augmentation)")
            return
        self._teacher_cache, source = output_cache.resolve(
            self.teacher, dm, self.method.taps, self.device, self.cache_limit_mb, self.cache_dir
        )
        self.record_tag("teacher_outputs", source)
        if self._teacher_cache is not None:  # what the cache costs (top-K: a fraction of V)
            per = output_cache.bytes_per_sample(self._teacher_cache)
            z = self._teacher_cache.logits
            unit = "token" if z.dim() == 3 else "sample"
            per = per / z.shape[1] if z.dim() == 3 else per
            self.record_tag(f"teacher_outputs_bytes_per_{unit}", f"{per:.0f}")
        if self.global_rank == 0:
            from kdbench.progress import say

            say(f"teacher outputs: {source}")

    def teacher_outputs(self, x: torch.Tensor, idx: torch.Tensor) -> Outputs:
        cache = self._teacher_cache
        if cache is not None:
            return output_cache.index(cache, idx.to(cache.logits.device))
        with torch.no_grad():
            return self.teacher(x, self.method.taps)

    def on_fit_end(self) -> None:
        self._teacher_cache = None

    # -- steps ------------------------------------------------------------------------------
    def losses(self, batch):
        x, y, idx = batch
        s = self.student(x, self.method.taps)
        t = self.teacher_outputs(x, idx) if self.method.uses_teacher else None
        weights = None
        if t is not None and isinstance(self.teacher, EnsembleTeacher):
            t, weights = self.teacher.weigh(t, y)  # teacher.weighting: per-sample member weights
        terms = self.method(s, t, y, self.current_epoch, idx)
        if weights is not None:  # logged per epoch as train/teacher_weight/<member> (means)
            for k, w in enumerate(weights.detach().mean(0).unbind()):
                terms[f"teacher_weight/{k}{METRIC}"] = w
        return terms

    def evaluate(self, x):
        out = {"student": self.student(x).logits}
        if self.teacher is not None:
            with torch.no_grad():  # (a top-K black box is evaluated whole)
                out["teacher"] = getattr(self.teacher, "full", self.teacher)(x).logits
        return out

    def on_save_checkpoint(self, checkpoint) -> None:
        super().on_save_checkpoint(checkpoint)
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith("teacher.")]:
            del sd[key]


def topk_view(teacher, method):
    """The teacher as the method sees it: a top-K black box (:class:`TopKTeacher`) with
    ``method.teacher_topk=K``, else itself."""
    if teacher is None or not getattr(method, "teacher_topk", None):
        return teacher
    from kdbench.teacher import TopKTeacher

    return TopKTeacher(teacher, method.teacher_topk, method.temperature)


def cache_options(cfg) -> dict:
    """The ``teacher_output_cache`` config as keyword arguments of :class:`Offline`."""
    c = cfg.teacher_output_cache
    return {
        "cache_teacher_outputs": c.enabled,
        "cache_limit_mb": c.max_mb,
        "cache_dir": c.dir if c.get("persist", True) else None,
    }

"""Offline distillation: a pre-trained, frozen teacher teaches the student."""

from __future__ import annotations

import torch

from kdbench.methods import Method
from kdbench.schemes.base import SchemeModule
from kdbench.taps import Outputs, TappedModel


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
    ) -> None:
        super().__init__(optim_cfg)
        self.student, self.method = student, method
        self.teacher = teacher
        if teacher is not None:  # frozen: no gradients, so the optimizer never sees its weights
            teacher.requires_grad_(False)
            teacher.eval()
        self.cache_teacher_outputs = cache_teacher_outputs
        self.cache_limit_mb = cache_limit_mb
        self._teacher_cache: Outputs | None = None
        self.strict_loading = False  # checkpoints hold no teacher weights

    @classmethod
    def from_context(cls, ctx) -> Offline:
        method = ctx.method
        return cls(
            ctx.student,
            ctx.teacher,
            method,
            ctx.cfg.optim,
            cache_teacher_outputs=ctx.cfg.teacher_output_cache.enabled,
            cache_limit_mb=ctx.cfg.teacher_output_cache.max_mb,
        )

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # -- teacher outputs ------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self._teacher_cache = None
        dm = self.trainer.datamodule
        if (
            self.teacher is None
            or not self.method.uses_teacher
            or not self.cache_teacher_outputs
            or dm is None
            or getattr(dm, "augment", True)
        ):
            return
        ds = dm.distill_set()
        chunks: list[Outputs] = []
        with torch.no_grad():
            for i in range(0, len(ds), dm.eval_batch_size):
                x = ds.x[i : i + dm.eval_batch_size].to(self.device)
                chunks.append(self.teacher(x, self.method.taps))
                if i == 0:
                    per_sample = sum(t.numel() for t in _tensors(chunks[0])) / len(x) * 4
                    if per_sample * len(ds) / 2**20 > self.cache_limit_mb:
                        return  # too large to hold: fall back to a teacher forward per step
        self._teacher_cache = Outputs(
            torch.cat([c.logits for c in chunks]),
            {k: _cat([c.features[k] for c in chunks]) for k in chunks[0].features},
        )

    def teacher_outputs(self, x: torch.Tensor, idx: torch.Tensor) -> Outputs:
        cache = self._teacher_cache
        if cache is not None:
            return Outputs(
                cache.logits[idx], {k: _index(v, idx) for k, v in cache.features.items()}
            )
        with torch.no_grad():
            return self.teacher(x, self.method.taps)

    def on_fit_end(self) -> None:
        self._teacher_cache = None

    # -- steps ------------------------------------------------------------------------------
    def losses(self, batch):
        x, y, idx = batch
        s = self.student(x, self.method.taps)
        t = self.teacher_outputs(x, idx) if self.method.uses_teacher else None
        return self.method(s, t, y, self.current_epoch, idx)

    def evaluate(self, x):
        out = {"student": self.student(x).logits}
        if self.teacher is not None:
            with torch.no_grad():
                out["teacher"] = self.teacher(x).logits
        return out

    def on_save_checkpoint(self, checkpoint) -> None:
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith("teacher.")]:
            del sd[key]


def _tensors(out: Outputs):
    yield out.logits
    for v in out.features.values():
        yield from (v if isinstance(v, list) else [v])


def _cat(parts: list):
    if isinstance(parts[0], list):
        return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]
    return torch.cat(parts)


def _index(v, idx):
    return [t[idx] for t in v] if isinstance(v, list) else v[idx]

"""On-policy distillation, generalised knowledge distillation (GKD, Agarwal et al. 2024).

A student trained only on fixed sequences (the data's, or the teacher's: seqkd) is scored at
test time on its own generations, whose prefixes it never saw in training (exposure bias). GKD
trains it on its own samples too: for a share ``scheme.lmbda`` of the training batches the
student samples a continuation of each sequence's prompt (``scheme.prompt_len`` tokens, or the
data set's prompt: arithmetic) at ``scheme.temperature``, the frozen teacher scores every
generated token (teacher-forced on the student's sequence), and the method's token-level
divergence on the generated positions is the loss (no hard-label term there: the sampled
tokens have no labels). The other batches are ordinary offline batches on the data
(GKD's "supervised" mix). ``lmbda`` 0.5 and ``temperature`` 0.9 are the defaults of TRL's
GKDTrainer (the paper sweeps lmbda in {0, 0.5, 1}); the divergence is the method's (GKD's
generalised JSD: ``method=jsd``).

The coin for each batch and the samples come from one generator seeded by the run's seed.
"""

from __future__ import annotations

import torch

from kdbench.errors import ConfigError
from kdbench.schemes.offline import Offline
from kdbench.schemes.seqkd import as_training_pairs, prompt_length, require_language_model


class OnPolicy(Offline):
    """Offline distillation with a share of the batches sampled by the student itself."""

    def __init__(
        self,
        *args,
        lmbda: float,
        prompt_len: int,
        temperature: float,
        eos=None,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lmbda, self.prompt_len = float(lmbda), int(prompt_len)
        self.sample_temperature, self.eos = float(temperature), eos
        self.sample_seed = int(seed)
        self._gen: torch.Generator | None = None

    @classmethod
    def prepare(cls, ctx) -> None:
        require_language_model(ctx, "onpolicy")
        s = ctx.cfg.scheme
        lmbda = s.get("lmbda", 0.5)
        if isinstance(lmbda, bool) or not isinstance(lmbda, int | float) or not 0 <= lmbda <= 1:
            raise ConfigError(
                "scheme.lmbda",
                lmbda,
                "must be a number in [0, 1] (GKD's share of on-policy batches)",
            )
        t = s.get("temperature", 0.9)
        if isinstance(t, bool) or not isinstance(t, int | float) or not t > 0:
            raise ConfigError("scheme.temperature", t, "must be a number > 0")
        prompt_length(ctx.cfg, ctx.dm)
        super().prepare(ctx)
        if not ctx.method.uses_teacher:
            raise ConfigError(
                "method",
                ctx.cfg.method.name,
                "scheme=onpolicy trains on the teacher's scores of the student's samples: pick "
                "a distillation method (jsd, kd, reverse_kd, ...), not one without a teacher",
            )

    @classmethod
    def from_context(cls, ctx) -> OnPolicy:
        from kdbench.schemes.offline import cache_options, topk_view

        s = ctx.cfg.scheme
        return cls(
            ctx.student,
            topk_view(ctx.teacher, ctx.method),
            ctx.method,
            ctx.cfg.optim,
            lmbda=s.get("lmbda", 0.5),
            prompt_len=prompt_length(ctx.cfg, ctx.dm),
            temperature=s.get("temperature", 0.9),
            eos=getattr(ctx.dm, "eos_id", None),
            seed=ctx.cfg.seed,
            **cache_options(ctx.cfg),
        )

    def on_train_start(self):
        super().on_train_start()
        self._gen = torch.Generator(device=self.device).manual_seed(1_000_003 + self.sample_seed)
        self._coin = torch.Generator().manual_seed(self.sample_seed)
        self._onpolicy_batches = 0

    def losses(self, batch):
        x, y, idx = batch
        if self.lmbda <= 0 or float(torch.rand((), generator=self._coin)) >= self.lmbda:
            return super().losses(batch)
        from kdbench.generate import generate

        p, total = self.prompt_len, x.shape[1] + 1
        seqs = generate(
            self.student,
            x[:, :p],
            total - p,
            temperature=self.sample_temperature,
            eos=self.eos,
            generator=self._gen,
        )
        x2, y2 = as_training_pairs(seqs, p, self.eos)
        y2 = torch.where(y2 >= 0, torch.full_like(y2, -1), y2)  # sampled: distilled, no CE
        s = self.student(x2, self.method.taps)
        with torch.no_grad():
            t = self.teacher(x2, self.method.taps)
        terms = self.method.distill_terms(s, t, y2, self.current_epoch, None)
        self._onpolicy_batches += 1
        return {f"onpolicy_{k}": v for k, v in terms.items()}

    def on_train_epoch_end(self):
        super().on_train_epoch_end()
        self.log("train/onpolicy_batches", float(self._onpolicy_batches))

"""Self-distillation from the model's own earlier predictions, without a teacher network.

- ``scheme.targets=epoch``: progressive self-knowledge distillation (PS-KD, Kim et al. 2021,
  "Self-Knowledge Distillation with Progressive Refinement of Targets"). At epoch t (1-based) the
  target of a sample is ``(1 - a_t) onehot(y) + a_t p^{t-1}(x)``, with ``a_t = a_T t / T_epochs``
  (``scheme.alpha_T``, 0.8 in the paper) and ``p^{t-1}`` the model's own softmax prediction of
  that sample in the previous epoch (made during that epoch's training step, as the reference
  code stores it); the loss is the cross-entropy to that target. The first epoch has no earlier
  prediction: its target is the label (the reference code's one-hot initialisation).
- ``scheme.targets=last_batch``: self-distillation from the last mini-batch (DLB, Shen et al.
  2022, "Self-Distillation from the Last Mini-Batch for Consistency Regularization"). Every
  step trains on its own batch plus the previous step's batch again (a fresh view of it where
  the data augments), and those repeated samples are taught by the predictions the previous
  step made of them: each sample is seen in two consecutive steps and every step sees
  ``2 x dataset.batch_size`` samples, as the authors' ``dlb.py`` (Meta-knowledge-Lab/DLB: CE
  over both halves, ``alpha T^2 KL`` on the repeated half, carried across epochs).

Each sample's last prediction (its logits) is kept in a bank indexed by the sample index the data
module serves, part of the checkpoint (``resume`` continues with it).

How methods compose: the model's earlier predictions are the teacher, logits only.

- ``gamma * CE``: the cross-entropy to the refined target ``(1 - a_t) onehot(y) + a_t p``
  (:func:`kdbench.losses.pskd_loss`) where the sample has an earlier prediction ``p``, to the
  label elsewhere; so ``method=none`` (gamma 1, nothing else) is PS-KD as published.
- ``alpha * KD(T)`` and ``beta * term``: the method's distillation terms with those earlier
  predictions as the teacher's logits, on the samples that have them (``epoch``: every sample
  once each one has a stored prediction, i.e. from the second epoch; ``last_batch``: the
  repeated half). ``method=kd`` is thus PS-KD's refined CE (x gamma) plus Hinton KD from the
  previous epoch's self; DLB as published is ``scheme.targets=last_batch scheme.alpha_T=0
  method=kd method.gamma=1 method.alpha=1 method.temperature=3``.
- Methods that read teacher features (fitnet, at, rkd, crd, ...) are refused: no features of
  earlier passes are kept; so is a teacher-free method (``tfkd``: its target is its own).

Unlabelled (transfer) samples have no CE term (no label to refine); the distillation terms use
them like any other sample. The teacher config is not used (no teacher is trained or loaded);
the student config is the model. Logged: ``train/pskd_alpha`` (a_t) every epoch.
"""

from __future__ import annotations

import torch

from kdbench.errors import ConfigError
from kdbench.losses import pskd_loss
from kdbench.methods import Method
from kdbench.schemes.base import SchemeModule
from kdbench.taps import Outputs, TappedModel


class PSKD(SchemeModule):
    supports_language_models = False  # not built for logits [B, L, V] yet
    needs_pretrained_teacher = False
    accepts_teacher_ensemble = False

    def __init__(
        self,
        student: TappedModel,
        method: Method,
        optim_cfg,
        num_samples: int,
        num_classes: int,
        alpha_T: float = 0.8,
        targets: str = "epoch",
    ) -> None:
        super().__init__(optim_cfg)
        self.student, self.method = student, method
        self.alpha_T, self.targets = float(alpha_T), str(targets)
        # each training sample's last prediction (logits) and whether it has one: checkpointed
        self.register_buffer("bank", torch.zeros(num_samples, num_classes))
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool))
        self._last_idx: torch.Tensor | None = None  # last_batch: the previous step's samples
        self._ready = False  # epoch: every sample has a stored prediction (set per epoch)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def prepare(cls, ctx) -> None:
        """Refuse methods that need teacher features; build the method's modules with the
        model as its own teacher (shapes checked on a dummy batch). The options themselves are
        checked with the config (:func:`kdbench.validate.check_variants_self`)."""
        from kdbench.run import attach_method

        name = ctx.cfg.method.name
        if ctx.method.taps:
            raise ConfigError(
                "method",
                name,
                f"reads teacher features ({', '.join(sorted(ctx.method.taps))}), but "
                "scheme=pskd's teacher is the model's own earlier predictions (logits only): "
                "pick a logit method (none, kd, hard, reverse_kd, dkd, dist)",
            )
        if ctx.method.teacher_free:
            raise ConfigError(
                "method",
                name,
                f"scheme=pskd teaches the model with its own earlier predictions, and "
                f"method={name} distils from a target of its own: use it with scheme=offline, "
                "or pick none (PS-KD itself) or a logit method (kd, hard, dkd, dist)",
            )
        attach_method(
            ctx.method, ctx.student, ctx.student, ctx.cfg, ctx.dm, roles=("student", "student")
        )

    @classmethod
    def from_context(cls, ctx) -> PSKD:
        s = ctx.cfg.scheme
        return cls(
            ctx.student,
            ctx.method,
            ctx.cfg.optim,
            len(ctx.dm.distill_set()),
            ctx.dm.num_classes,
            alpha_T=s.alpha_T,
            targets=s.targets,
        )

    # -- the schedule -----------------------------------------------------------------------
    def alpha_t(self) -> float:
        """``a_t = a_T t / T_epochs`` at epoch ``t = current_epoch + 1`` (the reference code's
        ``alpha_T * (epoch + 1) / end_epoch``): a_T at the last epoch."""
        epochs = max(1, int(self.trainer.max_epochs or 1))
        return self.alpha_T * min(self.current_epoch + 1, epochs) / epochs

    def on_fit_start(self) -> None:
        if self.targets == "last_batch":  # the stored inputs, for a fresh view of repeated ones
            ds = self.trainer.datamodule.distill_set()
            self._train_x, self._train_y = ds.x.to(self.device), ds.y.to(self.device)

    def on_fit_end(self) -> None:
        self._train_x = self._train_y = None

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._ready = bool(self.seen.all())  # one host sync per epoch

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.log("train/pskd_alpha", self.alpha_t())

    # -- steps ------------------------------------------------------------------------------
    def remember(self, idx: torch.Tensor, logits: torch.Tensor) -> None:
        """Store the samples' predictions (every rank's, under DDP)."""
        logits = logits.detach().float()
        if self.trainer.world_size > 1:
            idx = self.all_gather(idx).flatten(0, 1)
            logits = self.all_gather(logits).flatten(0, 1)
        self.bank.index_copy_(0, idx, logits)
        self.seen.index_fill_(0, idx, True)

    def losses(self, batch):
        x, y, idx = batch
        taught = 0  # the first `taught` rows have an earlier prediction that teaches them
        if self.targets == "last_batch":
            last, self._last_idx = self._last_idx, idx.detach()
            if last is not None:
                dm = self.trainer.datamodule
                x_last = dm.batch_transform(self._train_x.index_select(0, last), train=True)
                x = torch.cat([x_last.to(x.dtype), x])
                y = torch.cat([self._train_y.index_select(0, last), y])
                idx, taught = torch.cat([last, idx]), len(last)
        elif self._ready:
            taught = len(idx)
        s = self.student(x, self.method.taps)
        prev = self.bank.index_select(0, idx[:taught])  # read before this step overwrites it
        a = self.alpha_t()
        terms: dict[str, torch.Tensor] = {}
        if self.method.gamma > 0:
            if taught == len(idx):  # every row refined (epoch, from the second epoch)
                ce = pskd_loss(s.logits, y, prev.softmax(1), a)
            elif self.targets == "epoch":  # not every sample seen yet: refine the seen ones
                has = self.seen.index_select(0, idx)
                ce = pskd_loss(s.logits, y, self.bank.index_select(0, idx).softmax(1), a, has)
            else:  # last_batch: the repeated rows refined, the new ones on their labels
                has = torch.arange(len(idx), device=idx.device) < taught
                full = torch.cat([prev, prev.new_zeros(len(idx) - taught, prev.shape[1])])
                ce = pskd_loss(s.logits, y, full.softmax(1), a, has)
            terms["ce"] = self.method.gamma * ce
        if taught:
            own = Outputs(s.logits[:taught], {})
            terms.update(
                self.method.distill_terms(
                    own, Outputs(prev, {}), y[:taught], self.current_epoch, idx[:taught]
                )
            )
        self.remember(idx, s.logits)
        return terms

    def evaluate(self, x):
        return {"student": self.student(x).logits}

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint) -> None:
        """The bank is a buffer (in the state dict); the previous step's samples of
        ``last_batch`` go with it."""
        super().on_save_checkpoint(checkpoint)
        if self._last_idx is not None:
            checkpoint["kdbench"]["pskd_last_idx"] = self._last_idx.cpu()

    def on_load_checkpoint(self, checkpoint) -> None:
        super().on_load_checkpoint(checkpoint)
        last = checkpoint.get("kdbench", {}).get("pskd_last_idx")
        self._last_idx = last.to(self.device) if last is not None else None

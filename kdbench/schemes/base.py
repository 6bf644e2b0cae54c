"""What every scheme shares: the student's optimisation, the loss bookkeeping, evaluation."""

from __future__ import annotations

import math

import lightning as L
import torch

from kdbench.errors import ConfigError, NonFiniteLossError
from kdbench.metrics import accuracy, agreement, expected_calibration_error


def build_optimizer(params, cfg, total_steps: int):
    """Optimizer and LR schedule from the ``optim`` config group: ``(optimizer, scheduler or None,
    interval)`` where interval is "step" or "epoch" (when the scheduler steps)."""
    name = cfg.name.lower()
    if name == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif name == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif name == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.get("momentum", 0.9),
            weight_decay=cfg.weight_decay,
            nesterov=cfg.get("nesterov", False),
        )
    else:
        raise ConfigError("optim.name", cfg.name, "must be one of adam, adamw, sgd")
    scheduler = cfg.get("scheduler", "none")
    if scheduler == "cosine":
        total = max(total_steps, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))
        )
        return opt, sched, "step"
    if scheduler == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, list(cfg.milestones), cfg.get("lr_decay", 0.1)
        )
        return opt, sched, "epoch"
    if scheduler in (None, "none"):
        return opt, None, "step"
    raise ConfigError("optim.scheduler", scheduler, "must be one of cosine, multistep, none")


def check_finite(loss: torch.Tensor, terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    if not torch.isfinite(loss):
        bad = [k for k, v in terms.items() if not torch.isfinite(v)] or ["total"]
        raise NonFiniteLossError(
            f"loss term {bad[0]!r} became {terms.get(bad[0], loss).item()} at epoch {epoch}, step "
            f"{step}: lower the learning rate (optim.lr) or that term's weight"
        )


class EvalMixin:
    """Collects the student's (and teacher's) logits on val/test and logs the metrics.

    ``evaluate(x)`` returns a dict of named logits; ``student`` is the one the standard names
    (``val/acc``, ``test/acc``) refer to, ``teacher`` (if present) gives agreement.
    """

    test_tag = "last"  # "last": test/acc etc.; "best": test/acc_best etc.
    named_outputs = False  # also log every output by name: test/<name>/acc (peers, generations)

    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.trainer.world_size > 1:
            t = self.all_gather(t).flatten(0, 1)
        return t

    def on_validation_epoch_start(self):
        self._eval = []

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self._eval.append((self.evaluate(x), y))

    def _collect(self):
        keys = self._eval[0][0].keys()
        logits = {k: self._gather(torch.cat([o[k] for o, _ in self._eval])) for k in keys}
        y = self._gather(torch.cat([y for _, y in self._eval]))
        self._eval = []
        return logits, y

    def on_validation_epoch_end(self):
        logits, y = self._collect()
        acc = accuracy(logits["student"], y)
        self.best_val_acc = max(getattr(self, "best_val_acc", 0.0), acc)
        self.log("val/acc", acc, prog_bar=True, sync_dist=False)
        for name, z in logits.items():
            if self.named_outputs or name not in ("student", "teacher"):
                self.log(f"val/{name}/acc", accuracy(z, y))

    def on_test_epoch_start(self):
        self._eval = []

    def test_step(self, batch, batch_idx):
        x, y, _ = batch
        self._eval.append((self.evaluate(x), y))

    def on_test_epoch_end(self):
        logits, y = self._collect()
        s = logits["student"]
        suffix = "" if self.test_tag == "last" else "_" + self.test_tag
        metrics = {
            f"test/acc{suffix}": accuracy(s, y),
            f"test/ece{suffix}": expected_calibration_error(s, y),
        }
        if "teacher" in logits:
            metrics[f"test/agreement{suffix}"] = agreement(s, logits["teacher"])
            if self.test_tag == "last":
                metrics["teacher/test/acc"] = accuracy(logits["teacher"], y)
        for name, z in logits.items():
            if self.named_outputs or name not in ("student", "teacher"):
                metrics[f"test/{name}/acc{suffix}"] = accuracy(z, y)
        self.test_metrics = metrics
        for k, v in metrics.items():
            self.log(k, v)


class SchemeModule(EvalMixin, L.LightningModule):
    """Base LightningModule of a scheme.

    Subclasses define ``losses(batch) -> dict`` of named loss terms and ``evaluate(x)``; the sum
    of the terms is optimised and each is logged per epoch as ``train/<name>``. Optimisation is
    manual: one optimizer (and schedule) per parameter group from :meth:`param_groups` (one per
    peer in online distillation), one backward over the summed loss per step.

    Class hooks for the run pipeline (:mod:`kdbench.run`):
    ``needs_pretrained_teacher`` (resolve the teacher from checkpoint/cache before training),
    ``accepts_teacher_ensemble`` (whether ``teacher=ensemble`` makes sense),
    ``student_role`` (which config builds the student), ``prepare(ctx)`` (build and check what
    the scheme needs before any data or training), ``from_context(ctx)``, and
    ``execute(ctx, runner)`` (train and test; the default is one fit of ``from_context``).
    """

    needs_pretrained_teacher = True
    accepts_teacher_ensemble = True
    student_role = "student"

    def __init__(self, optim_cfg) -> None:
        super().__init__()
        self.optim_cfg = optim_cfg
        self.automatic_optimization = False
        self.run_tags: dict[str, str] = {}  # set during a fit, recorded as MLflow tags

    # -- pipeline hooks -----------------------------------------------------------------------
    @classmethod
    def prepare(cls, ctx) -> None:
        from kdbench.run import attach_method

        attach_method(ctx.method, ctx.student, ctx.teacher, ctx.cfg, ctx.dm)

    @classmethod
    def from_context(cls, ctx):
        raise NotImplementedError

    @classmethod
    def execute(cls, ctx, runner) -> dict[str, float]:
        return runner.fit_and_test(cls.from_context(ctx), ctx.student.model)

    # -- optimisation ---------------------------------------------------------------------------
    def losses(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self) -> list[list[torch.nn.Parameter]]:
        """One list of parameters per optimizer."""
        return [self.trainable_parameters()]

    def configure_optimizers(self):
        total = int(self.trainer.estimated_stepping_batches)
        built = [build_optimizer(g, self.optim_cfg, total) for g in self.param_groups()]
        self._schedules = [(sched, interval) for _, sched, interval in built if sched is not None]
        return [opt for opt, _, _ in built]

    def on_train_epoch_start(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def training_step(self, batch, batch_idx):
        terms = self.losses(batch)
        loss = sum(terms.values())
        check_finite(loss, terms, self.current_epoch, batch_idx)
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        for opt in opts:
            opt.step()
        for sched, interval in self._schedules:
            if interval == "step":
                sched.step()
        # Per-epoch means, summed here: self.log() per step and term costs ~1 ms of bookkeeping.
        n = len(batch[0])
        with torch.no_grad():
            for name, value in (*terms.items(), ("loss", loss)):
                self._sums[name] = self._sums.get(name, 0.0) + value.detach() * n
        self._count += n

    def on_train_epoch_end(self):
        for sched, interval in self._schedules:
            if interval == "epoch":
                sched.step()
        for name, total in self._sums.items():
            self.log(f"train/{name}", total / self._count, sync_dist=self.trainer.world_size > 1)

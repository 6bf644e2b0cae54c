"""What every scheme shares: the student's optimisation, the loss bookkeeping, evaluation."""

from __future__ import annotations

import math

import lightning as L
import torch

from kdbench.errors import NonFiniteLossError
from kdbench.metrics import accuracy, agreement, expected_calibration_error


def build_optimizer(params, cfg, total_steps: int):
    """Optimizer and per-step LR schedule from the ``optim`` config group."""
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
        raise ValueError(f"unknown optimizer {cfg.name}")
    scheduler = cfg.get("scheduler", "none")
    if scheduler == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
    if scheduler == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, list(cfg.milestones), cfg.get("lr_decay", 0.1)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
    return opt


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
            if name not in ("student", "teacher"):
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
            if name not in ("student", "teacher"):
                metrics[f"test/{name}/acc{suffix}"] = accuracy(z, y)
        self.test_metrics = metrics
        for k, v in metrics.items():
            self.log(k, v)


class SchemeModule(EvalMixin, L.LightningModule):
    """Base LightningModule: subclasses define ``student_params``-owning modules and
    ``losses(batch) -> dict``; the sum is optimised and each term is logged as train/<name>."""

    def __init__(self, optim_cfg) -> None:
        super().__init__()
        self.optim_cfg = optim_cfg

    def losses(self, batch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_train_epoch_start(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def training_step(self, batch, batch_idx):
        terms = self.losses(batch)
        loss = sum(terms.values())
        check_finite(loss, terms, self.current_epoch, batch_idx)
        # Per-epoch means, summed here: self.log() per step and term costs ~1 ms of bookkeeping.
        n = len(batch[0])
        with torch.no_grad():
            for name, value in (*terms.items(), ("loss", loss)):
                self._sums[name] = self._sums.get(name, 0.0) + value.detach() * n
        self._count += n
        return loss

    def on_train_epoch_end(self):
        for name, total in self._sums.items():
            self.log(f"train/{name}", total / self._count, sync_dist=self.trainer.world_size > 1)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return build_optimizer(
            self.trainable_parameters(),
            self.optim_cfg,
            int(self.trainer.estimated_stepping_batches),
        )

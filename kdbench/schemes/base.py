"""What every scheme shares: the student's optimisation, the loss bookkeeping, evaluation."""

from __future__ import annotations

import math

import lightning as L
import torch

from kdbench.errors import ConfigError, NonFiniteLossError
from kdbench.metrics import (
    accuracy,
    agreement,
    expected_calibration_error,
    language_model_metrics,
    token_rows,
)
from kdbench.validate import OPTIMIZERS, SCHEDULERS


def use_fused(params, setting) -> bool:
    """Whether the optimizer runs as torch's fused kernel (one kernel per parameter instead of
    about ten per parameter; on the CPU an Adam step of a 15k-parameter MLP takes about a third
    of the time, see results/perf.md). ``auto``: where torch has it, floating-point
    parameters on CPU or CUDA; ``true`` / ``false`` force it."""
    if isinstance(setting, bool):
        return setting
    return all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def build_optimizer(params, cfg, total_steps: int):
    """Optimizer and LR schedule from the ``optim`` config group: ``(optimizer, scheduler or None,
    interval)`` where interval is "step" or "epoch" (when the scheduler steps). Names are
    checked, case-insensitively, by :func:`kdbench.validate.check_optim` before any work."""
    params = list(params)
    name = str(cfg.name).lower()
    fused = use_fused(params, cfg.get("fused", "auto"))
    betas = tuple(cfg.get("betas", (0.9, 0.999)))  # torch's default; GANs often (0.5, 0.999)
    if name == "adam":
        opt = torch.optim.Adam(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, fused=fused
        )
    elif name == "adamw":
        opt = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas, fused=fused
        )
    elif name == "sgd":
        opt = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.get("momentum", 0.9),
            weight_decay=cfg.weight_decay,
            nesterov=cfg.get("nesterov", False),
            fused=fused,
        )
    else:
        raise ConfigError("optim.name", cfg.name, f"must be one of {', '.join(OPTIMIZERS)}")
    scheduler = str(cfg.get("scheduler", "none")).lower()
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
    if scheduler == "none":
        return opt, None, "step"
    raise ConfigError("optim.scheduler", scheduler, f"must be one of {', '.join(SCHEDULERS)}")


# A term name ending in METRIC is a metric, not a loss: logged per epoch as train/<name> (without
# the mark), never added to the optimised sum (e.g. a discriminator's accuracy, "disc_acc#").
METRIC = "#"


def own_optimizer(module: torch.nn.Module, optim) -> torch.nn.Module:
    """Mark ``module`` (a discriminator, a generator) as trained by an optimizer of its own,
    built from ``optim``: a complete ``optim``-style mapping (name, lr, and optionally
    weight_decay (default 0), betas, scheduler (default none)), not merged with the run's
    ``optim``. :meth:`SchemeModule.configure_optimizers` takes its parameters out of every
    other group. Its loss is a term like any other: each term's gradient must reach only its
    own parameters (the adversary's loss sees the student's outputs detached, the student's
    adversarial loss sees the adversary's parameters detached), so one backward over the sum
    of the terms serves both and the fast path of :meth:`SchemeModule.optimisation_step`
    stays one backward and one step per optimizer (simultaneous updates)."""
    module.own_optim = dict(optim)
    return module


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
        if logits["student"].dim() == 3:  # a language model: per-token metrics
            lm = language_model_metrics(logits["student"], y)
            acc = lm["acc"]
            self.log("val/bpc", lm["bpc"])
        else:
            acc = accuracy(logits["student"], y)
        self.best_val_acc = max(getattr(self, "best_val_acc", 0.0), acc)
        self.log("val/acc", acc, prog_bar=True, sync_dist=False)
        self.log("val/acc_best", self.best_val_acc)  # via callback_metrics to a spawning parent
        for name, z in logits.items():
            if self.named_outputs or name not in ("student", "teacher"):
                self.log(f"val/{name}/acc", token_accuracy(z, y))

    def on_test_epoch_start(self):
        self._eval = []

    def test_step(self, batch, batch_idx):
        x, y, _ = batch
        self._eval.append((self.evaluate(x), y))

    def on_test_epoch_end(self):
        logits, y = self._collect()
        s = logits["student"]
        suffix = "" if self.test_tag == "last" else "_" + self.test_tag
        if s.dim() == 3:  # a language model: per-token metrics, exact match where it applies
            metrics = self.language_model_test(logits, y, suffix)
        else:
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
                metrics[f"test/{name}/acc{suffix}"] = token_accuracy(z, y)
        self.test_metrics = metrics
        for k, v in metrics.items():
            self.log(k, v)

    def language_model_test(self, logits, y, suffix: str) -> dict[str, float]:
        """``test/{acc,ppl,bpc,ece,agreement}`` per token (:func:`language_model_metrics`),
        the teacher's ``teacher/test/{acc,ppl,bpc}``, and, on a data set scored by its final
        answers (``dm.final_answer``: arithmetic), ``test/exact_match`` of greedy generations
        from the test prompts (and the teacher's)."""
        teacher = logits.get("teacher")
        lm = language_model_metrics(logits["student"], y, teacher)
        metrics = {f"test/{k}{suffix}": v for k, v in lm.items()}
        if teacher is not None and self.test_tag == "last":
            for k, v in language_model_metrics(teacher, y).items():
                if k in ("acc", "ppl", "bpc"):
                    metrics[f"teacher/test/{k}"] = v
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "final_answer"):
            peers = dict(getattr(self, "peers", {}))  # online: student and teacher are peers
            student = getattr(self, "student", None) or peers["student"]
            metrics[f"test/exact_match{suffix}"] = exact_match(student, dm, "test")
            t = getattr(self, "teacher", None) or peers.get("teacher")
            if isinstance(t, torch.nn.Module) and self.test_tag == "last":
                metrics["teacher/test/exact_match"] = exact_match(
                    getattr(t, "inner", t), dm, "test"
                )
        return metrics


def token_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy: per sample, or per labelled token for a language model's logits."""
    if logits.dim() == 3:
        return accuracy(*token_rows(logits, y))
    return accuracy(logits, y)


def exact_match(model, dm, split: str) -> float:
    """The share of ``split``'s prompts whose greedy generation has the gold final answer
    (``dm.final_answer`` of the decoded text: the worked steps may differ)."""
    from kdbench.generate import generate

    prompts, gold = dm.prompts(split), dm.answers(split)
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(prompts), dm.eval_batch_size):
        p = prompts[i : i + dm.eval_batch_size].to(device)
        out = generate(model, p, dm.max_answer_len, greedy=True, eos=dm.eos_id)
        for row, answer in zip(out[:, p.shape[1] :].tolist(), gold[i : i + len(p)], strict=True):
            hits += dm.final_answer(dm.decode(row)) == dm.final_answer(answer)
    return hits / max(len(prompts), 1)


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
    supports_resume = True  # each fit continued from its last.ckpt (see fit_names)
    supports_language_models = True  # logits [B, L, V] (per-token terms: kdbench.methods)

    def __init__(self, optim_cfg) -> None:
        super().__init__()
        self.optim_cfg = optim_cfg
        self.automatic_optimization = False
        self.tag_prefix = ""  # e.g. "gen2_" for one of several fits in one run

    # -- pipeline hooks -----------------------------------------------------------------------
    @classmethod
    def prepare(cls, ctx) -> None:
        from kdbench.run import attach_method

        attach_method(ctx.method, ctx.student, ctx.teacher, ctx.cfg, ctx.dm)

    @classmethod
    def fit_names(cls, cfg) -> tuple[str, ...]:
        """The names of the fits one run makes ("" for a single fit), in order: each has its own
        checkpoint, and a resumed run continues each from its own."""
        return ("",)

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

    def scaled_optim_cfg(self):
        """``optim`` with ``lr`` scaled linearly by the total batch (per-device batch x devices)
        over ``optim.lr_reference_batch`` when that is set (Goyal et al. 2017): without it,
        more devices mean a larger total batch at the same lr (~1 point lost on CIFAR-100)."""
        from omegaconf import OmegaConf

        ref = self.optim_cfg.get("lr_reference_batch")
        dm = self.trainer.datamodule
        if not ref or dm is None:
            return self.optim_cfg
        factor = dm.batch_size * self.trainer.world_size / float(ref)
        cfg = OmegaConf.create(OmegaConf.to_container(self.optim_cfg, resolve=True))
        cfg.lr = float(cfg.lr) * factor
        return cfg

    def configure_optimizers(self):
        from omegaconf import OmegaConf

        cfg, total = self.scaled_optim_cfg(), self.total_steps()
        own = [m for m in self.modules() if getattr(m, "own_optim", None) is not None]
        owned = {id(p) for m in own for p in m.parameters()}
        groups = [[p for p in g if id(p) not in owned] for g in self.param_groups()]
        built = [build_optimizer(g, cfg, total) for g in groups if g]
        for m in own:  # modules with an optimizer of their own (see own_optimizer)
            own_cfg = OmegaConf.create({"weight_decay": 0.0, **m.own_optim})
            built.append(build_optimizer(m.parameters(), own_cfg, total))
        self._schedules = [(sched, interval) for _, sched, interval in built if sched is not None]
        states = self._restored.get("schedules")
        if states:  # resumed: the schedules go on where they stopped
            for (sched, _), state in zip(self._schedules, states, strict=True):
                sched.load_state_dict(state)
        return [opt for opt, _, _ in built]

    def record_tag(self, key: str, value: str) -> None:
        """An MLflow tag of the run, written by rank 0 where the fit runs (a spawned or forked
        DDP worker included)."""
        logger = self.logger
        if self.global_rank == 0 and logger is not None and hasattr(logger, "run_id"):
            logger.experiment.set_tag(logger.run_id, f"{self.tag_prefix}{key}", value)

    # -- checkpoints (resume) -------------------------------------------------------------------
    _restored: dict = {}

    def on_save_checkpoint(self, checkpoint) -> None:
        """The schedules (stepped here, not by Lightning) and the best validation accuracy."""
        checkpoint["kdbench"] = {
            "schedules": [sched.state_dict() for sched, _ in getattr(self, "_schedules", [])],
            "best_val_acc": getattr(self, "best_val_acc", 0.0),
        }

    def on_load_checkpoint(self, checkpoint) -> None:
        self._restored = checkpoint.get("kdbench", {})
        if "best_val_acc" in self._restored:
            self.best_val_acc = self._restored["best_val_acc"]

    def micro_batch_size(self) -> int | None:
        """The size of one optimisation step's batch when the data module serves several steps'
        batches at once (``steps_per_call`` > 1), else None."""
        dm = self.trainer.datamodule
        k = getattr(dm, "steps_per_call", 1) if dm is not None else 1
        return dm.batch_size if k > 1 else None

    def total_steps(self) -> int:
        """Optimizer steps of the whole fit (for per-step schedules)."""
        total = int(self.trainer.estimated_stepping_batches)  # Lightning's: batches it serves
        micro = self.micro_batch_size()
        if micro is None or self.trainer.max_steps != -1 or self.trainer.limit_train_batches != 1:
            return total
        samples = len(self.trainer.train_dataloader.batch_sampler.sampler)  # on this rank
        return self.trainer.max_epochs * math.ceil(samples / micro)

    def on_train_start(self):
        from lightning.pytorch.plugins.precision import Precision
        from lightning.pytorch.strategies import SingleDeviceStrategy

        opts = self.optimizers()
        self._opts = opts if isinstance(opts, list) else [opts]
        self._trained = [p for o in self._opts for g in o.param_groups for p in g["params"]]
        # One device in full precision: Lightning's backward and step wrappers add nothing but
        # per-step hooks, so the step calls torch directly. Otherwise (DDP, mixed precision)
        # they scale, unscale and synchronise: the step goes through them.
        self._lean = (
            type(self.trainer.strategy) is SingleDeviceStrategy
            and type(self.trainer.precision_plugin) is Precision
        )

    def on_train_epoch_start(self):
        self._parts: list[tuple] = []  # (batch size, term names, detached term values)

    def training_step(self, batch, batch_idx):
        """One optimisation step per micro-batch: a served batch holds ``steps_per_call`` of
        them, so Lightning's per-batch bookkeeping is paid once for several steps (the same
        batches, in the same order, as serving them one at a time). The losses are checked
        for NaN/inf once per served batch (one host sync, not one per step)."""
        micro = self.micro_batch_size()
        first = len(self._parts)
        try:
            if micro is None or len(batch[0]) <= micro:
                self.optimisation_step(batch)
            else:
                for part in zip(*(t.split(micro) for t in batch), strict=True):
                    self.optimisation_step(part)
        except RuntimeError:  # e.g. sampling from NaN scores: a NaN loss before it is the cause
            self.check_finite(first, batch)
            raise
        self.check_finite(first, batch)

    def optimisation_step(self, batch) -> None:
        terms = self.losses(batch)
        values = list(terms.values())
        loss = None
        for name, v in terms.items():
            if name[-1] != METRIC:  # metrics are logged, not optimised
                loss = v if loss is None else loss + v
        opts = self._opts
        for p in self._trained:  # opt.zero_grad(set_to_none=True) minus its profiler scope
            p.grad = None
        if self._lean:  # what manual_backward/opt.step() reduce to here, minus ~1 ms of wrappers
            loss.backward()
            for opt in opts:
                opt._on_before_step()  # Lightning's step counting (global_step, checkpoints)
                opt.optimizer.step()
                opt._on_after_step()
        else:
            self.manual_backward(loss)
            for opt in opts:
                opt.step()
        for sched, interval in self._schedules:
            if interval == "step":
                sched.step()
        # Per-epoch means: detached values kept (no kernel), weighted and summed at epoch end
        # (self.log() per step and term costs ~1 ms of bookkeeping).
        names = (*terms, "loss")
        self._parts.append((len(batch[0]), names, [v.detach() for v in values] + [loss.detach()]))

    def check_finite(self, first: int, batch=None) -> None:
        """Raise :class:`NonFiniteLossError` naming the first term and step that became NaN or
        inf among the steps recorded since ``first`` (this epoch's step numbers), and what to
        do about it (:func:`nonfinite_advice`, which looks at the frozen teacher on ``batch``)."""
        parts = self._parts[first:]
        if not parts or bool(torch.stack([v[-1] for _, _, v in parts]).isfinite().all()):
            return
        for k, (_, names, values) in enumerate(parts):
            bad = [(n, v) for n, v in zip(names, values, strict=True) if not torch.isfinite(v)]
            if bad:
                name, value = bad[0]
                raise NonFiniteLossError(
                    f"loss term {name if name != 'loss' else 'total'!r} became {value.item()} at "
                    f"epoch {self.current_epoch}, step {first + k}: "
                    + nonfinite_advice(self, batch)
                )

    def on_train_epoch_end(self):
        for sched, interval in self._schedules:
            if interval == "epoch":
                sched.step()
        groups: dict[tuple, list] = {}  # steps with the same terms (normally: all of them)
        for n, names, values in self._parts:
            groups.setdefault(names, []).append((n, values))
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # a term of some steps only (on-policy): its own steps' mean
        for names, parts in groups.items():
            sizes = torch.tensor([n for n, _ in parts], dtype=torch.float32)
            values = torch.stack([torch.stack(v).float().cpu() for _, v in parts])
            for name, total in zip(names, (values * sizes[:, None]).sum(0).tolist(), strict=True):
                sums[name] = sums.get(name, 0.0) + total
                counts[name] = counts.get(name, 0) + int(sizes.sum())
        for name, total in sums.items():
            mean = total / counts[name]
            name = name.removesuffix(METRIC)
            self.log(f"train/{name}", mean, sync_dist=self.trainer.world_size > 1)
        self._parts = []


def nonfinite_advice(module, batch=None) -> str:
    """What to do about a NaN/inf loss: a frozen teacher whose weights or outputs (on
    ``batch``) are not finite is the cause, not the learning rate; otherwise lower the
    learning rate of what is trained here (the teacher's own, while a teacher trains)."""
    teacher = getattr(module, "teacher", None)
    if isinstance(teacher, torch.nn.Module) and not any(
        p.requires_grad for p in teacher.parameters()
    ):
        where = _teacher_nonfinite(module, teacher, batch)
        if where:
            return (
                f"the frozen teacher's {where} are NaN or infinite (not the student's "
                "learning rate): give a sound teacher.checkpoint, or retrain the teacher "
                "(delete its file in <cache_dir>/teachers/; lower teacher.optim.lr if its "
                "training diverges)"
            )
    key = "optim.lr"
    full = getattr(getattr(module, "optim_cfg", None), "_get_full_key", None)
    if full is not None and str(full("lr")).startswith("teacher."):
        key = str(full("lr"))
    elif teacher is None and type(module).__name__ == "Offline":  # a teacher being trained
        key = "teacher.optim.lr"
    if key.startswith("teacher."):
        return f"the teacher's training diverged: lower its learning rate ({key})"
    return f"lower the learning rate ({key}) or that term's weight"


def _teacher_nonfinite(module, teacher, batch) -> str | None:
    """``"weights"`` or ``"outputs"`` when the frozen teacher's are not all finite."""
    with torch.no_grad():
        tensors = [*teacher.parameters(), *teacher.buffers()]
        if any(t.is_floating_point() and not bool(t.isfinite().all()) for t in tensors):
            return "weights"
        if batch is None:
            return None
        try:
            x, _, idx = batch[:3]
            if hasattr(module, "teacher_outputs"):  # the cached outputs where they are used
                out = module.teacher_outputs(x, idx)
            else:
                out = teacher(x, module.method.taps)
        except Exception:  # noqa: BLE001 - only advice: never hide the NaN error itself
            return None
        feats = [t for v in out.features.values() for t in (v if isinstance(v, list) else [v])]
        if not all(bool(t.isfinite().all()) for t in [out.logits, *feats]):
            return "outputs"
    return None

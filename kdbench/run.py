"""One experiment, end to end: validate -> data -> teacher -> scheme -> fit/test -> MLflow.

Everything that can be checked is checked before any data is generated or any model trained:
config values, feature taps, and whether the method suits the two models (a forward pass of both
untrained models on a dummy batch).
"""

from __future__ import annotations

import os
import signal
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdbench.errors import ConfigError, Interrupted, KdbenchError, mask_credentials


@dataclass
class Context:
    """What a scheme is built from."""

    cfg: DictConfig
    dm: object
    method: object
    student: object
    teacher: object | None
    scheme: type | None = None
    info: dict = field(default_factory=dict)
    deploy: object | None = None  # the deploy form (kdbench.deploy.Form), None for deploy=none


def _quiet_lightning() -> None:
    import logging

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
    # the frozen teacher is in eval mode on purpose
    warnings.filterwarnings(
        "ignore", message=".*module\\(s\\) in eval mode at the start of training.*"
    )
    warnings.filterwarnings(
        "ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"
    )
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def build_network(spec: DictConfig, dm, role: str):
    """The network of a teacher/student spec (a registered ``arch`` or a user's ``_target_``,
    see :func:`kdbench.models.build_from_spec`), wrapped with its feature taps."""
    from kdbench.models import build_from_spec
    from kdbench.taps import TappedModel, resolve_taps

    model = build_from_spec(
        spec, dm.num_classes, dm.input_shape, role, input_dtype=getattr(dm, "input_dtype", None)
    )
    return TappedModel(model, resolve_taps(model, _container(spec.get("taps")), role))


def build_model(cfg: DictConfig, role: str, dm):
    """The network for ``role`` ('teacher' or 'student'); an ensemble builds all members."""
    if role == "teacher" and cfg.teacher.get("arch") == "ensemble":
        from kdbench.teacher import build_ensemble

        return build_ensemble(cfg, dm, lambda spec: build_network(spec, dm, "teacher"))
    return build_network(cfg[role], dm, role)


def attach_method(method, student, teacher, cfg: DictConfig, dm, roles=("student", "teacher")):
    """Check that ``method`` suits the pair and build its modules, on a dummy batch.

    ``roles`` name the configs the two models come from (for the error messages)."""
    import torch

    from kdbench.data.base import dummy_input
    from kdbench.modelspec import model_name
    from kdbench.teacher import EnsembleTeacher

    check_token_method(method, cfg, dm)
    if method.term is None or method.beta == 0:
        return
    if isinstance(teacher, EnsembleTeacher) and teacher.feature_member is None:
        raise ConfigError(
            "teacher.feature_member",
            None,
            f"method={cfg.method.name} needs teacher features: name the ensemble member (an index) "
            "whose features it uses",
        )
    x = dummy_input(dm, 2)
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    with torch.no_grad():
        s, t = student(x, method.taps), teacher(x, method.taps)
    student.train(modes[0]), teacher.train(modes[1])
    names = [model_name(cfg[r]) if r in cfg else r for r in roles]
    method.term.build(cfg.method.name, s, t, *names)


# The losses a top-K black-box teacher serves: divergences of two distributions, which the K+1
# buckets (the top-K tokens and the missing mass) keep meaning (kdbench.losses.topk_*)
TOPK_LOSSES = (
    "kd_loss",
    "reverse_kd_loss",
    "jsd_loss",
    "skew_kl_loss",
    "skew_reverse_kl_loss",
    "tvd_loss",
)


def check_token_method(method, cfg: DictConfig, dm) -> None:
    """A language model (``dm.task == "lm"``) distils per token: the response terms (one row
    per token) and the token-feature terms apply, any other term is refused; a top-K teacher
    (``method.teacher_topk``) serves only divergences of the two distributions."""
    name = cfg.method.name
    term = method.term if method.beta > 0 else None
    if getattr(dm, "task", "classify") == "lm" and term is not None:
        if not (term.token_rows or term.token_features):
            raise ConfigError(
                "method",
                name,
                f"method={name} moves {cfg.method.knowledge} knowledge per sample (maps, "
                "relations between samples or hints): it does not apply to a language model's "
                "per-token outputs; use a response method (kd, reverse_kd, jsd, skew_kl, "
                "skew_reverse_kl, tvd, dkd, dist) or hidden_cos, minilm",
            )
    lm = getattr(dm, "task", "classify") == "lm"
    weighting = (
        cfg.teacher.get("weighting", "mean") if cfg.teacher.get("arch") == "ensemble" else "mean"
    )
    if lm and weighting != "mean":
        raise ConfigError(
            "teacher.weighting",
            weighting,
            "per-sample ensemble weights are for classifiers; a language model's ensemble "
            "teacher averages its members (teacher.weighting=mean)",
        )
    if method.teacher_topk and method.logit_std:
        raise ConfigError(
            "method.logit_std",
            True,
            "a top-K teacher's K+1 buckets are probabilities, not logits to standardise: drop "
            "one of logit_std and teacher_topk",
        )
    if method.teacher_topk:
        loss = getattr(getattr(term, "loss", None), "func", getattr(term, "loss", None))
        if term is not None and getattr(loss, "__name__", "") not in TOPK_LOSSES:
            raise ConfigError(
                "method.teacher_topk",
                method.teacher_topk,
                f"method={name} needs the teacher's whole distribution; a top-K teacher serves "
                "kd, reverse_kd, jsd, skew_kl, skew_reverse_kl and tvd: drop teacher_topk",
            )
        if getattr(dm, "task", "classify") != "lm":
            raise ConfigError(
                "method.teacher_topk",
                method.teacher_topk,
                "a top-K teacher is a language model's (its top-K tokens per position): use it "
                "with a text data set, or drop it",
            )
        if method.teacher_topk >= dm.num_classes:
            raise ConfigError(
                "method.teacher_topk",
                method.teacher_topk,
                f"must be smaller than the vocabulary ({dm.num_classes} tokens)",
            )


def scheme_class(cfg: DictConfig):
    from hydra.utils import get_class

    from kdbench.schemes.base import SchemeModule

    try:
        cls = get_class(cfg.scheme._target_)
    except Exception:  # noqa: BLE001 - any import problem is a bad _target_
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, SchemeModule)):
        raise ConfigError("scheme._target_", cfg.scheme.get("_target_"), "must name a SchemeModule")
    return cls


def prepare(cfg: DictConfig) -> Context:
    """Validate and build everything cheap (no data generated, nothing trained)."""
    import lightning as L

    from kdbench.errors import checked_instantiate
    from kdbench.methods import build_method
    from kdbench.validate import check_config

    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = checked_instantiate(cfg.dataset, _convert_="all")
    method = build_method(cfg.method)
    scheme = scheme_class(cfg)
    if cfg.get("resume") and not scheme.supports_resume:
        raise ConfigError(
            "resume", cfg.resume, f"scheme={cfg.scheme.name} cannot resume yet: rerun it anew"
        )
    if cfg.teacher.arch == "ensemble" and not scheme.accepts_teacher_ensemble:
        raise ConfigError(
            "teacher",
            "ensemble",
            f"an ensemble of pre-trained teachers works with scheme=offline, not "
            f"scheme={cfg.scheme.name}",
        )
    if (
        getattr(dm, "task", "classify") == "lm"
        and cfg.get("deploy", {}).get("name", "none") != "none"
    ):
        raise ConfigError(
            "deploy",
            cfg.deploy.name,
            "deploying (export, int8, pruning) is built for classifiers with float inputs, not "
            "language models yet: use deploy=none",
        )
    if getattr(dm, "task", "classify") == "lm" and not scheme.supports_language_models:
        raise ConfigError(
            "scheme",
            cfg.scheme.name,
            f"scheme={cfg.scheme.name} is not built for language models yet: use offline, "
            "seqkd, onpolicy, online or self",
        )
    student = build_model(cfg, scheme.student_role, dm)
    teacher = build_model(cfg, "teacher", dm)
    with tempfile.TemporaryDirectory() as tmp:  # trainer options fail now, not after the data
        make_trainer(cfg, Path(tmp), logger=False, enable_checkpointing=False)
    ctx = Context(cfg, dm, method, student, teacher, scheme)
    scheme.prepare(ctx)
    from kdbench.deploy import form_of

    ctx.deploy = form_of(cfg)
    if ctx.deploy is not None:  # before data and training (deploy=qat: fake quantization)
        ctx.deploy.prepare(ctx)
    dm.use_transfer = method.uses_teacher
    dm.steps_per_call = steps_per_call(cfg, dm)
    dm.shuffle_seed = cfg.seed
    return ctx


def steps_per_call(cfg: DictConfig, dm) -> int:
    """``cfg.steps_per_call`` resolved for ``dm`` (``auto``: one step per served batch where
    ``trainer.limit_train_batches`` cuts the epoch; see ``ArrayDataModule.resolve_steps``)."""
    from kdbench.validate import limits_train_batches

    return dm.resolve_steps(cfg.get("steps_per_call", 1), limited=limits_train_batches(cfg.trainer))


def make_trainer(cfg: DictConfig, root: Path, **overrides):
    """A ``lightning.Trainer`` from the ``trainer`` group; a bad option is a one-line error."""
    import lightning as L

    from kdbench import progress

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(overrides)
    kwargs = progress.trainer_options(kwargs)  # plain epoch lines / bar / none
    try:
        return L.Trainer(default_root_dir=str(root), **kwargs)
    except Exception as exc:  # noqa: BLE001 - unknown keyword, unavailable accelerator, ...
        import re

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        user = OmegaConf.to_container(cfg.trainer, resolve=True)
        named = re.search(r"unexpected keyword argument '(\w+)'", first)
        key = named.group(1) if named else None
        if key is None:  # the option the message names (Lightning quotes the key or its value)
            hits = [k for k in user if re.search(rf"\b{re.escape(k)}=", first)]
            hits += [k for k in user if re.search(rf"\b{re.escape(k)}\b", first)]
            hits += [k for k, v in user.items() if isinstance(v, str) and f"'{v}'" in first]
            key = hits[0] if hits else None
        hint = (
            "not an option of lightning.Trainer: remove it or fix its name"
            if named
            else "see lightning.Trainer's documentation for the values it takes"
        )
        if key is None:
            raise KdbenchError(
                f"the trainer options are not valid for lightning.Trainer: {first}"
            ) from None
        raise ConfigError(f"trainer.{key}", user.get(key), f"{first} ({hint})") from None


def _output_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return Path(tempfile.mkdtemp(prefix="kdbench-"))


class Runner:
    """Fits and tests scheme modules of one experiment into one MLflow run."""

    def __init__(self, cfg: DictConfig, dm, root: Path, logger, callbacks=(), resume=None) -> None:
        from kdbench.tracking import Resume

        self.cfg, self.dm, self.root, self.logger = cfg, dm, root, logger
        self.callbacks = list(callbacks)
        self.resume = resume or Resume()  # what a resumed run continues (checkpoints, done fits)
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        # the other processes of a run launched outside Lightning (torchrun, srun) write their
        # copies elsewhere: rank 0 uploads the run's artifacts while they finish
        rank = getattr(rank_zero_only, "rank", 0)
        self.artifacts = root / ("artifacts" if rank == 0 else f"artifacts_rank{rank}")
        self.artifacts.mkdir(parents=True, exist_ok=True)

    def done(self, name: str, metrics: dict[str, float]) -> None:
        """Record that the fit ``name`` of a multi-fit run finished: its metrics, and the path of
        its last-epoch student weights, so that a resumed run skips it (``resume.done``)."""
        from kdbench import tracking

        if self.logger:
            self.logger.log_metrics(metrics)
            weights = (self.artifacts / f"{name}_student.pt").resolve()
            self.logger.experiment.set_tag(
                self.logger.run_id, f"{tracking.DONE_TAG}_{name}", str(weights)
            )

    def fit_and_test(
        self, module, student_model, name: str = "", datamodule=None
    ) -> dict[str, float]:
        """Fit ``module``; test the last epoch (``test/acc`` ...) and the best validation epoch
        (``test/acc_best`` ...); save the student's state dicts as artifacts. ``datamodule``:
        what the fit and tests read (default: the run's; e.g. generated training inputs with
        the run's validation and test sets, ``scheme=datafree``)."""
        import lightning as L
        import torch
        from lightning.pytorch.callbacks import ModelCheckpoint

        from kdbench import tracking
        from kdbench.methods import Term

        dm = datamodule if datamodule is not None else self.dm

        # a resumed fit goes on writing where it was: its best checkpoint (and Lightning's record
        # of it, which is dropped when the directory changes) stays the best-epoch candidate
        resume = self.resume.checkpoint(name)
        own = resume and self.resume.run_id  # (a checkpoint of no known run starts a new one here)
        ckpt_dir = Path(resume).parent if own else self.root / "checkpoints" / (name or "run")
        ckpt = ModelCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor="val/acc", mode="max", save_last=False
        )
        # last.ckpt: the full training state after every epoch (resume). Not save_last=True:
        # Lightning writes that one only in epochs whose val/acc improved, so a run killed
        # after epochs of no gain would resume epochs back. After `ckpt` (Lightning keeps the
        # order), so each last.ckpt holds this epoch's best score too.
        last_ckpt = ModelCheckpoint(
            dirpath=ckpt_dir, filename="last", monitor=None, enable_version_counter=False
        )
        trainer = make_trainer(
            self.cfg, self.root, logger=self.logger, callbacks=[ckpt, last_ckpt, *self.callbacks]
        )
        L.seed_everything(self.cfg.seed, workers=True, verbose=False)
        prefix = f"{name}_" if name else ""
        for term in module.modules():
            if isinstance(term, Term):
                term.bind_data(dm)
        module.tag_prefix = prefix
        if self.logger:
            last = (ckpt_dir / "last.ckpt").resolve()
            tag = tracking.checkpoint_tag(name)
            self.logger.experiment.set_tag(self.logger.run_id, tag, str(last))
        trainer.fit(module, datamodule=dm, ckpt_path=resume)
        # metrics come through trainer.callback_metrics: a spawned/forked DDP fit runs in other
        # processes, whose module attributes never reach this one
        best_val = trainer.callback_metrics.get("val/acc_best")
        module.test_tag = "last"
        trainer.test(module, datamodule=dm, verbose=False)
        metrics = test_metrics(trainer, best=False)
        torch.save(student_model.state_dict(), self.artifacts / f"{prefix}student.pt")
        aux = {
            k: v for k, v in module.state_dict().items() if k.startswith(("method.", "methods."))
        }
        if aux:  # regressors, heads, memory banks: trained here, not in the deployed student
            torch.save(aux, self.artifacts / f"{prefix}aux.pt")
        if ckpt.best_model_path:
            last = {k: v.detach().clone() for k, v in module.state_dict().items()}
            module.test_tag = "best"
            trainer.test(module, datamodule=dm, ckpt_path=ckpt.best_model_path, verbose=False)
            metrics.update(test_metrics(trainer, best=True))
            # this run's own checkpoint (holds optimizer and loop state: not weights-only)
            best = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)
            module.load_state_dict(best["state_dict"], strict=False)
            torch.save(student_model.state_dict(), self.artifacts / f"{prefix}student_best.pt")
            module.load_state_dict(last)  # the module leaves with its last-epoch weights
            module.test_tag = "last"
        else:  # no validation ran: the last epoch is the only candidate
            metrics["test/acc_best"] = metrics["test/acc"]
        if best_val is None:  # no validation in this fit (e.g. resumed after its last epoch)
            best_val = getattr(module, "best_val_acc", 0.0)
        metrics["val/acc_best"] = float(best_val)
        return metrics


def test_metrics(trainer, best: bool) -> dict[str, float]:
    """The metrics of the last ``trainer.test`` (``..._best`` keys for the best-epoch test)."""
    return {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith(("test/", "teacher/test/")) and k.endswith("_best") == best
    }


class StopOnSignal:
    """SIGINT and SIGTERM stop a run as an interrupt (KeyboardInterrupt), wherever it is (data,
    teacher, fit, test, logging), and remember the signal: the run is then marked KILLED, not
    FAILED, and the process exits non-zero. (Lightning alone turns SIGTERM into a SystemExit
    with code 0 at the end of the current batch.) Lightning adds its own SIGTERM handler during
    a fit and calls this one after it."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, object] = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (a threaded launcher): leave signals be
                break

    def _handle(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signum
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def restore(self) -> None:
        for signum, handler in self._old.items():
            signal.signal(signum, handler)


def run(
    cfg: DictConfig, callbacks=(), tags: dict[str, str] | None = None, root: Path | None = None
) -> dict[str, float]:
    """Run one experiment; return its final metrics.

    ``callbacks``: extra Lightning callbacks (e.g. Optuna pruning); ``tags``: extra MLflow tags
    (e.g. ``mlflow.parentRunId`` to nest the run); ``root``: the output directory (default:
    Hydra's). The MLflow run is FINISHED only once everything is recorded; an exception leaves
    it FAILED (KILLED for a pruned trial, and for SIGINT/SIGTERM, raised as
    :class:`~kdbench.errors.Interrupted`) and carries its id as ``exc.kdbench_run_id``."""
    _quiet_lightning()
    ctx = prepare(cfg)
    import torch

    from kdbench import tracking
    from kdbench.models import count_parameters
    from kdbench.stores import prepare_mlflow
    from kdbench.teacher import resolve_teacher

    root = Path(root) if root is not None else _output_dir()
    # the store is opened (its schema and the experiment created under a lock: runs starting
    # together on a fresh store would race) before any data or teacher work
    prepare_mlflow(tracking.tracking_uri(cfg), str(cfg.mlflow.experiment))
    digest = tracking.config_hash(cfg)
    resume = None
    if cfg.get("resume"):  # before any work: a resume that cannot be done is refused now
        resume = tracking.find_resume(cfg, digest, ctx.scheme.fit_names(cfg))
    stop = StopOnSignal()
    logger = None
    try:
        ctx.dm.prepare_data()
        ctx.dm.setup()
        if ctx.scheme.needs_pretrained_teacher and not ctx.info.get("teacher_free"):
            ctx.info["teacher"] = resolve_teacher(cfg, ctx.dm, ctx.teacher, root)
        tags = {**(tags or {}), tracking.HASH_TAG: digest}
        run_id = resume.run_id if resume else None
        logger = tracking.make_logger(cfg, ctx.scheme.student_role, tags, run_id=run_id)
        tracking.log_config(logger, cfg)
        runner = Runner(cfg, ctx.dm, root, logger, callbacks, resume=resume)
        metrics = ctx.scheme.execute(ctx, runner)
        if ctx.deploy is not None:  # (deploy=qat: the fake quantization taken out)
            ctx.deploy.after_fit(ctx)
        metrics["student/params"] = count_parameters(ctx.student.model)
        metrics["teacher/params"] = count_parameters(ctx.teacher.model)
        if cfg.efficiency.enabled:
            from kdbench.efficiency import compare
            from kdbench.progress import say

            say(f"measuring efficiency on {cfg.efficiency.device}")
            dtype = getattr(ctx.dm, "input_dtype", torch.float32)
            shape = ctx.dm.input_shape
            metrics.update(compare(ctx.student, ctx.teacher, shape, cfg.efficiency, dtype))
            if getattr(ctx.dm, "task", "classify") == "lm":  # generation speed and memory
                from kdbench.efficiency import generation_figures

                for role in ("student", "teacher"):
                    model = getattr(ctx, role)
                    figures = generation_figures(
                        model, shape, cfg.efficiency.device, cfg.efficiency
                    )
                    prefix = "efficiency/" if role == "student" else "efficiency/teacher/"
                    metrics.update({prefix + k: v for k, v in figures.items()})
        metrics["aux/params"] = count_parameters(ctx.method) + ctx.info.get("aux_params", 0)
        if ctx.deploy is not None:  # the post-step: deploy/<form>/... metrics, its artifacts
            from kdbench.deploy import post_step

            metrics.update(post_step(ctx.deploy, ctx, runner.artifacts, logger))
        logger.log_metrics({k: float(v) for k, v in metrics.items()})
        teacher_info = ctx.info.get("teacher", {})
        logger.experiment.set_tag(
            logger.run_id, "teacher_source", teacher_info.get("source", "none")
        )
        for key in ("epoch", "accuracy"):  # what a published checkpoint says of itself
            if key in teacher_info:
                logger.experiment.set_tag(
                    logger.run_id, f"teacher_checkpoint_{key}", teacher_info[key]
                )
        config_text = mask_credentials(OmegaConf.to_yaml(cfg, resolve=True))
        (runner.artifacts / "config.yaml").write_text(config_text)
        for path in sorted(runner.artifacts.iterdir()):
            logger.experiment.log_artifact(logger.run_id, str(path))
        tracking.set_status(logger, "FINISHED")
    except BaseException as exc:
        pruned = type(exc).__name__ == "TrialPruned"
        signum = stop.received or (signal.SIGINT if isinstance(exc, KeyboardInterrupt) else None)
        run_id = getattr(logger, "_run_id", None)  # (reading logger.run_id would create one)
        if run_id is not None:
            exc.kdbench_run_id = run_id
            status = "KILLED" if pruned or signum else "FAILED"
            if signum:
                tracking.release_interrupted(exc)
            tracking.set_status_after_error(logger, tracking.tracking_uri(cfg), status)
        if signum:
            stopped = Interrupted(signum)
            stopped.kdbench_run_id = run_id
            raise stopped from None
        if isinstance(exc, torch.OutOfMemoryError):
            raise KdbenchError("out of memory: lower dataset.batch_size") from exc
        raise
    finally:
        stop.restore()
    metrics["run_id"] = logger.run_id
    if os.environ.get("KDBENCH_PRINT_METRICS", "1") == "1":
        shown = ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
        )
        print("kdbench: " + shown)
    return metrics

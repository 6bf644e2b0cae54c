"""One experiment, end to end: validate -> data -> teacher -> scheme -> fit/test -> MLflow.

Everything that can be checked is checked before any data is generated or any model trained:
config values, feature taps, and whether the method suits the two models (a forward pass of both
untrained models on a dummy batch).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdbench.errors import ConfigError, KdbenchError


@dataclass
class Context:
    """What a scheme is built from."""

    cfg: DictConfig
    dm: object
    method: object
    student: object
    teacher: object | None
    info: dict = field(default_factory=dict)


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


def _check_top_level(cfg: DictConfig) -> None:
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError("seed", cfg.seed, "must be an integer >= 0")
    epochs = cfg.trainer.get("max_epochs")
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError("trainer.max_epochs", epochs, "must be an integer >= 1")
    if not isinstance(cfg.teacher.epochs, int) or cfg.teacher.epochs < 1:
        raise ConfigError("teacher.epochs", cfg.teacher.epochs, "must be an integer >= 1")
    for key, lr in (("optim.lr", cfg.optim.lr), ("teacher.optim.lr", cfg.teacher.optim.lr)):
        if not isinstance(lr, int | float) or not lr > 0:
            raise ConfigError(key, lr, "must be a number > 0")


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def build_model(cfg: DictConfig, role: str, dm):
    """A registered model for ``role`` ('teacher' or 'student') wrapped with its feature taps."""
    from kdbench.models import create_model
    from kdbench.taps import TappedModel, resolve_taps

    rcfg = cfg[role]
    kwargs = _container(rcfg.get("kwargs"))
    model = create_model(
        rcfg.arch, num_classes=dm.num_classes, input_shape=dm.input_shape, **kwargs
    )
    taps = resolve_taps(model, _container(rcfg.get("taps")), role)
    return TappedModel(model, taps)


def attach_method(method, student, teacher, cfg: DictConfig, dm) -> None:
    """Check that ``method`` suits the pair and build its modules, on a dummy batch."""
    import torch

    if method.term is None or method.beta == 0:
        return
    x = torch.zeros(2, *dm.input_shape)
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    with torch.no_grad():
        s, t = student(x, method.taps), teacher(x, method.taps)
    student.train(modes[0]), teacher.train(modes[1])
    method.term.build(cfg.method.name, s, t, cfg.student.arch, cfg.teacher.arch)


def prepare(cfg: DictConfig) -> Context:
    """Validate and build everything cheap (no data generated, nothing trained)."""
    import lightning as L

    from kdbench.errors import checked_instantiate
    from kdbench.methods import build_method

    _check_top_level(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = checked_instantiate(cfg.dataset, _convert_="all")
    method = build_method(cfg.method)
    student = build_model(cfg, "student", dm)
    teacher = build_model(cfg, "teacher", dm)
    attach_method(method, student, teacher, cfg, dm)
    dm.use_transfer = method.uses_teacher
    return Context(cfg, dm, method, student, teacher)


def make_trainer(cfg: DictConfig, root: Path, **overrides):
    import lightning as L

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.update(overrides)
    return L.Trainer(default_root_dir=str(root), **kwargs)


def train_teacher(cfg: DictConfig, dm, model, root: Path) -> dict:
    """Train the teacher from scratch on the labelled data alone (CE), its own seed and recipe."""
    import lightning as L
    import torch

    from kdbench.methods import Method
    from kdbench.schemes.offline import Offline
    from kdbench.taps import TappedModel

    start = time.perf_counter()
    use_transfer, dm.use_transfer = dm.use_transfer, False
    batch_size, dm.batch_size = dm.batch_size, cfg.teacher.batch_size
    try:
        with torch.random.fork_rng():
            L.seed_everything(cfg.teacher.seed, workers=True, verbose=False)
            for m in model.modules():  # same init as a fresh model under teacher.seed
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            module = Offline(
                TappedModel(model, {}), None, Method("none", "none", 1, 0, 0, 1), cfg.teacher.optim
            )
            trainer = make_trainer(
                cfg,
                root / "teacher",
                max_epochs=cfg.teacher.epochs,
                logger=False,
                enable_checkpointing=False,
            )
            trainer.fit(module, datamodule=dm)
            trainer.test(module, datamodule=dm, verbose=False)
    finally:
        dm.use_transfer, dm.batch_size = use_transfer, batch_size
    model.eval()
    return {
        "test_acc": module.test_metrics["test/acc"],
        "val_acc": module.best_val_acc,
        "train_seconds": time.perf_counter() - start,
    }


def _output_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # composed without @hydra.main (tests, notebooks)
        return Path(tempfile.mkdtemp(prefix="kdbench-"))


def run(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment; return its final metrics."""
    _quiet_lightning()
    ctx = prepare(cfg)
    import lightning as L
    import torch
    from hydra.utils import get_class
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kdbench import tracking
    from kdbench.models import count_parameters
    from kdbench.teacher import resolve_teacher

    root = _output_dir()
    ctx.dm.prepare_data()
    ctx.dm.setup()
    ctx.info["teacher"] = resolve_teacher(
        cfg, ctx.dm, ctx.teacher.model, lambda m: train_teacher(cfg, ctx.dm, m, root)
    )
    scheme_cls = get_class(cfg.scheme._target_)

    logger = tracking.make_logger(cfg)
    try:
        tracking.log_config(logger, cfg)
        module = scheme_cls.from_context(ctx)
        ckpt = ModelCheckpoint(
            dirpath=root / "checkpoints",
            filename="best",
            monitor="val/acc",
            mode="max",
            save_last=False,
            save_weights_only=True,
        )
        trainer = make_trainer(cfg, root, logger=logger, callbacks=[ckpt])
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        trainer.fit(module, datamodule=ctx.dm)
        module.test_tag = "last"
        trainer.test(module, datamodule=ctx.dm, verbose=False)
        metrics = dict(module.test_metrics)
        art = root / "artifacts"
        art.mkdir(parents=True, exist_ok=True)
        torch.save(ctx.student.model.state_dict(), art / "student.pt")
        if ckpt.best_model_path:
            module.test_tag = "best"
            trainer.test(module, datamodule=ctx.dm, ckpt_path=ckpt.best_model_path, verbose=False)
            metrics.update(module.test_metrics)
            torch.save(ctx.student.model.state_dict(), art / "student_best.pt")
        else:  # no validation ran: the last epoch is the only candidate
            metrics.update(
                {
                    k.replace("test/acc", "test/acc_best"): v
                    for k, v in module.test_metrics.items()
                    if k == "test/acc"
                }
            )
        metrics["val/acc_best"] = module.best_val_acc
        metrics["student/params"] = count_parameters(ctx.student.model)
        metrics["teacher/params"] = count_parameters(ctx.teacher.model)
        metrics["aux/params"] = count_parameters(ctx.method)
        logger.log_metrics({k: float(v) for k, v in metrics.items()})
        logger.experiment.set_tag(logger.run_id, "teacher_source", ctx.info["teacher"]["source"])
        (art / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        for path in sorted(art.iterdir()):
            logger.experiment.log_artifact(logger.run_id, str(path))
        tracking.set_status(logger, "FINISHED")
    except BaseException as exc:
        tracking.set_status(logger, "FAILED")
        if isinstance(exc, KdbenchError | KeyboardInterrupt):
            raise
        if isinstance(exc, torch.OutOfMemoryError):
            raise KdbenchError("out of memory: lower dataset.batch_size") from exc
        raise
    metrics["run_id"] = logger.run_id
    if os.environ.get("KDBENCH_PRINT_METRICS", "1") == "1":
        print(
            "kdbench: "
            + ", ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
            )
        )
    return metrics

"""MLflow bookkeeping: one run per experiment, tagged, with params, metrics and artifacts."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TAG_KEYS = ("method", "knowledge", "scheme", "teacher", "student", "dataset", "seed")


def flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_tags(cfg: DictConfig, student_role: str = "student") -> dict[str, str]:
    student = cfg[student_role]
    return {
        "method": str(cfg.method.name),
        "knowledge": str(cfg.method.knowledge),
        "scheme": str(cfg.scheme.name),
        "teacher": str(cfg.teacher.arch),
        "student": str(student.arch),
        "dataset": str(cfg.dataset.name),
        "seed": str(cfg.seed),
        "student_config": str(student.get("name", student.arch)),
        "teacher_config": str(cfg.teacher.get("name", cfg.teacher.arch)),
    }


def make_logger(cfg: DictConfig, student_role: str = "student", tags: dict | None = None):
    """Lightning's MLFlowLogger on ``mlflow.tracking_uri`` (default ``sqlite:///mlflow.db``)."""
    from lightning.pytorch.loggers import MLFlowLogger

    # an empty MLFLOW_TRACKING_URI would select MLflow's retired ./mlruns file store
    uri = str(cfg.mlflow.tracking_uri or "").strip() or DEFAULT_TRACKING_URI
    return MLFlowLogger(
        experiment_name=str(cfg.mlflow.experiment),
        run_name=None if cfg.mlflow.get("run_name") is None else str(cfg.mlflow.run_name),
        tracking_uri=uri,
        tags={**run_tags(cfg, student_role), **(tags or {})},
        log_model=False,
    )


def log_config(logger, cfg: DictConfig) -> None:
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    logger.log_hyperparams({k: ("null" if v is None else v) for k, v in params.items()})


def set_status(logger, status: str) -> None:
    """Mark the run FINISHED or FAILED (a failed run never counts as a result)."""
    logger.experiment.set_terminated(logger.run_id, status)

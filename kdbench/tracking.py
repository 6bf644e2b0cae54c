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


def tracking_uri(cfg: DictConfig) -> str:
    # an empty MLFLOW_TRACKING_URI would select MLflow's retired ./mlruns file store
    return str(cfg.mlflow.tracking_uri or "").strip() or DEFAULT_TRACKING_URI


def make_logger(
    cfg: DictConfig, student_role: str = "student", tags: dict | None = None, run_id=None
):
    """Lightning's MLFlowLogger on ``mlflow.tracking_uri`` (default ``sqlite:///mlflow.db``);
    ``run_id`` reopens an existing run (resume)."""
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(
        experiment_name=str(cfg.mlflow.experiment),
        run_name=None if cfg.mlflow.get("run_name") is None else str(cfg.mlflow.run_name),
        tracking_uri=tracking_uri(cfg),
        tags={**run_tags(cfg, student_role), **(tags or {})},
        log_model=False,
        run_id=run_id,
    )
    if run_id is not None:
        logger.experiment.update_run(run_id, status="RUNNING")
    return logger


def config_hash(cfg: DictConfig) -> str:
    """What identifies "the same command" for resume: the resolved config without ``resume``."""
    import hashlib
    import json

    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    params.pop("resume", None)
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


CHECKPOINT_TAG = "kdbench_checkpoint"  # the run's last-epoch checkpoint (full training state)
HASH_TAG = "kdbench_config_hash"


def find_resume(cfg: DictConfig, digest: str) -> tuple[str | None, str | None]:
    """``(MLflow run id, checkpoint path)`` to continue for ``resume``: the latest unfinished run
    of the same config (resume=true) or the run that wrote the checkpoint given as a path."""
    import os

    from mlflow.tracking import MlflowClient

    from kdbench.errors import KdbenchError

    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(str(cfg.mlflow.experiment))
    if isinstance(cfg.resume, str):
        path = os.path.abspath(os.path.expanduser(cfg.resume))
        if not os.path.isfile(path):
            raise KdbenchError(
                f"resume={cfg.resume!r} does not exist: give the last.ckpt in a run's "
                "checkpoints/ directory, or resume=true to find it from MLflow"
            )
        runs = (
            client.search_runs([exp.experiment_id], f"tags.{CHECKPOINT_TAG} = '{path}'")
            if exp
            else []
        )
        return (runs[0].info.run_id if runs else None), path
    runs = []
    if exp is not None:
        runs = client.search_runs(
            [exp.experiment_id],
            f"tags.{HASH_TAG} = '{digest}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    if not runs:
        print("kdbench: resume=true: no unfinished run of this config; starting a new run")
        return None, None
    run = runs[0]
    ckpt = run.data.tags.get(CHECKPOINT_TAG)
    if ckpt and os.path.isfile(ckpt):
        print(f"kdbench: resuming MLflow run {run.info.run_id} from {ckpt}")
        return run.info.run_id, ckpt
    print(f"kdbench: resuming MLflow run {run.info.run_id} from the start (no checkpoint yet)")
    return run.info.run_id, None


def log_config(logger, cfg: DictConfig) -> None:
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    logger.log_hyperparams({k: ("null" if v is None else v) for k, v in params.items()})


def set_status(logger, status: str) -> None:
    """Mark the run FINISHED or FAILED (a failed run never counts as a result)."""
    logger.experiment.set_terminated(logger.run_id, status)

"""MLflow bookkeeping: one run per experiment, tagged, with params, metrics and artifacts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

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
    """``teacher``/``student``: the network (a registered arch, or a user model's ``_target_``);
    ``*_config``: the name it goes by (the leaderboard's rows, see kdbench.models.model_name)."""
    from kdbench.modelspec import model_id, model_name

    student = cfg[student_role]
    return {
        "method": str(cfg.method.name),
        "knowledge": str(cfg.method.knowledge),
        "scheme": str(cfg.scheme.name),
        "teacher": model_id(cfg.teacher),
        "student": model_id(student),
        "dataset": str(cfg.dataset.name),
        "seed": str(cfg.seed),
        "student_config": model_name(student),
        "teacher_config": model_name(cfg.teacher),
    }


def tracking_uri(cfg: DictConfig) -> str:
    # an empty MLFLOW_TRACKING_URI would select MLflow's retired ./mlruns file store
    return str(cfg.mlflow.tracking_uri or "").strip() or DEFAULT_TRACKING_URI


def run_name(cfg: DictConfig, student_role: str = "student", tags: dict | None = None) -> str:
    """What the run is, as MLflow's run name: ``kd cnn1d->mlp offline s0`` (``... trial 3`` for
    a tuning trial), so the runs table reads without opening each run."""
    t = run_tags(cfg, student_role)
    name = f"{t['method']} {t['teacher_config']}->{t['student_config']} {t['scheme']} s{t['seed']}"
    trial = (tags or {}).get("trial")
    return f"{name} trial {trial}" if trial is not None else name


def make_logger(
    cfg: DictConfig, student_role: str = "student", tags: dict | None = None, run_id=None
):
    """Lightning's MLFlowLogger on ``mlflow.tracking_uri`` (default ``sqlite:///mlflow.db``);
    ``run_id`` reopens an existing run (resume).

    Lightning's logger ends the MLflow run (FINISHED) whenever a fit or a test ends; kdbench ends
    it itself, once everything the run records is recorded, so this logger's ``finalize`` leaves
    the run's status alone: a run killed between its fit and its last artifact stays
    unfinished (and resumable), and a born-again run is not FINISHED between generations."""
    from kdbench.mlflow_logger import KdbenchMLFlowLogger

    name = cfg.mlflow.get("run_name")
    all_tags = {**run_tags(cfg, student_role), **(tags or {})}
    all_tags["pair"] = f"{all_tags['teacher_config']}->{all_tags['student_config']}"
    logger = KdbenchMLFlowLogger(
        experiment_name=str(cfg.mlflow.experiment),
        run_name=str(name) if name is not None else run_name(cfg, student_role, tags),
        tracking_uri=tracking_uri(cfg),
        tags=all_tags,
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
DONE_TAG = "kdbench_done"  # kdbench_done_<fit>: a finished fit of a multi-fit run (its weights)


def checkpoint_tag(name: str = "") -> str:
    """The tag holding the last.ckpt of the fit ``name`` ("" for a run's single fit)."""
    return CHECKPOINT_TAG + (f"_{name}" if name else "")


@dataclass
class Resume:
    """What ``resume`` continues: an MLflow run (its id, tags and metrics; None when a
    checkpoint path belongs to no run of this store) and, for ``resume=PATH``, that checkpoint."""

    run_id: str | None = None
    tags: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    path: str | None = None

    def checkpoint(self, name: str = "") -> str | None:
        """The checkpoint the fit ``name`` continues from (None: start it from scratch)."""
        import os

        if self.path is not None:  # the fit that wrote it (any fit when no run is known)
            if self.run_id is None or self.tags.get(checkpoint_tag(name)) == self.path:
                return self.path
            return None
        ckpt = self.tags.get(checkpoint_tag(name))
        return ckpt if ckpt and os.path.isfile(ckpt) else None

    def done(self, name: str) -> str | None:
        """The saved weights of the fit ``name`` if it finished before the run was stopped."""
        import os

        weights = self.tags.get(f"{DONE_TAG}_{name}")
        return weights if weights and os.path.isfile(weights) else None


def find_resume(cfg: DictConfig, digest: str, fit_names=("",)) -> Resume | None:
    """What ``resume`` continues: the latest unfinished run of the same config (resume=true), or
    the run that wrote the checkpoint given as a path (``fit_names``: the fits of a run, whose
    checkpoint tags are searched). None: nothing to continue, start a new run."""
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
        for name in fit_names if exp else ():
            runs = client.search_runs(
                [exp.experiment_id], f"tags.{checkpoint_tag(name)} = '{path}'", max_results=1
            )
            if runs:
                run = runs[0]
                if run.info.status == "FINISHED":
                    raise KdbenchError(
                        f"resume={cfg.resume!r} is the checkpoint of MLflow run "
                        f"{run.info.run_id}, which is FINISHED: nothing to resume (run without "
                        "resume to start a new run)"
                    )
                print(f"kdbench: resuming MLflow run {run.info.run_id} from {path}")
                return Resume(run.info.run_id, dict(run.data.tags), dict(run.data.metrics), path)
        if len(fit_names) > 1:
            raise KdbenchError(
                f"resume={cfg.resume!r} belongs to no unfinished run of this store: a run of "
                "several fits resumes with resume=true"
            )
        print(f"kdbench: starting a new MLflow run from the checkpoint {path}")
        return Resume(path=path)
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
        return None
    run = runs[0]
    resume = Resume(run.info.run_id, dict(run.data.tags), dict(run.data.metrics))
    ckpts = [resume.checkpoint(n) for n in fit_names if resume.checkpoint(n)]
    where = f"from {ckpts[-1]}" if ckpts else "from the start (no checkpoint yet)"
    print(f"kdbench: resuming MLflow run {run.info.run_id} ({run.info.status}) {where}")
    return resume


NOT_PARAMS = ("resume",)  # how a run was started, not what it is (a resumed run logs again)


def log_config(logger, cfg: DictConfig) -> None:
    """The resolved config as params, flattened; credentials in URLs masked."""
    from kdbench.errors import mask_credentials

    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    for key in NOT_PARAMS:
        params.pop(key, None)
    logger.log_hyperparams(
        {
            k: ("null" if v is None else mask_credentials(v) if isinstance(v, str) else v)
            for k, v in params.items()
        }
    )


def set_status(logger, status: str) -> None:
    """Mark the run FINISHED (everything recorded), FAILED (never counts as a result) or KILLED
    (stopped by a signal or pruned; resumable)."""
    logger.experiment.set_terminated(logger.run_id, status)


def release_interrupted(exc: BaseException) -> None:
    """Free what a signal interrupted. Raised as KeyboardInterrupt between any two bytecodes, it
    can stop a store's session halfway through its commit or its close: the SQLite connection
    then keeps its write lock, and every later write waits out the busy timeout (20 s) and
    fails. That session lives on in the locals of the frames the exception passed through
    (its traceback, and the tracebacks of the exceptions it is chained to), so those locals
    are cleared (the tracebacks still print) and the session collected, which rolls the
    connection back. Found by sending SIGINT during a loop of metric writes: the store stayed
    locked after 3 interrupts without this, never in 300 with it."""
    import gc
    import traceback

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    gc.collect()


def set_status_after_error(logger, uri: str, status: str) -> None:
    """:func:`set_status` on the error path, where it must not raise. After a signal the caller
    first calls :func:`release_interrupted`; should the store still refuse (an unfinished
    transaction not yet collected), fresh clients try again (four times, 3 s of waits in all,
    reading the status back) before giving up (a full or unreachable store: the run stays
    RUNNING and the original error is what is reported)."""
    try:
        set_status(logger, status)
        if logger.experiment.get_run(logger._run_id).info.status == status:
            return
    except Exception:  # noqa: BLE001 - retried below with a fresh connection
        pass
    import gc
    import time

    from mlflow.tracking import MlflowClient

    for attempt in range(4):
        if attempt:
            time.sleep(0.5 * attempt)
        gc.collect()  # an interrupted session still holding the store's write lock
        try:
            client = MlflowClient(tracking_uri=uri)
            client.set_terminated(logger._run_id, status)
            if client.get_run(logger._run_id).info.status == status:
                return
        except Exception:  # noqa: BLE001 - the cause of the run's end is reported, not this
            pass

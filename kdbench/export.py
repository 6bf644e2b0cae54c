"""``python -m kdbench.export RUN_ID [deploy=onnx|int8|prune] [deploy.KEY=VALUE ...]``: deploy
the student of an earlier, FINISHED run into that same MLflow run (``RUN_ID`` ``last``: the
latest FINISHED run of ``--experiment``, default ``kdbench``).

The run's ``config.yaml`` artifact rebuilds its data and networks; its ``student.pt`` (and
``student_best.pt``) fill the student (``weights_only=True``); the ``deploy`` form chosen here
(default ``deploy=onnx``) runs as it does at the end of ``python -m kdbench deploy=...``
(:mod:`kdbench.deploy`): its ``deploy/<form>/...`` metrics, artifacts and tag are added to the run.
Only ``deploy`` and ``efficiency`` overrides are taken: everything else is the run's own config.
``deploy=qat`` changes training and is refused here (run ``python -m kdbench deploy=qat``).

Everything is computed before anything is written: a bad run id, a run that is not FINISHED or
has no student, or a student that cannot be exported is one line (``kdbench: error: run <id>:
...``) and exit code 2, and the run is left as it was. The store is ``--tracking-uri``, else
``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (never created here).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from kdbench.errors import KdbenchError

TAKES = ("deploy", "efficiency")  # the config groups/keys an export may override


def _forms() -> list[str]:
    from kdbench.cli import config_dir

    return sorted(p.stem for p in (Path(config_dir()) / "deploy").glob("*.yaml"))


def compose_deploy(overrides: list[str]):
    """The config composed with ``overrides`` (deploy and efficiency keys only)."""
    from hydra import compose, initialize_config_dir

    from kdbench.cli import config_dir

    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        if "=" not in o or key.split(".")[0] not in TAKES:
            raise KdbenchError(
                f"{o!r}: python -m kdbench.export takes deploy=<form> and deploy.*/efficiency.* "
                "overrides only (the rest is the run's own config)"
            )
    if not any(o.split("=", 1)[0] == "deploy" for o in overrides):
        overrides = ["deploy=onnx", *overrides]
    try:
        with initialize_config_dir(config_dir(), version_base="1.3"):
            return compose("config", overrides=overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra's own override errors: one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "deploy/" in first:
            first = f"no such deploy form: give one of {', '.join(_forms())}"
        raise KdbenchError(f"{' '.join(overrides)}: {first}") from None


def _latest(client, uri: str, experiment: str) -> str:
    """The id of the latest FINISHED ``python -m kdbench`` run of ``experiment`` (``last``)."""
    from kdbench.errors import mask_credentials

    exp = client.get_experiment_by_name(experiment)
    found = []
    if exp is not None:
        found = client.search_runs(
            [exp.experiment_id],
            "attributes.status = 'FINISHED' and tags.method != ''",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    if not found:
        raise KdbenchError(
            f"run last: no FINISHED run of experiment {experiment!r} in {mask_credentials(uri)}"
        )
    return found[0].info.run_id


def _load_run(client, run_id: str, uri: str):
    from kdbench.errors import mask_credentials

    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow's "not found" / malformed id
        raise KdbenchError(
            f"run {run_id}: no such MLflow run in {mask_credentials(uri)} (give a run id from "
            "`mlflow ui` or the run's last line, and the store it was written to with "
            "--tracking-uri or MLFLOW_TRACKING_URI)"
        ) from None
    if run.info.status != "FINISHED":
        raise KdbenchError(
            f"run {run_id} is {run.info.status}: only a FINISHED run has a student to export"
        )
    return run


def export(args) -> dict[str, float]:
    from kdbench.deploy import check_deploy, form_class
    from kdbench.leaderboard import check_store

    run_id = args.run_id
    composed = compose_deploy(list(args.overrides))
    name = str(composed.deploy.name)
    if name == "none":
        raise KdbenchError("deploy=none: nothing to export; give deploy=onnx, int8 or prune")
    check_deploy(composed)  # the form's options and the deploy extra, before any work
    cls = form_class(composed.deploy)
    if cls.changes_training:
        raise KdbenchError(
            f"deploy={name} changes training: run it as part of a run (python -m kdbench "
            f"deploy={name} ...)"
        )
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    check_store(uri)  # a missing store is an error, never created
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if run_id == "last":
        run_id = _latest(client, uri, args.experiment)
    run = _load_run(client, run_id, uri)
    with tempfile.TemporaryDirectory(prefix="kdbench-export-") as tmp:
        tmp = Path(tmp)
        try:
            given = [o for o in args.overrides if o.lstrip("+~").startswith("efficiency.")]
            metrics, files, tags = _deploy(client, run, composed, cls, tmp, given)
        except KdbenchError as exc:
            raise KdbenchError(f"run {run_id}: {exc}") from None
        # everything computed: now written, files first (the metrics make it count)
        from mlflow.entities import Metric

        for path in files:
            client.log_artifact(run_id, str(path))
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    print(f"kdbench: deploy={name} of run {run_id}: {shown}")
    print(f"kdbench: logged {', '.join(p.name for p in files)} to run {run_id}")
    return metrics


def _deploy(client, run, composed, cls, tmp: Path, efficiency_overrides=()):
    """Rebuild the run's data and student from its artifacts and deploy it (nothing written to
    the run): (metrics, artifact files, tags)."""
    import torch
    from omegaconf import DictConfig, OmegaConf

    from kdbench.deploy import Job, run_form
    from kdbench.errors import checked_instantiate
    from kdbench.run import _quiet_lightning, build_model, scheme_class

    _quiet_lightning()
    run_id = run.info.run_id
    listed = {a.path for a in client.list_artifacts(run_id)}
    if "config.yaml" not in listed:
        raise KdbenchError("it has no config.yaml artifact: not a run of python -m kdbench")
    cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", str(tmp)))
    needed = ("seed", "dataset", "teacher", "student", "scheme", "optim", "trainer")
    if not isinstance(cfg, DictConfig) or any(key not in cfg for key in needed):
        raise KdbenchError("its config.yaml is not the config of a python -m kdbench run")
    scheme = scheme_class(cfg)
    fit = scheme.fit_names(cfg)[-1]
    prefix = f"{fit}_" if fit else ""
    if f"{prefix}student.pt" not in listed:
        raise KdbenchError(f"it has no {prefix}student.pt artifact: no trained student to export")
    last = client.download_artifacts(run_id, f"{prefix}student.pt", str(tmp))
    best = None
    if f"{prefix}student_best.pt" in listed:
        best = client.download_artifacts(run_id, f"{prefix}student_best.pt", str(tmp))
    cfg.deploy = composed.deploy
    # the run's own efficiency settings (the defaults for a run that has none), with only the
    # efficiency.* overrides given here on top
    given = OmegaConf.from_dotlist([o.lstrip("+") for o in efficiency_overrides])
    cfg.efficiency = OmegaConf.merge(
        cfg.get("efficiency") or composed.efficiency,
        given.efficiency if "efficiency" in given else {},
    )
    dm = checked_instantiate(cfg.dataset, _convert_="all")
    dm.prepare_data()
    dm.setup()
    student = build_model(cfg, scheme.student_role, dm)
    try:
        student.model.load_state_dict(torch.load(last, map_location="cpu", weights_only=True))
        best_state = torch.load(best, map_location="cpu", weights_only=True) if best else None
    except Exception as exc:  # noqa: BLE001 - a file that does not fit the config's network
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise KdbenchError(
            f"its {prefix}student.pt does not fit the student its config.yaml builds ({first})"
        ) from None
    teacher = build_model(cfg, "teacher", dm)
    # its checkpoint or cache entry, else none (an offline method=tfkd run trained no teacher)
    from kdbench.methods import build_method
    from kdbench.run import steps_per_call
    from kdbench.schemes.offline import Offline

    teacher_free = scheme is Offline and build_method(cfg.method).teacher_free
    trained = bool(scheme.needs_pretrained_teacher) and not teacher_free
    if cls.needs_teacher_weights and not trained:
        raise KdbenchError(
            f"deploy={cls.name} distils from the teacher, and a scheme={cfg.scheme.name} run "
            "keeps no teacher weights"
        )
    if trained:
        from kdbench.teacher import resolve_teacher

        resolve_teacher(cfg, dm, teacher, tmp)
    out = tmp / "artifacts"
    out.mkdir()
    job = Job(cfg, dm, student, teacher, out, best_state, teacher_trained=trained)
    dm.use_transfer = False  # as a run's data module is set up (kdbench.run.prepare)
    dm.steps_per_call = steps_per_call(cfg, dm)
    dm.shuffle_seed = cfg.seed
    metrics = run_form(cls(cfg), job)
    return metrics, sorted(out.iterdir()), job.tags


def main(argv: list[str] | None = None) -> None:
    from kdbench.errors import quiet_store_logs, run_or_exit

    p = argparse.ArgumentParser(
        prog="python -m kdbench.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_id",
        help="the MLflow run id of a FINISHED python -m kdbench run (its last line says run_id=), "
        "or last: the latest FINISHED run of --experiment",
    )
    p.add_argument(
        "overrides", nargs="*", help="deploy=onnx|int8|prune, deploy.KEY=VALUE, efficiency.KEY=V"
    )
    p.add_argument("--tracking-uri", help="MLflow store (default $MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", default="kdbench", help="where `last` looks (default kdbench)")
    args = p.parse_args(argv)
    quiet_store_logs()
    run_or_exit(export, args)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m kdbench.tune``: tune T, alpha and beta (and optionally gamma) with Optuna.

Takes the same overrides as ``python -m kdbench`` plus the ``tune`` group. The objective is the
best validation accuracy of the run (never test accuracy); a TPE sampler (seeded) proposes, a
median pruner stops poor trials on per-epoch validation accuracy. The study lives in
``tune.storage`` (``sqlite:///optuna.db`` by default; any SQLAlchemy URL), so running the command
again resumes it and running it twice at once gives two workers on one study. Every trial is an
MLflow run nested under one parent run per study, tagged with its trial number and state.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from kdbench.cli import config_dir, sweep_main
from kdbench.errors import (
    ConfigError,
    KdbenchError,
    mask_credentials,
    quiet_store_logs,
    run_or_exit,
)
from kdbench.validate import check_tune

PARAM_KEYS = {
    "temperature": "method.temperature",
    "alpha": "method.alpha",
    "beta": "method.beta",
    "gamma": "method.gamma",
}


def study_name(cfg: DictConfig) -> str:
    if cfg.tune.get("study_name"):
        return str(cfg.tune.study_name)
    from kdbench.modelspec import model_name

    t, s = model_name(cfg.teacher), model_name(cfg.student)
    return f"{cfg.dataset.name}-{t}-{s}-{cfg.scheme.name}-{cfg.method.name}"


def search_space(cfg: DictConfig) -> dict[str, dict]:
    """Name -> {low, high, log} of every tuned hyperparameter."""
    space = {}
    for name in ("temperature", "alpha", "gamma"):
        spec = cfg.tune.space.get(name)
        if spec is not None:
            space[name] = dict(spec)
    beta = cfg.tune.space.get("beta")
    if beta == "auto":
        rng = cfg.method.get("beta_range")
        if cfg.method.get("term") is not None and rng:
            space["beta"] = {"low": float(rng[0]), "high": float(rng[1]), "log": True}
    elif beta is not None:
        space["beta"] = dict(beta)
    for name, spec in space.items():
        low, high = spec.get("low"), spec.get("high")
        if not (isinstance(low, int | float) and isinstance(high, int | float) and low < high):
            raise ConfigError(f"tune.space.{name}", spec, "needs numbers low < high")
        if spec.get("log") and low <= 0:
            raise ConfigError(f"tune.space.{name}.low", low, "must be > 0 on a log scale")
    return space


class TrialSeededSampler:
    """Optuna's TPE sampler, seeded anew for each trial from (``tune.seed``, the trial's number).

    One sampler seeded once per worker makes workers started together on one study propose the
    same parameters (each draws the same random start-up trials: half the trials repeat the
    other worker's); trial numbers are unique in the study, so here every trial gets its own
    draw, and a study is as reproducible as one worker's trial order."""

    def __new__(cls, seed: int, n_startup_trials: int):
        import numpy as np
        import optuna

        class _Sampler(optuna.samplers.BaseSampler):
            def __init__(self) -> None:
                self._number, self._tpe = None, None

            def _for(self, trial):
                if trial.number != self._number:
                    state = np.random.SeedSequence([seed, trial.number]).generate_state(1)[0]
                    self._number = trial.number
                    self._tpe = optuna.samplers.TPESampler(
                        seed=int(state), n_startup_trials=n_startup_trials
                    )
                return self._tpe

            def infer_relative_search_space(self, study, trial):
                return self._for(trial).infer_relative_search_space(study, trial)

            def sample_relative(self, study, trial, search_space):
                return self._for(trial).sample_relative(study, trial, search_space)

            def sample_independent(self, study, trial, param_name, param_distribution):
                tpe = self._for(trial)
                return tpe.sample_independent(study, trial, param_name, param_distribution)

            def before_trial(self, study, trial) -> None:
                self._for(trial).before_trial(study, trial)

            def after_trial(self, study, trial, state, values) -> None:
                self._for(trial).after_trial(study, trial, state, values)

        return _Sampler()


class PruningCallback:
    """Reports each validation epoch's accuracy to the trial; stops the run if it should prune.

    At ``on_validation_end``: Lightning runs a callback's ``on_validation_epoch_end`` before the
    module's, whose ``val/acc`` reaches ``callback_metrics`` only after both (there, every
    report was the previous epoch's accuracy, and the first epoch's was never reported)."""

    def __new__(cls, trial):
        import lightning as L

        class _Callback(L.Callback):
            def __init__(self):
                self.step = 0

            def on_validation_end(self, trainer, module):
                import optuna

                value = trainer.callback_metrics.get("val/acc")
                if value is None or trainer.sanity_checking:
                    return
                trial.report(float(value), self.step)
                self.step += 1
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at validation epoch {self.step}")

        return _Callback()


def _parent_run(client, exp_id: str, name: str) -> str:
    """The study's parent MLflow run: found again (and reopened: RUNNING) by a later worker or
    run of the command, created the first time (once, when workers start together)."""
    from kdbench.stores import store_lock

    def parents():
        return client.search_runs(
            [exp_id],
            filter_string=f"tags.`kdbench.study` = '{name}' and tags.`kdbench.role` = 'study'",
            order_by=["attributes.start_time ASC"],
        )

    with store_lock(client.tracking_uri):  # SQLite: one worker checks and creates at a time
        found = parents()
        if not found:
            run = client.create_run(
                exp_id,
                run_name=f"study {name}",
                tags={"kdbench.study": name, "kdbench.role": "study"},
            )
            found = parents()  # another database: the oldest of those created at once wins
            for r in found[1:]:
                if r.info.run_id == run.info.run_id:
                    client.delete_run(run.info.run_id)
    if found[0].info.status != "RUNNING":
        client.update_run(found[0].info.run_id, status="RUNNING")
    return found[0].info.run_id


def _stale_trial_runs(client, exp_id: str):
    """``on_stale(study, trial)`` for the storage: the MLflow run of a trial whose worker was
    killed (Optuna marks the trial FAIL) becomes KILLED, tagged ``trial_state=FAIL``."""

    def on_stale(study, trial) -> None:
        runs = client.search_runs(
            [exp_id],
            filter_string=(
                f"tags.`kdbench.study` = '{study.study_name}' and tags.trial = '{trial.number}'"
            ),
        )
        for r in runs:
            client.set_tag(r.info.run_id, "trial_state", "FAIL")
            if r.info.status == "RUNNING":
                client.set_terminated(r.info.run_id, "KILLED")
        print(
            f"kdbench.tune: trial {trial.number} of study {study.study_name} was left running "
            "by a worker that stopped: marked FAIL (its MLflow run KILLED)"
        )

    return on_stale


def _end_parent(client, parent: str, study, status: str) -> None:
    """End the study's parent run with ``status``, unless another worker still runs a trial
    (the last worker to stop ends it)."""
    import optuna

    from kdbench.stores import fail_stale_trials

    fail_stale_trials(study)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if not running:
        client.set_terminated(parent, status)


def tune(cfg: DictConfig) -> dict:
    """Run ``tune.n_trials`` more trials of the study; return a summary of its best trial.

    The study's parent MLflow run ends FINISHED when this worker ends normally and the study's
    other workers have stopped, FAILED when it fails, KILLED when SIGINT or SIGTERM stops it
    (the process then exits with 128 + the signal's number); a later worker reopens it."""
    import signal

    from kdbench.errors import Interrupted
    from kdbench.run import StopOnSignal

    held: dict = {}
    stop = StopOnSignal()  # between trials too: Optuna fails the trial it is in and stops
    try:
        summary = _tune(cfg, held)
    except BaseException as exc:
        stopped = isinstance(exc, KeyboardInterrupt | Interrupted)
        if stopped:
            from kdbench.tracking import release_interrupted

            release_interrupted(exc)
        if "parent" in held:
            with contextlib.suppress(Exception):  # the error that ended the worker comes first
                _end_parent(**held, status="KILLED" if stopped else "FAILED")
        if stopped:
            if isinstance(exc, Interrupted):
                signum = exc.exit_code - 128
            else:
                signum = stop.received or signal.SIGINT
            raise Interrupted(
                signum, "its trial is FAIL; run the same command again to go on with the study"
            ) from None
        raise
    finally:
        stop.restore()
    _end_parent(**held, status="FINISHED")
    return summary


def _tune(cfg: DictConfig, held: dict) -> dict:
    """The work of :func:`tune`; ``held`` receives the MLflow client, parent run and study."""
    import optuna
    from mlflow.tracking import MlflowClient

    from kdbench.errors import Interrupted
    from kdbench.run import _output_dir, prepare, run
    from kdbench.stores import fail_stale_trials, optuna_storage, prepare_mlflow
    from kdbench.tracking import tracking_uri

    check_tune(cfg)  # before the study and its MLflow parent run exist
    space = search_space(cfg)
    prepare(cfg)  # the base configuration is valid before any trial starts
    name = study_name(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = TrialSeededSampler(int(cfg.tune.seed), int(cfg.tune.n_startup_trials))
    if cfg.tune.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=int(cfg.tune.n_startup_trials))
    elif cfg.tune.pruner in (None, "none"):
        pruner = optuna.pruners.NopPruner()
    else:
        raise ConfigError("tune.pruner", cfg.tune.pruner, "must be median or none")
    uri = tracking_uri(cfg)
    heartbeat = int(cfg.tune.get("heartbeat_s", 30))  # checked by check_tune
    exp_id = prepare_mlflow(uri, str(cfg.mlflow.experiment))
    client = MlflowClient(tracking_uri=uri)
    try:
        study = optuna.create_study(
            storage=optuna_storage(
                str(cfg.tune.storage),
                heartbeat_s=heartbeat,
                on_stale=_stale_trial_runs(client, exp_id),
            ),
            study_name=name,
            direction=str(cfg.tune.direction),
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except Exception as exc:  # noqa: BLE001 - bad URL, driver missing, unreachable database
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise KdbenchError(  # never the password: the URL and the driver's message are masked
            f"cannot open tune.storage={mask_credentials(str(cfg.tune.storage))!r}: "
            f"{mask_credentials(first)}"
        ) from None
    fail_stale_trials(study)  # trials of killed workers: FAIL, their MLflow runs KILLED
    parent = _parent_run(client, exp_id, name)
    held.update(client=client, parent=parent, study=study)
    root = _output_dir()
    stopped: list[BaseException] = []

    def objective(trial) -> float:
        trial_cfg = copy.deepcopy(cfg)
        for key, spec in space.items():
            value = trial.suggest_float(key, spec["low"], spec["high"], log=bool(spec.get("log")))
            OmegaConf.update(trial_cfg, PARAM_KEYS[key], value)
        tags = {"mlflow.parentRunId": parent, "kdbench.study": name, "trial": str(trial.number)}
        try:
            metrics = run(
                trial_cfg,
                callbacks=[PruningCallback(trial)],
                tags=tags,
                root=root / f"trial_{trial.number}",
            )
        except BaseException as exc:
            run_id = getattr(exc, "kdbench_run_id", None)
            state = "PRUNED" if isinstance(exc, optuna.TrialPruned) else "FAIL"
            if run_id:
                client.set_tag(run_id, "trial_state", state)
            if isinstance(exc, Interrupted):  # a signal stopped the trial: stop the study too
                stopped.append(exc)
                trial.study.stop()
            raise
        client.set_tag(metrics["run_id"], "trial_state", "COMPLETE")
        for key in ("test/acc", "test/acc_best", "run_id"):
            trial.set_user_attr(key, metrics[key])
        return metrics["val/acc_best"]

    study.optimize(objective, n_trials=int(cfg.tune.n_trials), catch=(Exception,))
    if stopped:
        raise stopped[0]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise KdbenchError(f"study {name!r} has no completed trial: see the FAILED runs in MLflow")
    best = study.best_trial
    overrides = " ".join(f"{PARAM_KEYS[k]}={v:.6g}" for k, v in sorted(best.params.items()))
    out_dir = Path(str(cfg.tune.output_dir)) / "tuned"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    body = "\n".join(
        f"  {k}: {v:.6g}"
        for k, v in sorted({PARAM_KEYS[k].split(".")[1]: v for k, v in best.params.items()}.items())
    )
    path.write_text(
        f"# @package _global_\n# best trial {best.number} of study {name}: "
        f"val/acc_best={best.value:.4f}\nmethod:\n{body}\n"
    )
    client.set_tag(parent, "best_trial", str(best.number))
    client.log_metric(parent, "best/val_acc", best.value)
    counts = {s.name: sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
    return {
        "study": name,
        "best_trial": best.number,
        "params": best.params,
        "val_acc": best.value,
        "test_acc": best.user_attrs.get("test/acc"),
        "overrides": overrides,
        "config_file": str(path),
        "config_dir": str(out_dir.parent),
        "trials": {k: v for k, v in counts.items() if v},
    }


@hydra.main(config_path=config_dir(), config_name="tuning", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from kdbench.validate import check_config

    run_or_exit(check_config, cfg)  # config-only checks first: before torch, the study, MLflow
    run_or_exit(check_tune, cfg)
    quiet_store_logs()
    summary = run_or_exit(tune, cfg)
    print(f"kdbench.tune: study {summary['study']}: trials {summary['trials']}")
    print(
        f"kdbench.tune: best trial {summary['best_trial']}: val/acc_best={summary['val_acc']:.4f} "
        f"test/acc={summary['test_acc']:.4f}"
    )
    print(f"kdbench.tune: best overrides: {summary['overrides']}")
    print(
        f"kdbench.tune: as a config: python -m kdbench --config-dir {summary['config_dir']} "
        f"+tuned={summary['study']} <your other overrides>"
    )


def main() -> None:
    sweep_main(_main)  # a multirun's refused job fails alone; the failed jobs are listed


if __name__ == "__main__":
    main()

"""``python -m kdbench.tune``: tune T, alpha and beta (and optionally gamma) with Optuna.

Takes the same overrides as ``python -m kdbench`` plus the ``tune`` group. The objective is the
best validation accuracy of the run (never test accuracy); a TPE sampler (seeded) proposes, a
median pruner stops poor trials on per-epoch validation accuracy. The study lives in
``tune.storage`` (``sqlite:///optuna.db`` by default; any SQLAlchemy URL), so running the command
again resumes it and running it twice at once gives two workers on one study. Every trial is an
MLflow run nested under one parent run per study, tagged with its trial number and state.
"""

from __future__ import annotations

import copy
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from kdbench.cli import config_dir
from kdbench.errors import ConfigError, KdbenchError, run_or_exit

PARAM_KEYS = {
    "temperature": "method.temperature",
    "alpha": "method.alpha",
    "beta": "method.beta",
    "gamma": "method.gamma",
}


def study_name(cfg: DictConfig) -> str:
    if cfg.tune.get("study_name"):
        return str(cfg.tune.study_name)
    t = cfg.teacher.get("name", cfg.teacher.arch)
    s = cfg.student.get("name", cfg.student.arch)
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


class PruningCallback:
    """Reports each validation epoch's accuracy to the trial; stops the run if it should prune."""

    def __new__(cls, trial):
        import lightning as L

        class _Callback(L.Callback):
            def __init__(self):
                self.step = 0

            def on_validation_epoch_end(self, trainer, module):
                import optuna

                value = trainer.callback_metrics.get("val/acc")
                if value is None or trainer.sanity_checking:
                    return
                trial.report(float(value), self.step)
                self.step += 1
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at validation epoch {self.step}")

        return _Callback()


def _parent_run(client, experiment: str, name: str) -> str:
    """The study's parent MLflow run: found again on resume, created the first time."""
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`kdbench.study` = '{name}' and tags.`kdbench.role` = 'study'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id, run_name=f"study {name}", tags={"kdbench.study": name, "kdbench.role": "study"}
    )
    return run.info.run_id


def tune(cfg: DictConfig) -> dict:
    """Run ``tune.n_trials`` more trials of the study; return a summary of its best trial."""
    import optuna
    from mlflow.tracking import MlflowClient

    from kdbench.run import _output_dir, prepare, run
    from kdbench.tracking import DEFAULT_TRACKING_URI

    space = search_space(cfg)
    prepare(cfg)  # the base configuration is valid before any trial starts
    name = study_name(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(
        seed=int(cfg.tune.seed), n_startup_trials=int(cfg.tune.n_startup_trials)
    )
    if cfg.tune.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=int(cfg.tune.n_startup_trials))
    elif cfg.tune.pruner in (None, "none"):
        pruner = optuna.pruners.NopPruner()
    else:
        raise ConfigError("tune.pruner", cfg.tune.pruner, "must be median or none")
    try:
        study = optuna.create_study(
            storage=str(cfg.tune.storage),
            study_name=name,
            direction=str(cfg.tune.direction),
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    except Exception as exc:  # noqa: BLE001 - bad URL, driver missing, unreachable database
        raise KdbenchError(f"cannot open tune.storage={cfg.tune.storage!r}: {exc}") from None
    uri = str(cfg.mlflow.tracking_uri or "").strip() or DEFAULT_TRACKING_URI
    client = MlflowClient(tracking_uri=uri)
    parent = _parent_run(client, str(cfg.mlflow.experiment), name)
    root = _output_dir()

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
            raise
        client.set_tag(metrics["run_id"], "trial_state", "COMPLETE")
        for key in ("test/acc", "test/acc_best", "run_id"):
            trial.set_user_attr(key, metrics[key])
        return metrics["val/acc_best"]

    study.optimize(objective, n_trials=int(cfg.tune.n_trials), catch=(Exception,))
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
    _main()


if __name__ == "__main__":
    main()

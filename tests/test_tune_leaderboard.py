"""Optuna tuning (nested MLflow runs, FAIL, resume) and the leaderboard's exact aggregates."""

from __future__ import annotations

import math

import optuna
import pytest
from conftest import compose, mlflow_runs

import kdbench.tune as tune_mod
from kdbench import leaderboard


def _tune_cfg(tmp_path, *extra):
    return compose(
        "tune.n_trials=3",
        f"tune.storage=sqlite:///{tmp_path / 'optuna.db'}",
        "tune.study_name=s1",
        "tune.n_startup_trials=1",
        f"tune.output_dir={tmp_path}",
        "method=rkd",
        "mlflow.experiment=tune",
        "efficiency.enabled=false",
        *extra,
        config_name="tuning",
    )


def test_tuning_trials_nested_runs_failures_and_resume(tmp_path, monkeypatch):
    calls = {"n": 0}
    import kdbench.run

    real_run = kdbench.run.run

    def flaky_run(cfg, **kw):  # the second trial raises: FAIL, and the study goes on
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_run(cfg, **kw)

    monkeypatch.setattr("kdbench.run.run", flaky_run)
    summary = tune_mod.tune(_tune_cfg(tmp_path))
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert len(states) == 3 and states.count("FAIL") == 1
    assert all(s in ("COMPLETE", "PRUNED", "FAIL") for s in states)
    for t in study.trials:
        if t.state.name != "FAIL":
            assert set(t.params) == {"temperature", "alpha", "beta"}
            assert 1 <= t.params["temperature"] <= 20 and 0 <= t.params["alpha"] <= 1
            assert 0.01 <= t.params["beta"] <= 100  # rkd's beta_range
    client, runs = mlflow_runs("tune")
    parents = [r for r in runs if r.data.tags.get("kdbench.role") == "study"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(trials) == 2  # the failing trial failed before its run began
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    assert {r.data.tags["trial_state"] for r in trials} <= {"COMPLETE", "PRUNED"}
    assert sorted(r.data.tags["trial"] for r in trials) == ["0", "2"]
    best = tmp_path / "tuned" / "s1.yaml"
    assert best.exists() and "# @package _global_" in best.read_text()
    assert summary["overrides"].startswith("method.alpha=")
    # a second invocation resumes the same study and the same parent run
    monkeypatch.setattr("kdbench.run.run", real_run)
    tune_mod.tune(_tune_cfg(tmp_path, "tune.n_trials=1"))
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 4
    _, runs = mlflow_runs("tune")
    assert len([r for r in runs if r.data.tags.get("kdbench.role") == "study"]) == 1


def test_tuning_space_checks():
    cfg = compose("tune.space.temperature.low=0", config_name="tuning")
    with pytest.raises(Exception, match=r"tune.space.temperature.low=0 is invalid"):
        tune_mod.search_space(cfg)
    space = tune_mod.search_space(compose("method=kd", config_name="tuning"))
    assert set(space) == {"temperature", "alpha"}  # kd has no method term: no beta


def _log_run(client, exp_id, method, seed, acc, status="FINISHED", pair=("t", "s"), **extra):
    r = client.create_run(
        exp_id,
        tags={
            "method": method,
            "seed": str(seed),
            "dataset": "d",
            "teacher": pair[0],
            "student": pair[1],
            "scheme": "offline",
            "knowledge": "x",
        },
    )
    metrics = {
        "test/acc": acc,
        "test/acc_best": acc + 0.01,
        "teacher/test/acc": 0.9,
        "test/agreement": 0.5,
        "test/ece": 0.1,
        "student/params": 100.0,
        "teacher/params": 1000.0,
        "speedup": 4.0,
        "student/latency_ms": 1.0,
        **extra,
    }
    for k, v in metrics.items():
        client.log_metric(r.info.run_id, k, v)
    client.set_terminated(r.info.run_id, status)


def test_leaderboard_exact_aggregates(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'lb.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("lb")
    _log_run(client, exp, "none", 0, 0.50)
    _log_run(client, exp, "none", 1, 0.60)
    _log_run(client, exp, "kd", 0, 0.70)
    _log_run(client, exp, "kd", 1, 0.80)
    _log_run(client, exp, "kd", 2, 0.10, status="FAILED")  # never counts
    _log_run(client, exp, "kd", 3, 0.10, status="KILLED")  # never counts
    table = leaderboard.summarize(leaderboard.load_runs(uri, "lb"))
    kd = table[table.method == "kd"].iloc[0]
    none = table[table.method == "none"].iloc[0]
    assert kd.n == 2 and none.n == 2
    assert kd.acc_mean == pytest.approx(0.75) and none.acc_mean == pytest.approx(0.55)
    assert kd.acc_std == pytest.approx(math.sqrt(((0.05) ** 2 * 2) / 1))  # sample std
    assert kd.acc_best_mean == pytest.approx(0.76)
    assert kd.gain_over_none == pytest.approx(0.20)
    assert kd.retained == pytest.approx(0.75 / 0.9)
    assert kd.gap_closed == pytest.approx((0.75 - 0.55) / (0.9 - 0.55))
    assert kd.compression == pytest.approx(10.0) and kd.speedup == pytest.approx(4.0)
    assert list(table.method) == ["kd", "none"]  # best first
    files = leaderboard.write(table, tmp_path / "out")
    assert [f.name for f in files] == [
        "leaderboard.md",
        "leaderboard.csv",
        "leaderboard_pareto.png",
    ]
    md = files[0].read_text()
    assert "| d | t -> s | offline | kd |  | 75.00 ± 7.07 | 76.00 ± 7.07 | 2 | +20.00 |" in md
    assert files[2].stat().st_size > 1000
    # filters
    assert leaderboard.load_runs(uri, "lb", method="kd")["method"].unique().tolist() == ["kd"]

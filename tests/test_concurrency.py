"""Several processes on one cold store and one cold cache, killed workers, broken caches: the way
users run things (a joblib sweep, two tuning workers started together, kill -9, a full or
read-only cache), each through the CLI in a fresh directory."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, mlflow_runs, run_cli

FAST = ["teacher.epochs=1", "trainer.max_epochs=1", "efficiency.enabled=false"]


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_joblib_sweep_on_cold_store_and_cache_then_broken_caches(tmp_path):
    """(1) The first joblib sweep in a new directory: both jobs FINISH, the teacher is trained
    once (the other job waits for it), every cache file is whole and readable by all (0644).
    (2) Then a corrupt data-cache entry, an unwritable teacher cache and a killed writer's
    temp file: the next run regenerates, notices, cleans, and FINISHES."""
    cache, uri = tmp_path / "cache", f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"KDBENCH_CACHE_DIR": str(cache), "MLFLOW_TRACKING_URI": uri}
    proc = run_cli(
        "-m",
        "seed=0,1",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *FAST,
        cwd=tmp_path,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "already exists" not in out and "database is locked" not in out
    _, runs = mlflow_runs("kdbench", uri=uri)
    assert sorted((r.data.tags["seed"], r.info.status) for r in runs) == [
        ("0", "FINISHED"),
        ("1", "FINISHED"),
    ]
    assert out.count("kdbench: training teacher") == 1, out[-3000:]
    assert {r.data.tags["teacher_source"] for r in runs} == {"trained", "cache"}
    teachers = sorted((cache / "teachers").glob("*.pt"))
    assert len(teachers) == 1
    data = sorted((cache / "data").glob("*.npz"))
    assert data and list(cache.rglob("*.tmp")) == []
    umask = os.umask(0o022)
    os.umask(umask)
    modes = _modes(cache)
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert "state_dict" in torch.load(teachers[0], weights_only=True)
    for path in data:
        with np.load(path) as f:
            assert all(f[k].size for k in f.files)

    # (2) broken caches: a truncated data entry, a killed writer's temp file, and a teacher
    # cache that cannot be created (its parent is a regular file)
    entry = data[0]
    entry.write_bytes(entry.read_bytes()[:100])
    stale = cache / "data" / ".x.99999999.tmp"
    stale.write_bytes(b"\0" * 1000)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file")
    proc = run_cli(
        *FAST,
        "seed=2",
        f"cache_dir={blocker}/cache",
        f"dataset.data_dir={cache}/data",
        cwd=tmp_path,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"the data cache entry {entry} is unreadable" in out
    assert f"could not save the trained teacher to {blocker}/cache/teachers" in out
    assert "could not save the teacher outputs" in out
    assert not stale.exists()
    with np.load(entry) as f:  # regenerated and replaced whole
        assert f.files and all(f[k].size for k in f.files)
    _, runs = mlflow_runs("kdbench", uri=uri)
    assert {r.data.tags["seed"]: r.info.status for r in runs}["2"] == "FINISHED"


def _tune_cmd(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdbench.tune",
        *TINY,
        *FAST,
        f"tune.storage=sqlite:///{tmp_path / 'optuna.db'}",
        "tune.study_name=s",
        "tune.n_startup_trials=1",
        f"tune.output_dir={tmp_path}",
        "mlflow.experiment=tune",
        *extra,
    ]


@pytest.fixture(scope="module")
def tune_cache(tmp_path_factory) -> Path:
    """Cold for the first tuning test; the second reuses its teacher (a few seconds less)."""
    return tmp_path_factory.mktemp("tune_cache")


@pytest.fixture
def tune_env(tmp_path, tune_cache):
    return {
        **os.environ,
        "KDBENCH_CACHE_DIR": str(tune_cache),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }


def _study(tmp_path: Path):
    import optuna

    return optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def _parent_and_trials(tmp_path: Path):
    _, runs = mlflow_runs("tune", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents = [r for r in runs if r.data.tags.get("kdbench.role") == "study"]
    trials = {int(r.data.tags["trial"]): r for r in runs if "trial" in r.data.tags}
    return parents, trials


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_two_tuning_workers_started_together_on_fresh_stores(tmp_path, tune_env):
    procs = [
        subprocess.Popen(
            _tune_cmd(tmp_path, "tune.n_trials=2"),
            cwd=tmp_path,
            env=tune_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert "database is locked" not in out and "already exists" not in out, out[-3000:]
    states = sorted(t.state.name for t in _study(tmp_path).trials)
    assert len(states) == 4 and set(states) <= {"COMPLETE", "PRUNED"}, states
    parents, trials = _parent_and_trials(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert sorted(trials) == [0, 1, 2, 3]
    assert {r.info.status for r in trials.values()} <= {"FINISHED", "KILLED"}
    assert sum("training teacher" in out for out in outs) == 1


def _running_trial_run(db: Path) -> bool:
    """Whether the MLflow store holds a RUNNING trial run (read with sqlite3: no MLflow import)."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(db, timeout=1) as con:
            rows = con.execute(
                "select r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                "where t.key = 'trial'"
            ).fetchall()
    except sqlite3.Error:  # tables not there yet
        return False
    return ("RUNNING",) in rows


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_killed_tuning_worker_trial_fails_and_parent_finishes_on_rerun(tmp_path, tune_env):
    worker = subprocess.Popen(
        _tune_cmd(tmp_path, "tune.n_trials=1", "tune.heartbeat_s=1", "trainer.max_epochs=200"),
        cwd=tmp_path,
        env=tune_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not _running_trial_run(tmp_path / "mlflow.db"):
            assert worker.poll() is None, "the worker ended before its trial started"
            assert time.monotonic() < deadline
            time.sleep(0.5)
        time.sleep(1.5)  # its heartbeat is recorded
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    parents, trials = _parent_and_trials(tmp_path)
    assert [p.info.status for p in parents] == ["RUNNING"] and trials[0].info.status == "RUNNING"
    assert [t.state.name for t in _study(tmp_path).trials] == ["RUNNING"]

    time.sleep(2)  # past the grace period (2 x heartbeat_s)
    proc = subprocess.run(
        _tune_cmd(tmp_path, "tune.n_trials=1", "tune.heartbeat_s=1"),
        cwd=tmp_path,
        env=tune_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "trial 0 of study s was left running" in proc.stdout
    assert [t.state.name for t in _study(tmp_path).trials] == ["FAIL", "COMPLETE"]
    parents, trials = _parent_and_trials(tmp_path)
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert trials[0].info.status == "KILLED" and trials[0].data.tags["trial_state"] == "FAIL"
    assert trials[1].info.status == "FINISHED"
    assert trials[1].data.tags["trial_state"] == "COMPLETE"

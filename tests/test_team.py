"""Team scale against the real components (README, "Running as a team / on a cluster"): a
throwaway PostgreSQL server (tests/team_fixtures.py) holding an Optuna study shared by two
``python -m kdbench.tune`` workers and the store of an ``mlflow server`` that receives the runs of
a sweep through hydra-submitit-launcher's local executor; the SLURM launcher preset; one run
spanning two processes started outside Lightning (torchrun, and SLURM's variables); and the
default SQLite stores under several processes at once.

A missing component (PostgreSQL, psycopg, the submitit launcher) skips its test with the install
command, and fails it where ``CI`` is set (``.ci/run`` installs them)."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import team_fixtures
import torch
from conftest import TINY, compose, mlflow_runs
from team_fixtures import free_port, require, require_module, start_mlflow_server, stop_group

postgres = team_fixtures.postgres  # the session's PostgreSQL server (a fixture)
EPOCHS = 2  # TINY's trainer.max_epochs
QUICK = ["efficiency.enabled=false"]
ERRORS = ("database is locked", "already exists", "duplicate key", "Traceback")


def _env(**extra) -> dict:
    """The session's environment, one thread per process (several share 2 cores here), and
    ``extra`` (None: unset)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    return {k: v for k, v in env.items() if v is not None}


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _finish(procs: dict[str, subprocess.Popen], logs: dict[str, Path], timeout: float) -> dict:
    """Wait for every process (killing all of them past ``timeout``); return name -> output.
    Every process must have ended with 0 and printed none of ``ERRORS``."""
    deadline = time.monotonic() + timeout
    late = []
    for name, p in procs.items():
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            late.append(name)
    for name in late:
        procs[name].kill()
        procs[name].wait()
    outs = {name: logs[name].read_text(errors="replace") for name in procs}
    assert not late, f"still running after {timeout} s: {late}\n" + "\n".join(
        f"== {n}\n{outs[n][-2000:]}" for n in late
    )
    for name, p in procs.items():
        assert p.returncode == 0, f"{name} exited {p.returncode}:\n{outs[name][-3000:]}"
        for error in ERRORS:
            assert error not in _ours(outs[name]), f"{name}: {error}\n{outs[name][-3000:]}"
    return outs


def _ours(output: str) -> str:
    """A process's output without torchrun's own agent log lines (``.../elastic/agent/server/
    api.py``): after both ranks finished, a node's agent may log a traceback of its exit
    barrier when the other node's agent, which hosts the rendezvous store, has already left
    (torch elastic's race; both exit 0). Everything kdbench and Lightning print stays."""
    return "\n".join(
        line for line in output.splitlines() if "elastic/agent/server/api.py" not in line
    )


def _tune_cmd(storage: str, study: str, n_trials: int, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdbench.tune",
        *TINY,
        *QUICK,
        f"tune.storage={storage}",
        f"tune.study_name={study}",
        f"tune.n_trials={n_trials}",
        "tune.n_startup_trials=1",
        f"tune.output_dir={out}",
        "mlflow.experiment=tune",
        *extra,
    ]


# -- PostgreSQL that cannot be reached: one line, at once ---------------------------------------


def test_a_database_that_cannot_be_reached_is_one_line(postgres, tmp_path):
    """No server on the port, and a database the (real) server does not have: each is one line
    naming the URL (no password) and the fix, exit 2, no run anywhere; MLflow's own open would
    retry for about two minutes and end in a traceback."""
    require_module("psycopg")
    missing = postgres.uri("no_such_database")
    nobody = f"postgresql+psycopg://kd:secret@127.0.0.1:{free_port()}/kd"
    for uri, why in ((nobody, "Connection refused"), (missing, "does not exist")):
        proc = subprocess.run(
            [sys.executable, "-m", "kdbench", *TINY, f"mlflow.tracking_uri={uri}"],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=100,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("kdbench: error: the database at postgresql+psycopg://"), last
        assert "cannot be reached" in last and "start its server or fix the URL" in last, last
        assert why in last and "Traceback" not in proc.stderr and "secret" not in proc.stderr
    assert not list(tmp_path.rglob("*.db"))  # no store was made anywhere else instead


# -- PostgreSQL: two tuning workers on one study --------------------------------------------


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_postgres_two_tune_workers(postgres, tmp_path):
    """Two ``python -m kdbench.tune`` workers started together on one study, the Optuna study
    and the MLflow store both in fresh PostgreSQL databases (no server: the workers open the
    schemas themselves, at once). Every trial is run once, by one worker; the pruner of each
    worker reads the trials of both; the best trial is the one the study reports, everywhere."""
    import optuna

    storage = postgres.create_database("optuna_team")
    tracking = postgres.create_database("mlflow_team")
    n_trials = 3  # per worker
    procs, logs = {}, {}
    for w in ("w0", "w1"):
        logs[w] = tmp_path / f"{w}.log"
        cmd = _tune_cmd(storage, "team", n_trials, tmp_path, f"hydra.run.dir={tmp_path / w}")
        procs[w] = _start(cmd, tmp_path, _env(MLFLOW_TRACKING_URI=tracking), logs[w])
    _finish(procs, logs, timeout=480)

    study = optuna.load_study(study_name="team", storage=storage)
    trials = study.trials
    # none lost, none run twice: 2 x 3 trials, numbered 0..5, each in one worker's directory
    assert sorted(t.number for t in trials) == list(range(2 * n_trials))
    ran = {w: sorted(int(p.name[6:]) for p in (tmp_path / w).glob("trial_*")) for w in procs}
    assert [len(v) for v in ran.values()] == [n_trials, n_trials], ran
    assert sorted(ran["w0"] + ran["w1"]) == list(range(2 * n_trials)), ran
    # the workers drew distinct parameters (one seed per trial, not one per worker)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)
    states = {t.number: t.state.name for t in trials}
    assert set(states.values()) <= {"COMPLETE", "PRUNED"}, states
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert complete
    for t in trials:  # the pruner's input: each epoch's val/acc, from either worker
        steps = sorted(t.intermediate_values)
        assert steps == list(range(len(steps))) and 1 <= len(steps) <= EPOCHS, (t.number, steps)
        if t.state.name == "COMPLETE":
            assert len(steps) == EPOCHS
            assert t.value == pytest.approx(max(t.intermediate_values.values()))
        else:  # pruned at its last step s: the median of the complete trials' accuracies at
            s = steps[-1]  # s was above this trial's best, so at least one of them was
            mine = max(t.intermediate_values.values())
            at_s = [c.intermediate_values[s] for c in complete]
            assert max(at_s) > mine, (t.number, mine, at_s)

    client, runs = mlflow_runs("tune", uri=tracking)
    parents = [r for r in runs if r.data.tags.get("kdbench.role") == "study"]
    assert [p.info.status for p in parents] == ["FINISHED"]  # one parent, created once
    by_trial = {}
    for r in runs:
        if "trial" in r.data.tags:
            by_trial.setdefault(int(r.data.tags["trial"]), []).append(r)
    assert sorted(by_trial) == list(range(2 * n_trials))
    assert all(len(v) == 1 for v in by_trial.values())  # one MLflow run per trial
    for number, (r,) in by_trial.items():
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["trial_state"] == states[number]
        assert r.info.status == ("FINISHED" if states[number] == "COMPLETE" else "KILLED")
    best = study.best_trial
    assert best.value == max(t.value for t in complete)
    assert parents[0].data.tags["best_trial"] == str(best.number)
    best_run = by_trial[best.number][0]
    assert best.user_attrs["run_id"] == best_run.info.run_id
    assert best_run.data.metrics["val/acc_best"] == pytest.approx(best.value)
    written = (tmp_path / "tuned" / "team.yaml").read_text()
    assert f"# best trial {best.number} of study team" in written
    n_pruned = sum(s == "PRUNED" for s in states.values())
    print(f"postgres: 2 workers x {n_trials} trials: {len(complete)} complete, {n_pruned} pruned")


# -- an MLflow tracking server over PostgreSQL, fed by a submitit sweep --------------------


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_mlflow_server_two_runs_of_a_submitit_local_sweep(postgres, tmp_path):
    """``mlflow server`` over a PostgreSQL store with proxied artifacts; a 2-job sweep through
    hydra-submitit-launcher's local executor (two kdbench processes at once) records both runs
    there, FINISHED with their metrics and artifacts; the leaderboard reads them back through
    the server."""
    require_module("hydra_plugins.hydra_submitit_launcher")
    require_module("submitit")
    backend = postgres.create_database("mlflow_server")
    artifacts = tmp_path / "artifacts"
    url, server = start_mlflow_server(backend, artifacts, tmp_path / "server.log")
    try:
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        with urllib.request.urlopen(api, timeout=30) as r:
            assert r.status == 200
        other = urllib.request.Request(api, headers={"Host": "mlflow.example.org"})
        with pytest.raises(urllib.error.HTTPError, match="403"):  # --allowed-hosts holds
            urllib.request.urlopen(other, timeout=30)
        work = tmp_path / "work"
        work.mkdir()
        env = _env(MLFLOW_TRACKING_URI=url)
        cmd = [sys.executable, "-m", "kdbench", "-m", "hydra/launcher=submitit_local"]
        cmd += [*TINY, *QUICK, "seed=0,1", "mlflow.experiment=team"]
        log = tmp_path / "sweep.log"
        _finish({"sweep": _start(cmd, work, env, log)}, {"sweep": log}, timeout=480)
        jobs = [p for p in work.glob("multirun/*/*/.submitit/*") if p.name.isdigit()]
        assert len(jobs) == 2, jobs  # two submitit jobs (local ones: numbered by their pid)

        client, runs = mlflow_runs("team", uri=url)
        assert sorted((r.data.tags["seed"], r.info.status) for r in runs) == [
            ("0", "FINISHED"),
            ("1", "FINISHED"),
        ]
        # at once, not one after the other: both jobs were submitted (submitit's pickle of each)
        # before either finished (its result pickle); robust to a loaded machine, where two
        # seconds-long runs started together may still not overlap inside MLflow
        submitted = [p.stat().st_mtime for j in jobs for p in j.glob("*_submitted.pkl")]
        finished = [p.stat().st_mtime for j in jobs for p in j.glob("*_result.pkl")]
        assert len(submitted) == len(finished) == 2, (submitted, finished)
        assert max(submitted) <= min(finished)
        for r in runs:
            for key in ("test/acc", "test/acc_best", "val/acc_best", "student/params"):
                assert key in r.data.metrics, key
            assert len(client.get_metric_history(r.info.run_id, "val/acc")) == EPOCHS
            assert r.info.artifact_uri.startswith("mlflow-artifacts:")  # through the server
            names = {f.path for f in client.list_artifacts(r.info.run_id)}
            assert {"config.yaml", "student.pt", "student_best.pt"} <= names
            local = client.download_artifacts(r.info.run_id, "student.pt", str(tmp_path))
            state = torch.load(local, weights_only=True)
            assert state and all(torch.isfinite(v).all() for v in state.values())
            on_server = list(artifacts.rglob(f"{r.info.run_id}/artifacts/student.pt"))
            assert len(on_server) == 1  # stored by the server, in --artifacts-destination
            assert on_server[0].read_bytes() == Path(local).read_bytes()

        out = tmp_path / "board"
        board = subprocess.run(
            [sys.executable, "-m", "kdbench.leaderboard", "--tracking-uri", url]
            + ["--experiment", "team", "--out-dir", str(out), "--markdown"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert board.returncode == 0, board.stderr[-3000:]
        with open(out / "leaderboard.csv") as f:
            (row,) = list(csv.DictReader(f))
        assert row["method"] == "kd" and row["n"] == "2"
        assert set(row["run_ids"].split()) == {r.info.run_id for r in runs}
        mean = sum(r.data.metrics["test/acc"] for r in runs) / 2
        assert float(row["acc_mean"]) == pytest.approx(mean)
        _, logged = mlflow_runs("team", uri=url)  # the files were logged through the server
        assert any(r.data.tags.get("mlflow.runName") == "leaderboard" for r in logged)
    finally:
        stop_group(server)


# -- the SLURM preset ------------------------------------------------------------------------


def test_submitit_slurm_preset_writes_the_sbatch_script(tmp_path, monkeypatch):
    """``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) composes over the plugin's
    submitit_slurm schema, and the plugin turns it into these sbatch directives (the launcher's
    own code, up to the submission: no SLURM here, so ``srun`` is a stub and nothing is sent)."""
    require_module("hydra_plugins.hydra_submitit_launcher")
    require_module("submitit")
    import submitit
    from hydra.utils import instantiate

    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text("#!/bin/sh\nexit 1\n")
    (stub / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kdbench.cli import config_dir

    overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]
    overrides += ["hydra.launcher.account=lab", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    seen = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda ex, *a: seen.append(ex) or [])
    assert launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0) == []
    script = seen[0]._executor._make_submission_file_text("python -m submitit.core._submit x", "u")
    for line in (
        "--partition=gpu",
        "--account=lab",
        "--time=240",
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=4",
        "--mem=16GB",
        "--nodes=1",
        "--job-name=kdbench",
        "--signal=USR2@120",
    ):
        assert f"#SBATCH {line}\n" in script, (line, script)


# -- one run over two processes started outside Lightning ------------------------------------


TORCHRUN = "torch.distributed.run"


def _train_set_size() -> int:
    from hydra.utils import instantiate

    cfg = compose()
    dm = instantiate(cfg.dataset, _convert_="all")
    dm.prepare_data()
    dm.setup()
    dm.use_transfer = True  # kd trains on the labelled and the transfer samples
    return len(dm.distill_set())


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_multinode_torchrun_and_srun_environment(tmp_path):
    """``trainer.num_nodes=2 trainer.devices=1 trainer.strategy=ddp`` in two processes each
    started as one node, both at once on a cold cache: by ``torchrun --nnodes=2`` (Lightning's
    TorchElasticEnvironment) and by hand with the variables ``srun`` sets (SLURMEnvironment),
    on CPU with gloo. Each makes one MLflow run, FINISHED, trained with world size 2: half the
    samples per process, so half the optimisation steps of one process."""
    cache = tmp_path / "cache"  # cold: one process trains the teacher alone, the others wait
    common = [*TINY, *QUICK, "++trainer.num_nodes=2", "trainer.devices=1"]
    common += ["trainer.strategy=ddp", "trainer.accelerator=cpu"]
    torchrun = Path(sys.executable).with_name("torchrun")
    procs, logs, stores = {}, {}, {}
    for launch in ("torchrun", "srun"):
        port = free_port()
        stores[launch] = f"sqlite:///{tmp_path / f'{launch}.db'}"
        for rank in (0, 1):
            name = f"{launch}{rank}"
            args = [*common, f"hydra.run.dir={tmp_path / launch}"]
            env = _env(KDBENCH_CACHE_DIR=str(cache), MLFLOW_TRACKING_URI=stores[launch])
            if launch == "torchrun":  # the README's command (python -m torch.distributed.run)
                cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", TORCHRUN]
                cmd += ["--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}"]
                cmd += ["--master_addr=127.0.0.1", f"--master_port={port}", "-m", "kdbench", *args]
            else:  # what srun --nodes=2 --ntasks-per-node=1 sets in each task
                cmd = [sys.executable, "-m", "kdbench", *args]
                env.update(
                    SLURM_JOB_ID="4242",
                    SLURM_JOB_NAME="kdbench",
                    SLURM_NTASKS="2",
                    SLURM_NTASKS_PER_NODE="1",
                    SLURM_NNODES="2",
                    SLURM_NODELIST="localhost",
                    SLURM_PROCID=str(rank),
                    SLURM_LOCALID="0",
                    SLURM_NODEID=str(rank),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                )
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = _start(cmd, tmp_path, env, logs[name])
    outs = _finish(procs, logs, timeout=300)  # (a deadlock: the logs say who waits for what)
    assert sum("kdbench: training teacher" in o for o in outs.values()) == 1

    n = _train_set_size()
    batch = int(compose().dataset.batch_size)
    steps = {w: EPOCHS * math.ceil(math.ceil(n / w) / batch) for w in (1, 2)}
    assert steps[1] != steps[2]
    results = {}
    for launch, uri in stores.items():
        _, runs = mlflow_runs("kdbench", uri=uri)
        assert [r.info.status for r in runs] == ["FINISHED"], launch  # one run, not one per rank
        (run,) = runs
        assert run.data.params["trainer.num_nodes"] == "2"
        ckpt = torch.load(run.data.tags["kdbench_checkpoint"], weights_only=False)
        assert ckpt["global_step"] == steps[2], (launch, ckpt["global_step"], steps)
        results[launch] = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    assert results["torchrun"] == results["srun"]  # the same training either way


# -- SQLite: several local processes on the default stores ---------------------------------


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_sqlite_parallel_runs_and_tune_workers(tmp_path):
    """Three ``python -m kdbench`` runs and three ``python -m kdbench.tune`` workers (a trial
    each) started at once on one fresh SQLite MLflow store and one fresh SQLite Optuna study:
    every process ends normally, none meets ``database is locked``, every run and trial is
    recorded once (tests/test_concurrency.py: two of either, and killed workers)."""
    import optuna

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = _env(MLFLOW_TRACKING_URI=uri)
    procs, logs = {}, {}
    for i in range(3):
        name = f"run{i}"
        cmd = [sys.executable, "-m", "kdbench", *TINY, *QUICK, f"seed={i}"]
        cmd += [f"hydra.run.dir={tmp_path / name}"]
        logs[name] = tmp_path / f"{name}.log"
        procs[name] = _start(cmd, tmp_path, env, logs[name])
        name = f"worker{i}"
        cmd = _tune_cmd(storage, "local", 1, tmp_path, f"hydra.run.dir={tmp_path / name}")
        logs[name] = tmp_path / f"{name}.log"
        procs[name] = _start(cmd, tmp_path, env, logs[name])
    outs = _finish(procs, logs, timeout=480)
    waits = sum(o.count("kdbench: waiting for another process") for o in outs.values())
    print(f"sqlite: 3 runs + 3 tuning workers at once; {waits} waited for the teacher's lock")

    _, runs = mlflow_runs("kdbench", uri=uri)
    assert sorted((r.data.tags["seed"], r.info.status) for r in runs) == [
        (str(i), "FINISHED") for i in range(3)
    ]
    study = optuna.load_study(study_name="local", storage=storage)
    assert sorted(t.number for t in study.trials) == list(range(3))
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    _, tune_runs = mlflow_runs("tune", uri=uri)
    trials = sorted(int(r.data.tags["trial"]) for r in tune_runs if "trial" in r.data.tags)
    assert trials == list(range(3))
    assert [r.info.status for r in tune_runs if "trial" not in r.data.tags] == ["FINISHED"]


# -- the skip/fail policy of the fixtures ----------------------------------------------------


def test_missing_component_fails_under_ci_and_skips_elsewhere(monkeypatch):
    for value in ("true", "1"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="CI is set"):
            require(False, "PostgreSQL is not installed")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL is not installed"):
        require(False, "PostgreSQL is not installed")
    require(True, "never raised")

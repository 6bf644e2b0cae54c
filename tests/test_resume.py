"""Resume, the documented flow: a run started as usual (`python -m kdbench seed=6`) and stopped
(SIGKILL, SIGTERM, SIGINT) is continued by the same command plus `resume=true`, into the same
MLflow run, to the uninterrupted result; a stopped run is never FINISHED."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, mlflow_runs, run_cli

# long enough epochs that the kill lands mid-run (the kill waits for the first last.ckpt)
ARGS = ["method=kd", "trainer.max_epochs=3", "dataset.transfer_size=3000", "steps_per_call=1"]
KEYS = ("test/acc", "val/acc_best", "test/acc_best", "test/agreement")


def _runs(experiment):
    return mlflow_runs(experiment)[1]


def _start(cwd: Path, *args: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``python -m kdbench ARGS`` as a user starts it (TINY sizes), in the background."""
    cmd = [sys.executable, "-m", "kdbench", *TINY, *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def _wait_for(proc: subprocess.Popen, cwd: Path, pattern: str, timeout: float = 300) -> Path:
    """The first file matching ``pattern`` under ``cwd``, polled while ``proc`` runs."""
    deadline = time.time() + timeout
    while True:
        found = sorted(cwd.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, f"the run ended before {pattern} appeared"
        assert time.time() < deadline, f"no {pattern} after {timeout} s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run's final metrics."""
    cwd = tmp_path_factory.mktemp("ref")
    proc = run_cli(*ARGS, "seed=6", "mlflow.experiment=resume-ref", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = _runs("resume-ref")
    return run.data.metrics


def _resume_and_compare(cwd: Path, experiment: str, killed, reference: dict) -> None:
    again = run_cli(*ARGS, "seed=6", f"mlflow.experiment={experiment}", "resume=true", cwd=cwd)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming MLflow run {killed.info.run_id}" in again.stdout
    (resumed,) = _runs(experiment)  # the same run, now finished with everything recorded
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    for key in KEYS:
        assert resumed.data.metrics[key] == pytest.approx(reference[key], abs=1e-9), key
    assert resumed.data.params["method.name"] == "kd" and "resume" not in resumed.data.params


def test_a_run_started_without_resume_and_killed_resumes_to_the_uninterrupted_result(
    tmp_path, reference
):
    proc = _start(tmp_path, *ARGS, "seed=6", "mlflow.experiment=resume")  # no resume=true
    _wait_for(proc, tmp_path, "outputs/**/checkpoints/run/last.ckpt")
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: after epoch 0's checkpoint
    proc.wait()
    (killed,) = _runs("resume")
    assert killed.info.status == "RUNNING"  # nothing could mark it: it was killed
    assert "test/acc" not in killed.data.metrics
    _resume_and_compare(tmp_path, "resume", killed, reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_leave_the_run_killed_and_exit_non_zero(tmp_path, reference, signum):
    experiment = f"resume-{signum.name}"
    proc = _start(
        tmp_path, *ARGS, "seed=6", f"mlflow.experiment={experiment}", stderr=subprocess.PIPE
    )
    _wait_for(proc, tmp_path, "outputs/**/checkpoints/run/last.ckpt")
    os.kill(proc.pid, signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]  # 143 / 130, as a shell reports them
    assert f"kdbench: error: stopped by {signum.name}" in err
    (killed,) = _runs(experiment)
    assert killed.info.status == "KILLED"
    if signum == signal.SIGTERM:  # (SIGINT ends the same way: one resume is enough)
        _resume_and_compare(tmp_path, experiment, killed, reference)


def test_a_run_killed_after_its_fit_is_not_finished_and_resume_records_the_rest(
    tmp_path, reference
):
    """The fit has ended but testing, efficiency and artifacts are not all recorded: the run must
    not be FINISHED (Lightning's logger would end it with the fit), and resume completes it."""
    proc = _start(tmp_path, *ARGS, "seed=6", "mlflow.experiment=resume-late")
    _wait_for(proc, tmp_path, "outputs/**/artifacts/student.pt")  # after the fit and its test
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (killed,) = _runs("resume-late")
    assert killed.info.status == "RUNNING"
    _resume_and_compare(tmp_path, "resume-late", killed, reference)
    (run,) = _runs("resume-late")
    client, _ = mlflow_runs("resume-late")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "student.pt", "student_best.pt"} <= artifacts
    assert "speedup" in run.data.metrics and "student/latency_ms" in run.data.metrics


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_resume_true_without_an_unfinished_run_starts_a_new_one_named_after_what_it_is(tmp_path):
    proc = run_cli("method=kd", "mlflow.experiment=resume-new", "resume=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no unfinished run of this config" in proc.stdout
    (run,) = _runs("resume-new")
    assert run.info.status == "FINISHED"
    # named after what it is (MLflow's generated names repeat when the RNG is seeded)
    assert run.info.run_name == "kd cnn1d->mlp offline s0"
    assert run.data.tags["pair"] == "cnn1d->mlp" and run.data.tags["scheme"] == "offline"

    # resume=PATH naming the checkpoint of that FINISHED run: refused, the run stays FINISHED
    (ckpt,) = tmp_path.glob("outputs/**/checkpoints/run/last.ckpt")
    again = run_cli("method=kd", "mlflow.experiment=resume-new", f"resume={ckpt}", cwd=tmp_path)
    assert again.returncode == 2
    (line,) = again.stderr.strip().splitlines()
    assert line.startswith("kdbench: error: resume=") and "FINISHED" in line
    assert [r.info.status for r in _runs("resume-new")] == ["FINISHED"]


def test_resume_from_a_missing_checkpoint_path_is_a_one_line_error(tmp_path):
    proc = run_cli("method=kd", "resume=/nonexistent/last.ckpt", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("kdbench: error: resume='/nonexistent/last.ckpt'")
    assert len(proc.stderr.strip().splitlines()) == 1


SELF = ["method=kd", "scheme=self", "scheme.generations=3", "trainer.max_epochs=3", "seed=2"]


@pytest.mark.slow  # a long sweep: python -m pytest -m slow (CI runs it)
def test_scheme_self_resumes_in_the_generation_it_was_in(tmp_path):
    ref = run_cli(*SELF, "mlflow.experiment=self-ref", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    (ref_run,) = _runs("self-ref")

    cwd = tmp_path / "killed"
    cwd.mkdir()
    proc = _start(cwd, *SELF, "mlflow.experiment=self")
    _wait_for(proc, cwd, "outputs/**/checkpoints/gen2/last.ckpt")  # generation 1 finished
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (killed,) = _runs("self")
    assert killed.info.status == "RUNNING"  # never FINISHED between generations
    assert "test/gen1/acc" in killed.data.metrics

    again = run_cli(*SELF, "mlflow.experiment=self", "resume=true", cwd=cwd)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "generation 1/2: finished earlier" in again.stdout
    assert len(list(cwd.glob("outputs/**/checkpoints/gen1"))) == 1  # not trained again
    (resumed,) = _runs("self")
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    for key in ("test/gen1/acc", "test/gen2/acc", "test/acc", "test/ensemble/acc"):
        assert resumed.data.metrics[key] == pytest.approx(ref_run.data.metrics[key], abs=1e-9), key
    client, _ = mlflow_runs("self")
    assert "gen1_student.pt" in {a.path for a in client.list_artifacts(resumed.info.run_id)}


def test_resume_path_applies_to_the_fit_that_wrote_it_only(tmp_path):
    """resume=PATH of generation 2's checkpoint: generation 2 continues from it, generation 1
    (finished) and generation 3 (not started) do not; a checkpoint of no known run is the
    single fit's."""
    from kdbench.tracking import Resume, checkpoint_tag

    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    tags = {checkpoint_tag("gen1"): "/elsewhere/gen1.ckpt", checkpoint_tag("gen2"): str(ckpt)}
    resume = Resume("run-id", tags, {}, str(ckpt))
    assert [resume.checkpoint(n) for n in ("gen1", "gen2", "gen3")] == [None, str(ckpt), None]
    assert Resume(path=str(ckpt)).checkpoint("") == str(ckpt)


def test_the_run_logger_pickles_for_ddp_spawn(tmp_path):
    import pickle

    from conftest import compose

    from kdbench.tracking import make_logger

    cfg = compose(f"mlflow.tracking_uri=sqlite:///{tmp_path / 'p.db'}")
    logger = make_logger(cfg)
    run_id = logger.run_id  # the MLflow run exists before the trainer is pickled
    again = pickle.loads(pickle.dumps(logger))  # ddp_spawn pickles the trainer and its loggers
    assert again.run_id == run_id and type(again).finalize is type(logger).finalize


def test_last_ckpt_is_the_last_epoch_even_when_validation_did_not_improve(tmp_path):
    """Lightning's ``save_last`` writes last.ckpt only in epochs whose val/acc improved; a run
    killed after epochs of no gain would then resume epochs back. With a learning rate too small
    to change anything, val/acc is the same every epoch: best.ckpt stays at epoch 0 and
    last.ckpt must hold epoch 2 (and the best score, for the resumed fit's model selection)."""
    proc = run_cli(
        "trainer.max_epochs=3", "optim.lr=1e-30", "efficiency.enabled=false", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (folder,) = tmp_path.glob("outputs/*/*/checkpoints/run")
    best, last = (
        torch.load(folder / f, map_location="cpu", weights_only=False)
        for f in ("best.ckpt", "last.ckpt")
    )
    assert best["epoch"] == 0 and last["epoch"] == 2
    assert last["global_step"] == 3 * best["global_step"]
    scores = [c.get("best_model_score") for c in last["callbacks"].values()]
    assert best["callbacks"] and any(s is not None for s in scores)


INTERRUPTED_WRITES = """
import os, random, signal, sqlite3, sys, threading
from mlflow.tracking import MlflowClient
from kdbench.tracking import release_interrupted

path = sys.argv[1]
client = MlflowClient(tracking_uri=f"sqlite:///{path}")
experiment = client.create_experiment("interrupted")
rng = random.Random(0)
for attempt in range(25):
    run_id = client.create_run(experiment).info.run_id
    timer = threading.Timer(rng.random() * 0.02, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        for step in range(1_000_000):
            client.log_metric(run_id, "m", step, step=step)
    except KeyboardInterrupt as exc:
        release_interrupted(exc)
    timer.join()
    con = sqlite3.connect(path, timeout=0)  # takes the write lock without waiting
    try:
        con.execute("BEGIN IMMEDIATE")
        con.rollback()
    except sqlite3.OperationalError:
        sys.exit(f"the store stayed locked after interrupt {attempt}")
    con.close()
"""


def test_a_signal_inside_a_store_write_leaves_the_store_writable(tmp_path):
    """The cause of a run once left RUNNING after SIGINT: the signal, raised as KeyboardInterrupt
    halfway through an MLflow write, left SQLite's write lock with a session that only the
    exception's frames still held. ``release_interrupted`` must free it at once, every time
    (about one interrupt in seven of this loop leaves the lock held without it). In a process
    of its own: a small heap, as in a run, and the signal goes to no pytest worker."""
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_WRITES, str(tmp_path / "mlflow.db")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

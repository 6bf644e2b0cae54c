"""resume=true continues a run killed with SIGKILL, into the same MLflow run, to the same result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, mlflow_runs, run_cli

# long enough epochs that the kill lands mid-run (the kill waits for the first last.ckpt)
ARGS = ["method=kd", "trainer.max_epochs=5", "dataset.transfer_size=8000", "steps_per_call=1"]


@pytest.fixture()
def cwd(tmp_path) -> Path:
    return tmp_path


def _metrics(experiment):
    _, runs = mlflow_runs(experiment)
    return runs


def test_a_killed_run_resumes_into_the_same_mlflow_run_with_the_uninterrupted_result(cwd):
    ref = run_cli(*ARGS, "mlflow.experiment=resume-ref", cwd=cwd)
    assert ref.returncode == 0, ref.stderr[-2000:]
    (ref_run,) = _metrics("resume-ref")

    before = set(cwd.glob("outputs/**/checkpoints/run/last.ckpt"))  # the reference run's
    cmd = [sys.executable, "-m", "kdbench", *TINY, *ARGS, "mlflow.experiment=resume", "resume=true"]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not set(cwd.glob("outputs/**/checkpoints/run/last.ckpt")) - before:
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # mid-run: after epoch 0's checkpoint
    proc.wait()
    (killed,) = _metrics("resume")
    assert killed.info.status == "RUNNING"  # nothing could mark it: it was killed
    assert "test/acc" not in killed.data.metrics

    again = run_cli(*ARGS, "mlflow.experiment=resume", "resume=true", cwd=cwd)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resuming MLflow run {killed.info.run_id} from" in again.stdout
    (resumed,) = _metrics("resume")  # the same run, now finished
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    for key in ("test/acc", "val/acc_best", "test/acc_best"):
        assert resumed.data.metrics[key] == pytest.approx(ref_run.data.metrics[key], abs=1e-9)


def test_resume_true_without_an_unfinished_run_starts_a_new_one(cwd):
    proc = run_cli("method=kd", "mlflow.experiment=resume-new", "resume=true", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no unfinished run of this config" in proc.stdout
    assert [r.info.status for r in _metrics("resume-new")] == ["FINISHED"]


def test_resume_from_a_missing_checkpoint_path_is_a_one_line_error(cwd):
    proc = run_cli("method=kd", "resume=/nonexistent/last.ckpt", cwd=cwd)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("kdbench: error: resume='/nonexistent/last.ckpt'")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_scheme_self_refuses_resume_before_training(cwd):
    proc = run_cli("method=kd", "scheme=self", "resume=true", cwd=cwd)
    assert proc.returncode == 2 and "cannot resume yet" in proc.stderr

"""The command line end to end, in a temporary directory: what a user types and sees."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import mlflow_runs, run_cli, run_main_in_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cwd(tmp_path) -> Path:
    return tmp_path


def test_cli_run_records_a_finished_mlflow_run_in_the_working_directory(cwd, workdir):
    # default tracking URI: sqlite:///mlflow.db in the working directory
    proc = run_cli(
        "seed=1", cwd=cwd, env={"MLFLOW_TRACKING_URI": None, "KDBENCH_PRINT_METRICS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"test/acc=0\.\d+", proc.stdout)
    assert (cwd / "mlflow.db").exists()
    client, runs = mlflow_runs("kdbench", uri=f"sqlite:///{cwd / 'mlflow.db'}")
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED"
    tags = r.data.tags
    assert {
        k: tags[k]
        for k in ("method", "knowledge", "scheme", "teacher", "student", "dataset", "seed")
    } == {
        "method": "kd",
        "knowledge": "response",
        "scheme": "offline",
        "teacher": "cnn1d",
        "student": "mlp",
        "dataset": "mnist1d",
        "seed": "1",
    }
    m = r.data.metrics
    assert 0 <= m["test/acc"] <= 1 and 0 <= m["test/acc_best"] <= 1 and 0 <= m["test/ece"] <= 1
    assert m["student/params"] == 15210 and m["teacher/params"] == 1650  # the tiny teacher
    assert r.data.params["method.temperature"] == "4.0"
    assert "train/kd" in m and "train/ce" in m
    # nothing generated into the working directory but the MLflow store and Hydra's outputs
    assert {p.name for p in cwd.iterdir()} <= {
        "mlflow.db",
        "mlflow.db.lock",
        "outputs",
        "mlruns",
        "mlartifacts",
    }


def test_help_and_cfg_job_work(cwd):
    proc = run_cli("--help", cwd=cwd, tiny=False)
    assert proc.returncode == 0
    for group in ("dataset:", "method:", "scheme:", "student:", "teacher:", "trainer:"):
        assert group in proc.stdout
    assert "rkd" in proc.stdout and "mnist1d" in proc.stdout
    proc = run_cli("--cfg", "job", "method=rkd", cwd=cwd, tiny=False)
    assert proc.returncode == 0 and "name: rkd" in proc.stdout and "seed: 0" in proc.stdout


def test_limit_train_batches_counts_optimisation_steps(cwd):
    """Lightning's ``trainer.limit_train_batches`` means what it says in Lightning: with the
    default ``steps_per_call=auto`` each served batch is then one optimisation step, and a
    fraction of the epoch runs (it once failed inside Lightning; an int limit meant limit x 32
    steps): 0.5 of 13 batches (400 labelled + 400 transfer samples, 64 a batch) is 6 steps an
    epoch, 12 in the run's 2 epochs."""
    args = ["++trainer.limit_train_batches=0.5", "mlflow.experiment=limit"]
    proc = run_cli(*args, "efficiency.enabled=false", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = cwd.glob("outputs/*/*/checkpoints/run/last.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 12
    _, runs = mlflow_runs("limit")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_a_transfer_size_sweep_trains_the_teacher_once(cwd):
    """The teacher trains on the labelled samples alone: a sweep over the transfer set's size
    (or its seed) reuses the teacher the first job trained."""
    uri = f"sqlite:///{cwd / 'transfer.db'}"
    quick = ["teacher.seed=11", "trainer.max_epochs=1", "efficiency.enabled=false"]
    sweep = ["-m", "dataset.transfer_size=200,400", *quick]
    proc = run_cli(*sweep, cwd=cwd, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = mlflow_runs("kdbench", uri=uri)
    assert sorted(r.data.tags["teacher_source"] for r in runs) == ["cache", "trained"]
    assert len({r.data.metrics["teacher/test/acc"] for r in runs}) == 1
    assert len({r.data.params["dataset.transfer_size"] for r in runs}) == 2
    proc = run_cli("dataset.transfer_seed=5", *quick, cwd=cwd, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = mlflow_runs("kdbench", uri=uri)
    assert sorted(r.data.tags["teacher_source"] for r in runs) == ["cache", "cache", "trained"]


def test_multirun_sweep_runs_every_combination(cwd, workdir):
    uri = f"sqlite:///{cwd / 'sweep.db'}"
    proc = run_cli("-m", "method=none,kd", "seed=0,1", cwd=cwd, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = mlflow_runs("kdbench", uri=uri)
    combos = sorted((r.data.tags["method"], r.data.tags["seed"]) for r in runs)
    assert combos == [("kd", "0"), ("kd", "1"), ("none", "0"), ("none", "1")]
    assert all(r.info.status == "FINISHED" for r in runs)


BAD = [
    (["trainer.accelerator=nosuch"], "trainer.accelerator='nosuch' is invalid: You selected"),
    (["method.temperature=0"], "method.temperature=0 is invalid: must be a finite number > 0"),
    (["method.temperature=-1"], "method.temperature=-1 is invalid"),
    (["method.alpha=-0.5"], "method.alpha=-0.5 is invalid: must be a finite number >= 0"),
    (["dataset.transfer_size=-5"], "dataset.transfer_size=-5 is invalid: must be >= 0"),
    (
        ["student.taps.hint=nope", "method=fitnet"],
        "student.taps.hint='nope' is not a module of MLP; its modules are: flatten, hidden",
    ),
    (["method=at"], "method=at needs spatial feature maps (stages) but student mlp has none"),
    (["method=none", "method.beta=1"], "method none has no method term"),
    (
        ["dataset=digits", "dataset.transfer_size=100"],
        "dataset digits cannot generate unlabelled samples",
    ),
    (
        ["++trainer.limit_train_batches=2", "steps_per_call=4"],
        "steps_per_call=4 is invalid: must be 1 or auto with trainer.limit_train_batches",
    ),
    (
        ["teacher.checkpoint=/nonexistent/teacher.pt"],
        "teacher.checkpoint='/nonexistent/teacher.pt' does not exist",
    ),
]


@pytest.mark.parametrize("args,message", BAD, ids=[a[0] for a, _ in BAD])
def test_bad_input_gives_one_line_exit_2_and_no_run(cwd, args, message):
    uri = f"sqlite:///{cwd / 'bad.db'}"
    tiny = not any(a.startswith("dataset=") for a in args)  # TINY is for mnist1d
    proc = run_cli(*args, cwd=cwd, env={"MLFLOW_TRACKING_URI": uri}, tiny=tiny)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("kdbench: error: ") and message in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    _, runs = mlflow_runs("kdbench", uri=uri)
    assert runs == []


def test_unknown_group_option_lists_the_options(cwd):
    proc = run_cli("method=nosuch", cwd=cwd)
    assert proc.returncode != 0
    assert "Could not find 'method/nosuch'" in proc.stderr and "rkd" in proc.stderr


def test_unreadable_and_mismatched_teacher_checkpoints(cwd):
    junk = cwd / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    proc = run_cli(f"teacher.checkpoint={junk}", cwd=cwd)
    assert (
        proc.returncode == 2 and "is not a readable weights-only PyTorch checkpoint" in proc.stderr
    )
    wrong = cwd / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    proc = run_cli(f"teacher.checkpoint={wrong}", cwd=cwd)
    assert proc.returncode == 2 and "does not fit teacher.arch=cnn1d" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_teacher_checkpoint_is_loaded_instead_of_training(cwd):
    from kdbench.models import create_model

    model = create_model("cnn1d", num_classes=10, input_shape=(1, 40), channels=[8, 8, 16, 16])
    path = cwd / "teacher.pt"
    torch.save(model.state_dict(), path)
    uri = f"sqlite:///{cwd / 'ckpt.db'}"
    proc = run_cli(f"teacher.checkpoint={path}", cwd=cwd, env={"MLFLOW_TRACKING_URI": uri})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training teacher" not in proc.stdout
    _, runs = mlflow_runs("kdbench", uri=uri)
    assert runs[0].data.tags["teacher_source"] == "checkpoint"


def test_unwritable_data_directory_costs_the_cache_not_the_run(cwd):
    blocker = cwd / "file"
    blocker.write_text("x")
    proc = run_cli(f"dataset.data_dir={blocker}/data", "dataset.seed=4242", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"could not save the data cache entry to {blocker}/data/" in proc.stdout


@pytest.mark.parametrize(
    "override, key",
    [
        ("seed=-1", "seed"),
        ("method.temperature=0", "method.temperature"),
        ("optim.name=rmsprop", "optim.name"),
        ("teacher.optim.scheduler=linear", "teacher.optim.scheduler"),
        ("optim.fused=maybe", "optim.fused"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
    ],
)
def test_config_errors_are_found_before_torch_is_imported(cwd, override, key):
    # what makes them fast (start-up is measured in scripts/perf.py, not timed here)
    proc = run_main_in_process(override, cwd)
    assert "EXIT 2 False False" in proc.stdout
    assert proc.stderr.strip().startswith(f"kdbench: error: {key}=")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_flagship_command_rkd_online_trains_both_peers_through_the_kernel(cwd, workdir):
    # the command the README tells users to try first; RKD runs in the compiled CPU kernel
    # (kdbench/kernels.py), one symmetric call for both directions
    proc = run_cli("method=rkd", "scheme=online", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "numba" not in proc.stderr  # no fallback warning: the kernel ran
    client, runs = mlflow_runs("kdbench")
    (run,) = [r for r in runs if r.data.tags.get("method") == "rkd"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["scheme"] == "online"
    m = run.data.metrics
    teacher_rkd, student_rkd = m["train/teacher/rkd"], m["train/student/rkd"]
    # one value of the symmetric loss, logged for each direction
    assert math.isfinite(student_rkd) and student_rkd > 0
    assert teacher_rkd == pytest.approx(student_rkd, rel=1e-6)
    assert 0 < m["test/acc"] <= 1

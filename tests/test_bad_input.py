"""Bad input and failing environments, driven through the CLI as users run it (issue #12, item
10): each is refused before any work in one line (``kdbench: error: KEY=VALUE is invalid: ...``,
exit code 2, no traceback, no MLflow run, no cache), messages name the cause and never a
password, a multirun runs its other jobs when one is refused, and a store that cannot be
written ends the run in one line."""

from __future__ import annotations

import importlib.util
import os
import pickle
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import TINY, mlflow_runs, run_cli

PASSWORD = "hunter2"
# a database driver that is not installed here: the URL is refused before any connection
MISSING_DRIVER = next(
    (d, m)
    for d, m in (("mssql+pymssql", "pymssql"), ("mysql+pymysql", "pymysql"), ("mssql", "pyodbc"))
    if importlib.util.find_spec(m) is None
)


def _env(tmp_path: Path, **extra) -> dict:
    """A fresh store and cache in ``tmp_path`` (neither should be created by a refusal)."""
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "KDBENCH_CACHE_DIR": str(tmp_path / "cache"),
        **extra,
    }


def _assert_refused(proc, key: str, tmp_path: Path) -> str:
    """Exit 2, one line naming ``key`` (no traceback), and nothing written: no MLflow store,
    no cache, no Optuna study."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"kdbench: error: {key}="), lines[0]
    assert "is invalid: " in lines[0]
    for name in ("mlflow.db", "cache", "optuna.db", "mlruns"):
        assert not (tmp_path / name).exists(), name
    return lines[0]


def _not_a_checkpoint(tmp_path: Path) -> str:
    """A torch-style zip archive whose pickle is a plain dict (no Lightning training state)."""
    path = tmp_path / "weights.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("weights/data.pkl", pickle.dumps({"state_dict": {}, "epoch": 3}))
    return str(path)


class _RunsCode:
    """Unpickling this calls print: a checkpoint holding it must never be unpickled."""

    def __reduce__(self):
        return (print, ("code ran while loading",))


def _runs_code_checkpoint(tmp_path: Path) -> str:
    import torch

    path = tmp_path / "runs_code.ckpt"
    torch.save({"state_dict": {}, "loops": _RunsCode(), "epoch": 1}, path)
    return str(path)


CONFIG_CASES = [  # (overrides, env, key named in the error)
    (["dataset.train_split=1.5"], {}, "dataset.train_split"),
    (["dataset.train_split=0.001"], {}, "dataset.train_split"),
    (["dataset.eval_batch_size=0"], {}, "dataset.eval_batch_size"),
    (["dataset.val_size=5000"], {}, "dataset.val_size"),
    (["dataset=digits", "dataset.test_fraction=1.2"], {}, "dataset.test_fraction"),
    (["optim=sgd", "optim.momentum=-0.5"], {}, "optim.momentum"),
    (["optim=sgd", "optim.momentum=0", "optim.nesterov=true"], {}, "optim.nesterov"),
    (["optim=sgd", "optim.milestones=[10,5]"], {}, "optim.milestones"),
    (["optim=sgd", "optim.lr_decay=0"], {}, "optim.lr_decay"),
    (["teacher.optim.lr=-1"], {}, "teacher.optim.lr"),
    (["resume=NOT_A_FILE"], {}, "resume"),
    (["resume=TEXT_FILE"], {}, "resume"),
    (["resume=ZIP_NOT_CKPT"], {}, "resume"),
    (["resume=RUNS_CODE"], {}, "resume"),
    ([], {"MLFLOW_TRACKING_URI": "file:./mlruns"}, "mlflow.tracking_uri"),
    ([], {"MLFLOW_TRACKING_URI": "./mlruns"}, "mlflow.tracking_uri"),
    ([], {"MLFLOW_TRACKING_URI": "sqlite:///NO_DIR/mlflow.db"}, "mlflow.tracking_uri"),
    ([], {"MLFLOW_TRACKING_URI": "sqlite:///GARBAGE"}, "mlflow.tracking_uri"),
    ([], {"MLFLOW_TRACKING_URI": "http://:5000"}, "mlflow.tracking_uri"),
    ([], {"MLFLOW_TRACKING_URI": "ftp://host/store"}, "mlflow.tracking_uri"),
    (
        [],
        {"MLFLOW_TRACKING_URI": f"{MISSING_DRIVER[0]}://bob:{PASSWORD}@127.0.0.1:1/db"},
        "mlflow.tracking_uri",
    ),
]


@pytest.mark.parametrize("overrides,env,key", CONFIG_CASES)
def test_bad_config_is_refused_before_any_work(tmp_path, overrides, env, key):
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "garbage.db").write_text("not an SQLite database, but a text file\n")
    subst = {
        "NOT_A_FILE": str(tmp_path / "missing.ckpt"),
        "TEXT_FILE": str(tmp_path / "notes.txt"),
        "ZIP_NOT_CKPT": _not_a_checkpoint(tmp_path),
        "RUNS_CODE": _runs_code_checkpoint(tmp_path) if "resume=RUNS_CODE" in overrides else "",
        "NO_DIR": str(tmp_path / "no" / "such" / "dir"),
        "GARBAGE": str(tmp_path / "garbage.db"),
    }

    def fill(text: str) -> str:
        for k, v in subst.items():
            text = text.replace(k, v)
        return text

    env = {k: fill(v) for k, v in {**_env(tmp_path), **env}.items()}
    tiny = not any(o.startswith("dataset=") for o in overrides)  # TINY's keys are MNIST-1D's
    proc = run_cli(*[fill(o) for o in overrides], cwd=tmp_path, env=env, tiny=tiny)
    line = _assert_refused(proc, key, tmp_path)
    assert PASSWORD not in proc.stderr + proc.stdout
    assert "code ran" not in proc.stderr + proc.stdout
    if PASSWORD in env["MLFLOW_TRACKING_URI"]:
        assert "bob:***@127.0.0.1" in line


def _run_tune(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kdbench.tune", *TINY, *args]
    return subprocess.run(
        cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["tune.n_trials=0"], "tune.n_trials"),
        (["tune.n_trials=-3"], "tune.n_trials"),
        (["tune.n_trials=1.5"], "tune.n_trials"),
        (["tune.direction=up"], "tune.direction"),
        (["tune.heartbeat_s=0"], "tune.heartbeat_s"),
        ([f"tune.storage={MISSING_DRIVER[0]}://bob:{PASSWORD}@127.0.0.1:1/db"], "tune.storage"),
        (["tune.storage=sqlite:///NO_DIR/optuna.db"], "tune.storage"),
    ],
)
def test_bad_tune_config_is_refused_before_the_study(tmp_path, overrides, key):
    """Today n_trials=0 left the study's MLflow parent run RUNNING, direction=up was reported as a
    storage error, and a storage error printed the database password."""
    overrides = [o.replace("NO_DIR", str(tmp_path / "no" / "dir")) for o in overrides]
    proc = _run_tune(*overrides, cwd=tmp_path, env=_env(tmp_path))
    line = _assert_refused(proc, key, tmp_path)
    assert PASSWORD not in proc.stderr + proc.stdout
    if key == "tune.storage" and "bob" in overrides[0]:
        assert "bob:***@127.0.0.1" in line


def test_mask_credentials():
    from kdbench.errors import mask_credentials

    text = (
        "cannot open postgresql+psycopg2://bob:s3cr/et@db:5432/x?sslmode=require&password=zz "
        "and http://alice:pw@server:5000/api, not http://server:5000/path"
    )
    assert mask_credentials(text) == (
        "cannot open postgresql+psycopg2://bob:***@db:5432/x?sslmode=require&password=*** "
        "and http://alice:***@server:5000/api, not http://server:5000/path"
    )
    assert mask_credentials("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


def test_trainer_option_error_names_the_key_first(tmp_path):
    proc = run_cli("+trainer.foo=1", cwd=tmp_path, env=_env(tmp_path))
    line = _assert_refused(proc, "trainer.foo", tmp_path)
    assert line.startswith(
        "kdbench: error: trainer.foo=1 is invalid: Trainer.__init__() got an unexpected keyword "
        "argument 'foo'"
    )
    assert "{" not in line  # no dump of every trainer option


def _png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def test_single_class_image_folder_is_refused(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "val"):
        _png(root / split / "cat" / "0.png")
    proc = run_cli(
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.image_size=8",
        "trainer.max_epochs=1",
        cwd=tmp_path,
        tiny=False,
        env=_env(tmp_path),
    )
    line = _assert_refused(proc, "dataset.root", tmp_path)
    assert "1 class (cat)" in line and "at least 2" in line


def test_nan_teacher_blames_the_teacher_not_the_learning_rate(tmp_path):
    """A frozen teacher with NaN weights: the advice is about the teacher, not optim.lr."""
    import torch

    from kdbench.models import create_model

    teacher = create_model("cnn1d", num_classes=10, input_shape=(1, 40), channels=[8, 8, 16, 16])
    state = {
        k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
        for k, v in teacher.state_dict().items()
    }
    torch.save(state, tmp_path / "nan_teacher.pt")
    env = _env(tmp_path, KDBENCH_CACHE_DIR=os.environ["KDBENCH_CACHE_DIR"])  # warm data
    proc = run_cli(
        f"teacher.checkpoint={tmp_path / 'nan_teacher.pt'}",
        "trainer.max_epochs=1",
        "teacher_output_cache.persist=false",
        cwd=tmp_path,
        env=env,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kdbench: error:")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "frozen teacher's weights are NaN or infinite" in lines[0]
    assert "teacher.checkpoint" in lines[0] and "(optim.lr)" not in lines[0]
    _, runs = mlflow_runs("kdbench", uri=env["MLFLOW_TRACKING_URI"])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_multirun_runs_the_other_jobs_and_lists_the_refused_one(tmp_path):
    """``-m method=at,kd`` on the MLP student: at is refused (no feature maps), kd still runs
    and FINISHES, the at job's error is one line, and the sweep exits non-zero."""
    env = _env(tmp_path, KDBENCH_CACHE_DIR=os.environ["KDBENCH_CACHE_DIR"])  # warm teacher
    proc = run_cli("-m", "method=at,kd", "trainer.max_epochs=1", cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    _, runs = mlflow_runs("kdbench", uri=env["MLFLOW_TRACKING_URI"])
    assert sorted((r.data.tags["method"], r.info.status) for r in runs) == [("kd", "FINISHED")]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdbench: error:")]
    at_job = "kdbench: error: job 0 (method=at): method=at needs spatial feature maps"
    assert errors and all(e.startswith(at_job) or "1 job(s)" in e for e in errors), errors
    assert proc.stderr.rstrip().splitlines()[-1].startswith(at_job)  # the closing list
    assert "Traceback" not in proc.stderr and "job 1" not in proc.stderr


def test_full_mlflow_store_is_one_line(tmp_path):
    """A store that cannot grow (its file size capped by RLIMIT_FSIZE, which binds root too,
    as a full disk would): one line, exit 2, no run left RUNNING or FINISHED. Today: 1,112
    lines of tracebacks and logged SQL."""
    from mlflow.tracking import MlflowClient

    db = tmp_path / "full" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    MlflowClient(uri).search_experiments()  # the schema exists; the file cannot grow from here
    limit = db.stat().st_size

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}  # the session's (warm) data cache
    proc = subprocess.run(
        [sys.executable, "-m", "kdbench", *TINY, "trainer.max_epochs=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=cap,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("kdbench: error: ") and "cannot be written" in lines[0]
    _, runs = mlflow_runs("kdbench", uri=uri)
    assert all(r.info.status == "FAILED" for r in runs)


def test_nan_advice_names_the_learning_rate_of_what_trains():
    """While a teacher trains, its own learning rate (teacher.optim.lr); a student's is optim.lr;
    a frozen teacher whose outputs on the batch are not finite is named instead."""
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf

    from kdbench.schemes.base import nonfinite_advice
    from kdbench.taps import Outputs

    cfg = OmegaConf.create({"optim": {"lr": 0.1}, "teacher": {"optim": {"lr": 0.01}}})
    teaching = SimpleNamespace(teacher=None, optim_cfg=cfg.teacher.optim)
    assert nonfinite_advice(teaching).endswith("lower its learning rate (teacher.optim.lr)")
    student = SimpleNamespace(teacher=None, optim_cfg=cfg.optim)
    assert "lower the learning rate (optim.lr)" in nonfinite_advice(student)

    class Huge(torch.nn.Module):  # finite weights, infinite outputs
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((1,), 3e38), requires_grad=False)

        def forward(self, x, taps=frozenset()):
            return Outputs(x.sum(1, keepdim=True) * self.w * 10)

    frozen = SimpleNamespace(teacher=Huge(), optim_cfg=cfg.optim, method=SimpleNamespace(taps=()))
    batch = (torch.ones(2, 3), torch.zeros(2), torch.arange(2))
    assert "frozen teacher's outputs are NaN or infinite" in nonfinite_advice(frozen, batch)
    assert "(optim.lr)" in nonfinite_advice(frozen, (torch.zeros(2, 3), *batch[1:]))

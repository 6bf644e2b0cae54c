"""Bring your own model, as the README tells users: a ``mymodels.py`` in the working directory,
``student=custom student._target_=mymodels.TinyNet`` (or ``teacher=custom``) on the command line,
taps as module paths, ``python -m kdbench.inspect`` to find them."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_NO_TEACHER, compose, mlflow_runs, run_cli, run_main_in_process

ROOT = Path(__file__).resolve().parents[1]
# The README's own example module ("Bring your own model"), as a user pastes it.
_README = re.search(
    r"cat > mymodels.py <<'EOF'\n(.*?)\nEOF\n", (ROOT / "README.md").read_text(), re.S
)
assert _README, "README.md lost its 'Bring your own model' example (cat > mymodels.py)"
MYMODELS = _README.group(1) + "\n"


@pytest.fixture()
def userdir(tmp_path) -> Path:
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    return tmp_path


def tinynet_params(width: int = 16, classes: int = 10, in_channels: int = 1) -> int:
    conv1 = in_channels * width * 5 + width
    conv2 = width * 2 * width * 3 + 2 * width
    return conv1 + conv2 + 2 * width * classes + classes


def _one_line_error(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("kdbench: error: "), proc.stderr[-2000:]
    return lines[0]


def test_a_users_student_trains_with_a_relation_method_on_a_tap_path(userdir):
    proc = run_cli(
        "student=custom",
        "student._target_=mymodels.TinyNet",
        "student.taps.embedding=body.2",
        "method=rkd",
        "trainer.max_epochs=1",
        "mlflow.experiment=byo_student",
        cwd=userdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = mlflow_runs("byo_student")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tags, metrics = runs[0].data.tags, runs[0].data.metrics
    assert tags["student"] == "mymodels.TinyNet" and tags["student_config"] == "TinyNet"
    assert tags["teacher"] == "cnn1d" and tags["method"] == "rkd"
    # it really trained TinyNet (1,994 parameters, not the MLP's 15,210), through the tap
    assert metrics["student/params"] == tinynet_params() == 1994
    assert metrics["train/rkd"] > 0
    assert metrics["teacher/params"] == 1650  # the tiny cnn1d teacher
    assert metrics["student/flops"] > 0 and metrics["student/latency_ms"] > 0  # measured


def test_a_users_teacher_is_trained_cached_and_keyed_apart(userdir, workdir, monkeypatch):
    # one run: the teacher is TinyNet (width 32), the student another registered arch than the
    # student config's (student.arch=cnn1d over student=mlp: the mlp's kwargs are left out)
    proc = run_cli(
        *TINY_NO_TEACHER,
        "teacher=custom",
        "teacher._target_=mymodels.TinyNet",
        "+teacher.kwargs.width=32",
        "student.arch=cnn1d",
        "+student.kwargs.channels=[4,4,8,8]",
        "trainer.max_epochs=1",
        "mlflow.experiment=byo_teacher",
        cwd=userdir,
        tiny=False,
        env={"KDBENCH_PRINT_METRICS": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student.kwargs.hidden=[100, 100] is for arch=mlp" in proc.stdout
    _, runs = mlflow_runs("byo_teacher")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tags, metrics = runs[0].data.tags, runs[0].data.metrics
    assert tags["teacher"] == "mymodels.TinyNet" and tags["teacher_config"] == "TinyNet"
    assert tags["student"] == "cnn1d" and tags["student_config"] == "cnn1d"  # not "mlp"
    assert tags["teacher_source"] == "trained"
    assert metrics["teacher/params"] == tinynet_params(width=32)
    from kdbench.models import count_parameters, create_model

    cnn = create_model("cnn1d", num_classes=10, input_shape=(1, 40), channels=[4, 4, 8, 8])
    assert metrics["student/params"] == count_parameters(cnn)
    # the trained teacher is cached under its name and a key of the user's teacher (_target_,
    # kwargs, source); the cnn1d teacher of the same data, recipe and seed has another key
    from kdbench.errors import checked_instantiate
    from kdbench.teacher import teacher_key

    monkeypatch.chdir(userdir)
    monkeypatch.syspath_prepend(str(userdir))
    sys.modules.pop("mymodels", None)
    cfg = compose(
        "teacher=custom",
        "teacher._target_=mymodels.TinyNet",
        "+teacher.kwargs.width=32",
        tiny=TINY_NO_TEACHER,
    )
    dm, precision = checked_instantiate(cfg.dataset, _convert_="all"), cfg.trainer.precision
    key = teacher_key(cfg.teacher, dm, precision)
    assert (workdir / "cache" / "teachers" / f"mnist1d-TinyNet-{key}.pt").is_file()
    assert teacher_key(compose(tiny=TINY_NO_TEACHER).teacher, dm, precision) != key


class _mnist1d_cache_key_only:
    def cache_key(self):
        return {"name": "mnist1d"}

    labelled_key = cache_key  # (no transfer set here)


def _user_module(tmp_path: Path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(MYMODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("mymodels", None)
    importlib.invalidate_caches()


def test_the_teacher_cache_key_follows_target_kwargs_and_source(tmp_path, monkeypatch):
    from kdbench.teacher import teacher_key

    _user_module(tmp_path, monkeypatch)
    dm = _mnist1d_cache_key_only()
    spec = compose("teacher=custom", "teacher._target_=mymodels.TinyNet", tiny=[])["teacher"]
    key = teacher_key(spec, dm, "32")
    assert key == teacher_key(spec, dm, "32")
    wider = compose(
        "teacher=custom", "teacher._target_=mymodels.TinyNet", "+teacher.kwargs.width=8", tiny=[]
    )["teacher"]
    assert teacher_key(wider, dm, "32") != key
    # an edited model file is another teacher: never reuse weights trained for the old code
    (tmp_path / "mymodels.py").write_text(MYMODELS + "\n# edited\n")
    assert teacher_key(spec, dm, "32") != key


def test_the_builder_passes_what_the_signature_takes(tmp_path, monkeypatch):
    from kdbench.errors import KdbenchError
    from kdbench.models import build_from_spec, count_parameters

    (tmp_path / "zoo.py").write_text(
        "from torch import nn\n"
        "def make(n_classes, in_chans, input_shape, in_features):\n"
        "    assert (in_chans, input_shape, in_features) == (3, (3, 4, 4), 48)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, n_classes))\n"
        "def anything(**kwargs):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(48, kwargs['num_classes']))\n"
        "def needs_depth(num_classes, depth):\n"
        "    return nn.Linear(48, num_classes)\n"
        "def wrong_output(num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(48, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("zoo", None)
    importlib.invalidate_caches()
    model = build_from_spec({"_target_": "zoo.make"}, 7, (3, 4, 4), "student")
    assert count_parameters(model) == 48 * 7 + 7
    model = build_from_spec({"_target_": "zoo.anything"}, 7, (3, 4, 4), "student")
    assert count_parameters(model) == 48 * 7 + 7  # **kwargs: num_classes
    with pytest.raises(KdbenchError, match=r"needs the argument 'depth'.*\+student\.kwargs\.depth"):
        build_from_spec({"_target_": "zoo.needs_depth"}, 7, (3, 4, 4), "student")
    with pytest.raises(KdbenchError, match=r"logits of shape \(batch, num_classes\) = \(2, 7\)"):
        build_from_spec({"_target_": "zoo.wrong_output"}, 7, (3, 4, 4), "student")
    with pytest.raises(KdbenchError, match=r"zoo has no attribute 'Nope'"):
        build_from_spec({"_target_": "zoo.Nope"}, 7, (3, 4, 4), "student")
    with pytest.raises(KdbenchError, match=r"no module 'nosuchpkg'.*PYTHONPATH"):
        build_from_spec({"_target_": "nosuchpkg.Net"}, 7, (3, 4, 4), "student")


def test_kwargs_null_clears_the_config_files_kwargs():
    from kdbench.models import build_from_spec, count_parameters, create_model

    # student=cnn1d_small has channels [12,12,24,24]; kwargs=null: the arch's own defaults
    spec = compose("student=cnn1d_small", "student.kwargs=null", tiny=[])["student"]
    built = build_from_spec(spec, 10, (1, 40), "student")
    default = create_model("cnn1d", num_classes=10, input_shape=(1, 40))
    assert count_parameters(built) == count_parameters(default) == 88394
    spec = compose("student=cnn1d_small", "~student.kwargs", tiny=[])["student"]
    assert count_parameters(build_from_spec(spec, 10, (1, 40), "student")) == 88394


@pytest.mark.parametrize(
    "override, message",
    [
        ("+student._target_=mymodels.TinyNet", "use student=custom student._target_=mymodels"),
        ("+student.foo=1", "student.foo=1 is invalid: student has no key 'foo'"),
        ("student=custom", "student._target_='???' is invalid"),
        ("+teacher.members=[{arch: mlp}]", "teacher.members="),
    ],
)
def test_model_config_errors_are_one_line_before_torch(userdir, override, message):
    proc = run_main_in_process(override, userdir)
    assert "EXIT 2 False" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_kwarg_the_model_does_not_take_is_an_error_naming_it(userdir):
    proc = run_cli(
        "student=custom",
        "student._target_=mymodels.TinyNet",
        "+student.kwargs.depth=3",
        "mlflow.experiment=byo_bad",
        cwd=userdir,
    )
    line = _one_line_error(proc)
    assert "student.kwargs.depth=3 is invalid: mymodels.TinyNet takes no argument 'depth'" in line
    assert "width" in line  # names what it does take
    assert mlflow_runs("byo_bad")[1] == []


def test_inspect_lists_module_paths_with_shapes_and_the_taps(userdir):
    cmd = [sys.executable, "-m", "kdbench.inspect", "student=custom"]
    cmd += ["student._target_=mymodels.TinyNet", "student.taps.embedding=body.2"]
    proc = subprocess.run(cmd, cwd=userdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "student: TinyNet (mymodels.TinyNet), 1,994 parameters" in out
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("  ")}
    assert rows["body.0"][:3] == ["Sequential", "(16,", "40)"]
    assert rows["body.1.0"][:3] == ["Conv1d", "(32,", "20)"]
    assert rows["body.2"] == ["Sequential", "(32,)", "0", "embedding"]
    assert rows["head"][:2] == ["Linear", "(10,)"]
    # the teacher's default taps are marked too (role=both by default)
    assert out.count("teacher: cnn1d") == 1
    assert rows["stages.1"][-2:] == ["stages[1],", "hint"]
    # a listing writes nothing into the working directory
    assert {p.name for p in userdir.iterdir()} <= {"mymodels.py", "__pycache__"}

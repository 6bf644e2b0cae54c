"""The CIFAR-100 experiment presets (conf/experiment/) and scripts/reproduce_cifar100.sh."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import compose

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
SCRIPT = ROOT / "scripts" / "reproduce_cifar100.sh"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"

# The 9 columns of the published CIFAR-100 table (CRD benchmark, /work/shared/REFERENCE_RESULTS.md):
# experiment name -> (teacher, student) of conf/teacher/ and conf/student/.
PUBLISHED_PAIRS = {
    "cifar100_r56_r20": ("resnet56", "resnet20"),
    "cifar100_r110_r32": ("resnet110", "resnet32"),
    "cifar100_r32x4_r8x4": ("resnet32x4", "resnet8x4"),
    "cifar100_wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2"),
    "cifar100_wrn40_2_wrn40_1": ("wrn_40_2", "wrn_40_1"),
    "cifar100_vgg13_vgg8": ("vgg13", "vgg8"),
    "cifar100_r32x4_shv1": ("resnet32x4", "shufflev1"),
    "cifar100_r32x4_shv2": ("resnet32x4", "shufflev2"),
    "cifar100_res50_mv2": ("resnet50", "mobilenetv2"),
}
SMALL_LR_STUDENTS = {"mobilenetv2", "shufflev1", "shufflev2"}  # lr 0.01 in the reference


def test_the_experiments_are_exactly_the_published_columns():
    assert set(EXPERIMENTS) == set(PUBLISHED_PAIRS)
    assert len(set(PUBLISHED_PAIRS.values())) == 9


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_to_the_reference_recipe(name):
    text = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n")
    cfg = compose(f"experiment={name}", tiny=False)
    teacher, student = PUBLISHED_PAIRS[name]
    assert cfg.dataset.name == "cifar100"
    assert (cfg.teacher.name, cfg.teacher.arch) == (teacher, teacher)
    assert (cfg.student.name, cfg.student.arch) == (student, student)
    assert cfg.method.name == "kd"  # the method stays the user's choice
    assert cfg.optim.name == "sgd"
    assert cfg.optim.lr == (0.01 if student in SMALL_LR_STUDENTS else 0.05)
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 5e-4)
    assert cfg.optim.scheduler == "multistep" and cfg.optim.lr_decay == 0.1
    assert list(cfg.optim.milestones) == [150, 180, 210]
    assert cfg.trainer.max_epochs == 240
    assert cfg.dataset.batch_size == 64
    assert cfg.dataset.val_size == 0  # the test set is the reported set
    assert cfg.mlflow.experiment == "cifar100"
    # the teacher keeps its own recipe (lr 0.05) when the student's is 0.01
    assert (cfg.teacher.epochs, cfg.teacher.optim.lr) == (240, 0.05)


def test_command_line_overrides_win_over_the_experiment():
    cfg = compose(
        "experiment=cifar100_r32x4_r8x4", "trainer.max_epochs=3", "method=dkd", tiny=False
    )
    assert cfg.trainer.max_epochs == 3
    assert cfg.method.name == "dkd" and cfg.student.name == "resnet8x4"
    cfg = compose("optim.lr=0.2", "experiment=cifar100_res50_mv2", tiny=False)
    assert cfg.optim.lr == 0.2


def test_without_an_experiment_the_defaults_are_unchanged():
    cfg = compose(tiny=False)
    assert (cfg.dataset.name, cfg.teacher.name, cfg.student.name) == ("mnist1d", "cnn1d", "mlp")
    assert cfg.optim.name == "adam" and cfg.mlflow.experiment == "kdbench"


def test_reproduce_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _stub_python(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose ``python`` only appends its arguments to a log file."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{log}"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CIFAR_ROOT", "EXTRA", "PAIRS")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env, log


@pytest.mark.parametrize("root", [None, "missing"])
def test_reproduce_script_without_cifar_root_fails_first_with_the_url(tmp_path, root):
    env, log = _stub_python(tmp_path)
    if root is not None:
        env["CIFAR_ROOT"] = str(tmp_path / root)
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and URL in lines[0], proc.stderr
    assert not log.exists()  # no run started


def test_reproduce_script_runs_one_sweep_per_pair_then_the_leaderboard(tmp_path):
    env, log = _stub_python(tmp_path)
    data = tmp_path / "data" / "cifar-100-python"
    data.mkdir(parents=True)
    (data / "train").write_bytes(b"")
    env.update(
        CIFAR_ROOT=str(data.parent),
        SEEDS="0 1",
        METHODS="none kd",
        PAIRS="cifar100_r56_r20 cifar100_res50_mv2",
        EXTRA="trainer.devices=2 trainer.strategy=ddp_spawn",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'm.db'}",
    )
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 3
    for call, pair in zip(calls, ["cifar100_r56_r20", "cifar100_res50_mv2"], strict=False):
        assert call == (
            f"-m kdbench -m experiment={pair} method=none,kd seed=0,1 "
            f"dataset.root='{data.parent}' trainer.devices=2 trainer.strategy=ddp_spawn"
        )
    assert calls[2].startswith("-m kdbench.leaderboard ")
    assert "--experiment cifar100" in calls[2] and "--pivot student" in calls[2]
    # every override of a sweep composes (a typo would only show hours into the grid)
    compose(
        "experiment=cifar100_res50_mv2", "method=none", f"dataset.root='{data.parent}'", tiny=False
    )

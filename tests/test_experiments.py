"""The CIFAR-100 experiment presets (conf/experiment/) and scripts/reproduce_cifar100.sh."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose
from omegaconf import OmegaConf
from test_variant_presets import VARIANT_PRESETS

ROOT = Path(__file__).resolve().parents[1]
# the variant presets of issue #14 (byot, takd, datafree, ca_mkd) are tested in their own file,
# the text presets (shakespeare_char, shakespeare_genre, arithmetic) in test_text_pipeline.py
EXPERIMENTS = sorted(
    p.stem
    for p in (ROOT / "conf" / "experiment").glob("cifar100_*.yaml")
    if p.stem not in VARIANT_PRESETS
)
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


# -- the published per-pair recipes (issue 12, item 4) ---------------------------------------
# DKD's beta per pair: mdistiller configs/cifar100/dkd/*.yaml (DKD.BETA; 8.0 where a file sets
# none, mdistiller/engine/cfg.py)
DKD_BETA = {
    "cifar100_r56_r20": 2.0,  # res56_res20.yaml
    "cifar100_r110_r32": 2.0,  # res110_res32.yaml
    "cifar100_r32x4_r8x4": 8.0,
    "cifar100_wrn40_2_wrn16_2": 6.0,  # wrn40_2_wrn_16_2.yaml
    "cifar100_wrn40_2_wrn40_1": 6.0,  # wrn40_2_wrn_40_1.yaml
    "cifar100_vgg13_vgg8": 6.0,  # vgg13_vgg8.yaml
    "cifar100_r32x4_shv1": 8.0,
    "cifar100_r32x4_shv2": 8.0,
    "cifar100_res50_mv2": 8.0,
}


@pytest.mark.parametrize("name", sorted(DKD_BETA))
def test_dkd_carries_the_pairs_beta(name):
    cfg = compose(f"experiment={name}", "method=dkd", tiny=False)
    term = cfg.method.term
    assert term.beta == DKD_BETA[name]
    assert (term.alpha, term.temperature, term.warmup_epochs) == (1.0, 4.0, 20)
    assert (cfg.method.gamma, cfg.method.beta) == (1.0, 1.0)


def test_dkd_beta_defaults_and_overrides():
    assert compose("method=dkd").method.term.beta == 8.0  # no preset: DKD's default
    # the user's value wins over the preset's, on either side of it on the command line
    for order in (
        ("experiment=cifar100_r56_r20", "method=dkd", "method.term.beta=4"),
        ("method.term.beta=4", "method=dkd", "experiment=cifar100_r56_r20"),
    ):
        assert compose(*order, tiny=False).method.term.beta == 4.0
    cfg = compose("experiment=cifar100_r56_r20", "method=dkd", "recipe.dkd.beta=3", tiny=False)
    assert cfg.method.term.beta == 3.0


def test_config_hash_and_params_see_the_resolved_recipe():
    from omegaconf import OmegaConf

    from kdbench.tracking import config_hash, flatten

    preset = compose("experiment=cifar100_r56_r20", "method=dkd", tiny=False)
    explicit = compose(
        "experiment=cifar100_r56_r20", "method=dkd", "method.term.beta=2.0", tiny=False
    )
    other = compose("experiment=cifar100_r56_r20", "method=dkd", "method.term.beta=8", tiny=False)
    assert config_hash(preset) == config_hash(explicit) != config_hash(other)
    assert flatten(OmegaConf.to_container(preset, resolve=True))["method.term.beta"] == 2.0


def test_cfg_job_shows_the_pairs_dkd_beta(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdbench",
            "--cfg",
            "job",
            "--resolve",
            "experiment=cifar100_r56_r20",
            "method=dkd",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.method.name == "dkd" and cfg.method.term.beta == 2.0
    assert cfg.recipe.dkd.beta == 2.0


def test_reproduce_script_carries_the_pairs_dkd_beta(tmp_path):
    env, log = _stub_python(tmp_path)
    data = tmp_path / "data" / "cifar-100-python"
    data.mkdir(parents=True)
    (data / "train").write_bytes(b"")
    pairs = ["cifar100_r56_r20", "cifar100_vgg13_vgg8", "cifar100_r32x4_r8x4"]
    env.update(CIFAR_ROOT=str(data.parent), SEEDS="0", METHODS="kd dkd", PAIRS=" ".join(pairs))
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'm.db'}"
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for call, pair in zip(log.read_text().splitlines(), pairs, strict=False):
        overrides = [a for a in shlex.split(call) if "=" in a and not a.startswith("method=")]
        assert f"experiment={pair}" in overrides and "method=kd,dkd" in call
        cfg = compose(*overrides, "method=dkd", tiny=False)  # one job of the sweep
        assert cfg.method.term.beta == DKD_BETA[pair]


# logit standardisation (Sun et al. 2024, sunshangquan/logit-standardization-KD): tools/train.py
# --logit-stand --base-temp 2 --kd-weight 9 sets KD.TEMPERATURE 2, KD.LOSS.KD_WEIGHT 9 (CE 0.1),
# and DKD.ALPHA, DKD.BETA x9 with DKD.T 2; per pair, the runs behind its published tables
# (logs/KD/kd,<T>,<S>,<temp>,<weight>.txt, logs/DKD/dkd,<T>,<S>,<temp>,<weight>[,<beta>].txt)
LS_RECIPES = {
    # experiment: (kd_ls temperature, weight), (dkd_ls temperature, weight, base beta)
    None: ((2.0, 9.0), (2.0, 9.0, 8.0)),
    "cifar100_r56_r20": ((2.0, 9.0), (3.0, 18.0, 2.0)),
    "cifar100_vgg13_vgg8": ((3.0, 9.0), (2.0, 15.0, 2.0)),
    "cifar100_res50_mv2": ((3.0, 1.0), (2.0, 15.0, 2.0)),
    "cifar100_r32x4_r8x4": ((2.0, 9.0), (2.0, 9.0, 8.0)),
    "cifar100_r32x4_shv1": ((2.0, 9.0), (2.0, 9.0, 8.0)),  # not in the paper: the README's recipe
}


def _standardise(z: np.ndarray) -> np.ndarray:
    return (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)


@pytest.mark.parametrize("name", list(LS_RECIPES), ids=str)
def test_logit_standardisation_presets_are_the_published_recipe(name):
    from kdbench.losses import dkd_loss, kd_loss
    from kdbench.methods import build_method
    from kdbench.taps import Outputs

    (kd_t, kd_w), (dkd_t, dkd_w, dkd_beta) = LS_RECIPES[name]
    pair = [f"experiment={name}"] if name else []
    rng = np.random.default_rng(0)
    zs, zt = rng.normal(0, 3, (6, 100)), rng.normal(1, 5, (6, 100))
    y = torch.tensor([0, 5, 7, 99, 3, 3])
    s, t = Outputs(torch.tensor(zs), {}), Outputs(torch.tensor(zt), {})
    ss, tt = torch.tensor(_standardise(zs)), torch.tensor(_standardise(zt))

    kd = build_method(compose(*pair, "method=kd_ls", tiny=False).method)
    terms = kd(s, t, y, epoch=0)
    ce = torch.nn.functional.cross_entropy(torch.tensor(zs), y)  # on the raw logits
    assert terms["ce"].item() == pytest.approx(0.1 * ce.item(), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(kd_w * kd_loss(ss, tt, kd_t).item(), rel=1e-5)
    assert set(terms) == {"ce", "kd"}

    dkd = build_method(compose(*pair, "method=dkd_ls", tiny=False).method)
    terms = dkd(s, t, y, epoch=30)  # after the warm-up
    want = dkd_loss(ss, tt, y, dkd_w * 1.0, dkd_w * dkd_beta, dkd_t)  # alpha, beta x weight
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert terms["dkd_ls"].item() == pytest.approx(want.item(), rel=1e-5)
    assert set(terms) == {"ce", "dkd_ls"}


# CIFAR-100 normalisation: RepDistiller dataset/cifar100.py and mdistiller dataset/cifar100.py,
# transforms.Normalize((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
def test_cifar100_inputs_are_normalised_with_the_reference_constants(tmp_path):
    from kdbench.data.cifar import CIFAR100, write_fake_cifar

    write_fake_cifar(tmp_path, 100, 4, 4)
    dm = CIFAR100(name="cifar100", root=str(tmp_path), data_dir=str(tmp_path), val_size=0)
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[0, :, 0, 0] = torch.tensor([10, 128, 250], dtype=torch.uint8)
    out = dm.batch_transform(x, train=False)[0, :, 0, 0]
    mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
    want = [(v / 255 - m) / s for v, m, s in zip((10, 128, 250), mean, std, strict=True)]
    assert out.tolist() == pytest.approx(want, abs=1e-6)  # float32; the old ones: 1e-3 off

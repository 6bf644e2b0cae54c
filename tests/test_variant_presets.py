"""The CIFAR-100 presets of the issue-14 variants (conf/experiment/cifar100_<variant>_<pair>.yaml):
each composes to the published recipe of its reference code, validates, quotes the published
numbers, and names the reference's networks parameter for parameter. No training here.

Expected values come from the reference code and READMEs (the full record, with file names, is
in the presets' comments):
- TAKD: imirzadeh/Teacher-Assistant-Knowledge-Distillation train.py (SGD momentum 0.9, weight
  decay 1e-4, batch 128, 160 epochs, lr 0.1 x0.1 at epochs/2 and 3/4) and issue #7 (the
  published CIFAR-100 accuracies with lambda 0.15, T 5 for the takd run).
- BYOT: luanyunteng/pytorch-be-your-own-teacher train.py (lr 0.1, x0.1 at 75, 130, 180, 200
  epochs, batch 128, weight decay 5e-4, alpha 0.1, T 3, beta 1e-6 on a batch sum) and its
  README (the paper's ResNet50 exits 68.23 / 74.21 / 75.23 / 80.56, its run 80.64).
- data-free: zju-vipa/CMI README table, datafree_kd.py and scripts/dafl/*.sh (SGD lr 0.1,
  weight decay 1e-4, cosine, 200 epochs x 400 steps, batch 256, T 20; DAFL oh 1, act 0.001,
  balance 20 on a natural log, latent 512, generator Adam 1e-3 betas (0.5, 0.999)),
  train_scratch.py for the teacher (200 epochs, batch 256, lr 0.1, x0.1 at 120/150/180).
- CA-MKD: Rorozhl/CA-MKD scripts/run.sh, setting.py, train_student.py (three resnet32x4 ->
  vgg8, lr 0.05 Nesterov, weight decay 5e-4, batch 64, 240 epochs, x0.1 at 150/180/210, -r 1
  -a 1, kd_T 4).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = CONF / "experiment"

TAKD = "cifar100_takd_r110_r20_r8"
BYOT = "cifar100_byot_resnet50"
DATAFREE = "cifar100_datafree_wrn40_2_wrn16_2"
CAMKD = "cifar100_camkd_r32x4_vgg8"
VARIANT_PRESETS = (TAKD, BYOT, DATAFREE, CAMKD)

# Parameter counts at 100 classes of the reference code's networks, measured from that code
# (TAKD resnet_cifar.py resnet_book; luanyunteng multi_resnet50_kd without its exits; CMI
# datafree/models/classifiers/wresnet.py; CA-MKD models/resnet.py, models/vgg.py).
REFERENCE_PARAMS = {
    "resnet110": 1_736_564,
    "resnet20": 278_324,
    "resnet8": 83_892,
    "resnet50": 23_705_252,
    "wrn_40_2": 2_255_156,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_16_1": 180_916,
    "resnet32x4": 7_433_860,
    "vgg8": 3_965_028,
}


def _text(name: str) -> str:
    return (EXPERIMENTS / f"{name}.yaml").read_text()


def _need_scheme(name: str) -> None:
    """Skip (naming the missing file) while the scheme's config is still being written."""
    path = CONF / "scheme" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"conf/scheme/{name}.yaml does not exist yet (scheme={name})")


def _need_ensemble_weighting() -> None:
    ensemble = OmegaConf.load(CONF / "teacher" / "ensemble.yaml")
    if "weighting" not in ensemble:
        pytest.skip("conf/teacher/ensemble.yaml has no weighting key yet (teacher.weighting)")


def _checked(*overrides: str):
    """The composed preset (no TINY), after every config check a run makes first."""
    from kdbench.validate import check_config

    cfg = compose(*overrides, tiny=False)
    check_config(cfg)
    return cfg


def _common(cfg, text: str, quoted: tuple[str, ...]) -> None:
    assert text.startswith("# @package _global_\n")
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for number in quoted:  # the published numbers are quoted, as the CRD presets do
        assert number in comments, number
    assert cfg.dataset.name == "cifar100"
    assert cfg.dataset.val_size == 0  # the test set is the reported set, as the references
    assert cfg.mlflow.experiment == "cifar100"


def _optim(o, lr, wd, scheduler, milestones=None, momentum=0.9, nesterov=False):
    assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", lr, momentum, wd)
    assert bool(o.get("nesterov", False)) is nesterov
    assert o.scheduler == scheduler
    if milestones is not None:
        assert list(o.milestones) == milestones and o.lr_decay == 0.1


def test_every_preset_is_a_crd_column_or_a_variant_preset():
    from test_experiments import PUBLISHED_PAIRS

    found = {p.stem for p in EXPERIMENTS.glob("cifar100_*.yaml")}  # (text: shakespeare_*, ...)
    assert found - set(PUBLISHED_PAIRS) == set(VARIANT_PRESETS)


def test_takd_preset_is_the_papers_chain_and_recipe():
    _need_scheme("takd")
    cfg = _checked(f"experiment={TAKD}")
    # resnet110 72.38, resnet20 67.03 / 68.11, resnet8 61.37, kd 61.41, takd 61.82 (issue #7)
    _common(cfg, _text(TAKD), ("72.38", "67.03", "68.11", "61.37", "61.41", "61.82"))
    assert cfg.scheme.name == "takd"
    assert [(a.name, a.arch) for a in cfg.scheme.assistants] == [("resnet20", "resnet20")]
    assert (cfg.teacher.arch, cfg.student.arch) == ("resnet110", "resnet8")
    # (1 - lambda) CE + lambda T^2 KL with lambda 0.15, T 5: gamma 1 - 0.15, alpha 0.15
    assert cfg.method.name == "kd"
    assert (cfg.method.gamma, cfg.method.alpha, cfg.method.temperature) == (0.85, 0.15, 5.0)
    _optim(cfg.optim, 0.1, 1e-4, "multistep", [160 // 2, 160 * 3 // 4])
    assert (cfg.trainer.max_epochs, cfg.dataset.batch_size) == (160, 128)
    # the teacher is trained by the same script with the same settings
    assert (cfg.teacher.epochs, cfg.teacher.batch_size) == (160, 128)
    _optim(cfg.teacher.optim, 0.1, 1e-4, "multistep", [80, 120])
    # the plain-kd control of the same table row (lambda 0.2, T 2 -> 61.41), as the preset says
    control = _checked(
        f"experiment={TAKD}",
        "scheme=offline",
        "~scheme.assistants",
        "method.gamma=0.8",
        "method.alpha=0.2",
        "method.temperature=2",
    )
    assert control.scheme.name == "offline" and "assistants" not in control.scheme
    assert (control.method.alpha, control.method.temperature) == (0.2, 2.0)


def test_byot_preset_is_the_reproduced_resnet50_recipe():
    _need_scheme("byot")
    from kdbench.modelspec import model_name

    cfg = _checked(f"experiment={BYOT}")
    # paper exits 68.23 / 74.21 / 75.23 / 80.56, the reimplementation's deepest exit 80.64
    _common(cfg, _text(BYOT), ("68.23", "74.21", "75.23", "80.56", "80.64"))
    assert cfg.scheme.name == "byot"
    assert cfg.student.arch == "resnet50" and model_name(cfg.student) == "resnet50"
    # (1 - a) CE + a T^2 KD with a = 0.1, T = 3
    assert (cfg.method.name, cfg.method.gamma, cfg.method.alpha) == ("kd", 0.9, 0.1)
    assert cfg.method.temperature == 3.0
    # beta 1e-6 on a sum over a batch of 128 = 1e-6 * 128 on kdbench's per-sample mean
    assert cfg.scheme.feature_weight == pytest.approx(1e-6 * 128)
    _optim(cfg.optim, 0.1, 5e-4, "multistep", [75, 130, 180])
    assert (cfg.trainer.max_epochs, cfg.dataset.batch_size) == (200, 128)


def test_datafree_preset_is_cmis_dafl_recipe_and_its_columns_compose():
    _need_scheme("datafree")
    cfg = _checked(f"experiment={DATAFREE}")
    # CMI table, wrn40_2 -> wrn16_2: T 75.83, S 73.56, DAFL 40.00, DeepInv 61.34, CMI 68.75
    quoted = ("75.83", "73.56", "40.00", "61.34", "68.75", "22.50", "34.66")
    _common(cfg, _text(DATAFREE), quoted)
    assert cfg.scheme.name == "datafree"
    assert (cfg.teacher.arch, cfg.student.arch) == ("wrn_40_2", "wrn_16_2")
    s = cfg.scheme
    assert (s.steps_per_epoch, s.batch_size, s.latent_dim) == (400, 256, 512)
    assert (s.one_hot, s.activation, s.bn_weight) == (1.0, 0.001, 0.0)
    # CMI: balance 20 * sum p ln p; kdbench: entropy * sum p log10 p, and ln p = ln 10 * log10 p
    assert s.entropy == pytest.approx(20 * math.log(10), abs=0.01)
    g = s.generator_optim
    assert (g.name, g.lr, list(g.betas), g.scheduler) == ("adam", 1e-3, [0.5, 0.999], "none")
    # KLDiv(T=20): T^2 KL, no CE
    assert (cfg.method.gamma, cfg.method.alpha, cfg.method.temperature) == (0.0, 1.0, 20.0)
    _optim(cfg.optim, 0.1, 1e-4, "cosine")
    assert cfg.trainer.max_epochs == 200
    assert (cfg.teacher.epochs, cfg.teacher.batch_size) == (200, 256)
    _optim(cfg.teacher.optim, 0.1, 1e-4, "multistep", [120, 150, 180])
    # the table's other zoo columns, as the preset's comment gives them
    assert _checked(f"experiment={DATAFREE}", "student=wrn_40_1").student.arch == "wrn_40_1"
    narrow = _checked(f"experiment={DATAFREE}", "student.arch=wrn_16_1")
    assert narrow.student.arch == "wrn_16_1"


def test_camkd_preset_is_the_reference_pair_and_recipe():
    _need_ensemble_weighting()
    cfg = _checked(f"experiment={CAMKD}")
    _common(cfg, _text(CAMKD), ())
    t = cfg.teacher
    assert (t.arch, t.weighting) == ("ensemble", "ca_mkd")
    assert [(m.arch, m.seed) for m in t.members] == [("resnet32x4", s) for s in (0, 1, 2)]
    assert (t.epochs, t.batch_size) == (240, 64)
    _optim(t.optim, 0.05, 5e-4, "multistep", [150, 180, 210])
    assert cfg.student.arch == "vgg8" and cfg.scheme.name == "offline"
    # -r 1 -a 1, kd_T 4; the reference divides sum_k w_k KL_k (sum_k w_k = 1) by batch x K:
    # a / K = 1 / 3 on kdbench's weights, which sum to 1 and are not divided by K
    assert (cfg.method.gamma, cfg.method.temperature) == (1.0, 4.0)
    assert cfg.method.alpha == pytest.approx(1 / 3)
    _optim(cfg.optim, 0.05, 5e-4, "multistep", [150, 180, 210], nesterov=True)
    assert (cfg.trainer.max_epochs, cfg.dataset.batch_size) == (240, 64)
    # the AVER (plain mean of the KD terms: 1) and EBKD rows (weights summing to K - 1, divided
    # by K: (K - 1) / K = 2 / 3) of the same table, with the preset's commands
    for weighting, alpha in (("mean", "1"), ("entropy", "0.6666666666666666")):
        other = _checked(
            f"experiment={CAMKD}", f"teacher.weighting={weighting}", f"method.alpha={alpha}"
        )
        assert (other.teacher.weighting, other.method.alpha) == (weighting, float(alpha))
        assert f"teacher.weighting={weighting}" in _text(CAMKD)


def _networks(cfg) -> set[str]:
    specs = [cfg.student, *(cfg.teacher.get("members") or [cfg.teacher])]
    specs += list(cfg.scheme.get("assistants") or [])
    return {spec.arch for spec in specs}


def test_the_presets_networks_are_the_reference_code_networks():
    from kdbench.models import create_model

    named = set()
    for name in VARIANT_PRESETS:
        try:
            named |= _networks(compose(f"experiment={name}", tiny=False))
        except Exception as exc:  # noqa: BLE001 - a scheme config still being written
            if "Could not find 'scheme/" not in str(exc):
                raise
    # every network a preset names (the teacher slot too: a run builds it) is a reference one
    assert named <= set(REFERENCE_PARAMS)
    counts = {}
    for arch in REFERENCE_PARAMS:
        model = create_model(arch, num_classes=100, input_shape=(3, 32, 32))
        counts[arch] = sum(p.numel() for p in model.parameters())
    assert counts == REFERENCE_PARAMS


def test_cfg_job_prints_a_variant_preset(tmp_path):
    """The README's way to see what a preset sets: --cfg job --resolve through the CLI."""
    _need_scheme("byot")
    proc = subprocess.run(
        [sys.executable, "-m", "kdbench", "--cfg", "job", "--resolve", f"experiment={BYOT}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert (cfg.scheme.name, cfg.student.arch, cfg.trainer.max_epochs) == ("byot", "resnet50", 200)
    assert list(cfg.optim.milestones) == [75, 130, 180]

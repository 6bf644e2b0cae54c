"""Adversarial distillation (``method=adversarial``) and data-free distillation
(``scheme=datafree``, DAFL + DeepInversion's BatchNorm prior), issue #14.

The losses are checked against values worked out by hand from their formulas (the arithmetic is
in the comments); the CLI runs check what a user sees: the discriminator's accuracy per epoch,
its parameters counted as auxiliary and not the student's, both directions of an online run,
and a data-free run that never reads the real training set once the teacher is ready (a guard
installed in the subprocess records every read of it; the same guard sees the offline run's).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import mlflow_runs, run_cli

from kdbench.losses import (
    adversarial_generator_loss,
    bn_statistics_loss,
    dafl_activation_loss,
    dafl_entropy_loss,
    dafl_one_hot_loss,
    discriminator_accuracy,
    discriminator_loss,
)
from kdbench.methods import AdversarialTerm, Method
from kdbench.schemes.datafree import Generator
from kdbench.taps import Outputs

LN3 = math.log(3.0)


# --------------------------------------------------------------------------------------------
# pure losses, by hand
# --------------------------------------------------------------------------------------------


def test_discriminator_and_generator_losses_by_hand():
    # scores 0 and ln 3 are D = sigmoid(.) = 1/2 and 3/4; -ln 3 is 1/4
    real, fake = torch.tensor([0.0, LN3]), torch.tensor([0.0, -LN3])
    # -(mean log D(real)) = (ln 2 + ln 4/3) / 2 ; -(mean log(1 - D(fake))) = (ln 2 + ln 4/3) / 2
    assert discriminator_loss(real, fake).item() == pytest.approx(math.log(8 / 3), rel=1e-6)
    # the student on D = 1/2, 3/4: non-saturating -mean log D = (ln 2 + ln 4/3) / 2 = ln(8/3)/2;
    # saturating mean log(1 - D) = (ln 1/2 + ln 1/4) / 2 = -1.5 ln 2
    assert adversarial_generator_loss(real).item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-6)
    assert adversarial_generator_loss(real, saturating=True).item() == pytest.approx(
        -1.5 * math.log(2), rel=1e-6
    )
    # right: real scores > 0 (1, 2 of 1, -1, 2), fake < 0 (-3 of -3, 0.5): 3 of 5
    acc = discriminator_accuracy(torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-3.0, 0.5]))
    assert acc.item() == pytest.approx(0.6)


def test_dafl_terms_by_hand():
    # row 1 softmax(ln 3, 0, 0) = (3/5, 1/5, 1/5): CE to class 0 = ln(5/3);
    # row 2 softmax(0, 0, ln 4) = (1/6, 1/6, 4/6): CE to class 2 = ln(3/2); mean = ln(5/2) / 2
    z = torch.tensor([[LN3, 0.0, 0.0], [0.0, 0.0, math.log(4.0)]])
    assert dafl_one_hot_loss(z).item() == pytest.approx(math.log(2.5) / 2, rel=1e-6)
    # -mean |f| = -(1 + 2 + 3 + 4) / 4
    f = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    assert dafl_activation_loss(f).item() == pytest.approx(-2.5)
    # softmax rows (1/2, 1/2) and (3/4, 1/4): pbar = (5/8, 3/8); loss = sum pbar log_b pbar
    z = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    nats = 5 / 8 * math.log(5 / 8) + 3 / 8 * math.log(3 / 8)  # = -0.6616
    assert dafl_entropy_loss(z).item() == pytest.approx(nats / math.log(10), rel=1e-6)
    assert dafl_entropy_loss(z, base=math.e).item() == pytest.approx(nats, rel=1e-6)


def test_bn_statistics_loss_by_hand():
    # B=2, C=2, L=2. channel 0: 1, 3, 5, 7 -> mean 4, biased var (9 + 1 + 1 + 9) / 4 = 5;
    # channel 1: 0, 0, 2, 2 -> mean 1, var 1. Against mean (4, 0), var (1, 1):
    # ||(0, 1)|| + ||(4, 0)|| = 1 + 4
    x = torch.tensor([[[1.0, 3.0], [0.0, 0.0]], [[5.0, 7.0], [2.0, 2.0]]])
    loss = bn_statistics_loss(x, torch.tensor([4.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx(5.0)
    # vectors (B x C): means (2, 4), vars (1, 4); against 0 and (1, 4): sqrt(2^2 + 4^2) + 0
    v = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    loss = bn_statistics_loss(v, torch.zeros(2), torch.tensor([1.0, 4.0]))
    assert loss.item() == pytest.approx(math.sqrt(20.0), rel=1e-6)


# --------------------------------------------------------------------------------------------
# the adversarial term: who gets which gradient, what the method returns
# --------------------------------------------------------------------------------------------


def test_adversarial_term_routes_each_loss_to_its_own_side():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(6, 10, generator=g, requires_grad=True)
    zt = torch.randn(6, 10, generator=g) * 3
    term = AdversarialTerm(hidden=[8])
    term.build("adversarial", Outputs(zs), Outputs(zt), "mlp", "cnn1d")
    assert term.disc.own_optim["lr"] == 2e-4  # D is trained by an optimizer of its own
    method = Method("adversarial", "response", 0.1, 0.9, 2.0, 4.0, term)
    terms = method.distill_terms(Outputs(zs), Outputs(zt), torch.full((6,), -1), 0)
    assert set(terms) == {"kd", "adversarial", "disc", "disc_acc#"}
    d = list(term.disc.parameters())
    # the student's adversarial loss moves the student, never D
    grads = torch.autograd.grad(terms["adversarial"], [zs, *d], allow_unused=True)
    assert grads[0].abs().sum() > 0 and all(gr is None for gr in grads[1:])
    # D's loss moves D, never the student
    grads = torch.autograd.grad(terms["disc"], [zs, *d], allow_unused=True)
    assert grads[0] is None and all(gr is not None for gr in grads[1:])
    with torch.no_grad():  # the values are the formulas on D's scores, beta on the student side
        real, fake = term.disc(zt), term.disc(zs)
    assert terms["adversarial"].item() == pytest.approx(
        2.0 * adversarial_generator_loss(fake).item(), rel=1e-5
    )
    assert terms["disc"].item() == pytest.approx(discriminator_loss(real, fake).item(), rel=1e-5)
    assert terms["disc_acc#"].item() == discriminator_accuracy(real, fake).item()


@pytest.mark.parametrize("shape", [(1, 40), (1, 37), (3, 32, 32)])
def test_generator_makes_inputs_of_the_data_shape(shape):
    z = torch.randn(4, 100)
    x = Generator(100, shape, width=16)(z)
    assert tuple(x.shape) == (4, *shape)
    # the last BatchNorm has no affine parameters: each channel standardised over the batch
    dims = [0, *range(2, x.dim())]
    assert torch.allclose(x.mean(dims), torch.zeros(shape[0]), atol=1e-4)


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------

# Installed in the CLI subprocess (sitecustomize on PYTHONPATH): once the run's Runner exists
# (the teacher resolved: trained or loaded), every read of the real training or transfer set of
# any data module is written to the file KDBENCH_TEST_REAL_DATA_LOG.
GUARD = """
import os


def _install():
    import kdbench.run as run

    log = os.environ["KDBENCH_TEST_REAL_DATA_LOG"]
    init = run.Runner.__init__

    def watch(name):
        def get(obj):
            if name not in obj.__dict__:
                raise AttributeError(name)
            with open(log, "a") as f:
                f.write(name + "\\n")
            return obj.__dict__[name]

        def put(obj, value):
            obj.__dict__[name] = value

        return property(get, put)

    def watched_init(self, *args, **kwargs):
        from kdbench.data.base import ArrayDataModule

        for name in ("train_x", "train_y", "transfer_x"):
            setattr(ArrayDataModule, name, watch(name))
        init(self, *args, **kwargs)

    run.Runner.__init__ = watched_init


_install()
"""

FAST = ["efficiency.enabled=false"]


def _guarded(tmp_path, *args):
    """``python -m kdbench ARGS`` with the guard; returns the process and the reads it saw."""
    (tmp_path / "guard").mkdir()
    (tmp_path / "guard" / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "reads.txt"
    path = os.pathsep.join(p for p in (str(tmp_path / "guard"), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "KDBENCH_TEST_REAL_DATA_LOG": str(log)}
    proc = run_cli(*FAST, *args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, set(log.read_text().split()) if log.exists() else set()


def _run(experiment):
    client, runs = mlflow_runs(experiment)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return client, runs[0]


def test_adversarial_offline_logs_disc_acc_and_counts_d_as_aux(tmp_path):
    _, reads = _guarded(tmp_path, "method=adversarial", "mlflow.experiment=v14-adv")
    assert "train_x" in reads  # the guard sees an ordinary run read its training set
    client, run = _run("v14-adv")
    m = run.data.metrics
    history = client.get_metric_history(run.info.run_id, "train/disc_acc")
    assert len(history) == 2 and all(0 <= h.value <= 1 for h in history)  # one per epoch
    # the metric is not optimised: the total is the sum of the loss terms alone
    parts = m["train/ce"] + m["train/kd"] + m["train/adversarial"] + m["train/disc"]
    assert m["train/loss"] == pytest.approx(parts, rel=1e-4)
    # D on the 10 logits, hidden [64, 64]: (10*64 + 64) + (64*64 + 64) + (64*1 + 1) = 4929
    assert m["aux/params"] == 4929
    # the student is kd's MLP [100, 100] on 40 inputs, nothing added:
    # (40*100 + 100) + (100*100 + 100) + (100*10 + 10) = 15210
    assert m["student/params"] == 15210


def test_adversarial_online_has_a_discriminator_per_direction(tmp_path):
    proc = run_cli(
        *FAST,
        "method=adversarial",
        "scheme=online",
        "mlflow.experiment=v14-adv-online",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, run = _run("v14-adv-online")
    for peer in ("student", "teacher"):
        assert 0 <= run.data.metrics[f"train/{peer}/disc_acc"] <= 1
        assert f"train/{peer}/disc" in run.data.metrics


def test_datafree_trains_on_generated_inputs_only(tmp_path):
    _, reads = _guarded(
        tmp_path,
        "scheme=datafree",
        "scheme.steps_per_epoch=4",
        "scheme.batch_size=32",
        "scheme.generator_width=16",
        "scheme.reference.none_acc=0.05",
        "scheme.reference.kd_acc=0.5",
        "mlflow.experiment=v14-datafree",
    )
    assert reads == set()  # not one read of the real training or transfer set
    _, run = _run("v14-datafree")
    m, tags = run.data.metrics, run.data.tags
    assert tags["training_data"].startswith("generated")
    assert tags["datafree_bn_prior"].startswith("on (")  # cnn1d has BatchNorm1d layers
    gen = ["train/gen/one_hot", "train/gen/activation", "train/gen/entropy", "train/gen/bn"]
    assert "train/ce" not in m  # generated samples have no labels
    assert m["train/loss"] == pytest.approx(m["train/kd"] + sum(m[k] for k in gen), rel=1e-4)
    assert m["train/gen/entropy"] < 0 and m["train/gen/activation"] < 0  # both negated
    assert 0 <= m["test/acc"] <= 1 and "teacher/test/acc" in m
    assert m["datafree/recovered"] == pytest.approx((m["test/acc"] - 0.05) / 0.45, rel=1e-6)
    # G (width 16, latent 100, length 40: maps of 10, 20, 40) is aux, kd has no term:
    # l1 100*160 + 160 = 16160; bn0 32; conv 16*16*3 + 16 = 784, bn 32;
    # conv 16*8*3 + 8 = 392, bn 16; conv 8*1*3 + 1 = 25; last bn no affine: 17441
    assert m["aux/params"] == 17441


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["method=adversarial", "method.term.on=stages"], "method.term.on='stages'"),
        (["scheme=datafree", "method=none"], "method='none'"),
    ],
)
def test_bad_options_are_refused_in_one_line(tmp_path, overrides, named):
    proc = run_cli(*overrides, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("kdbench: error:") and named in lines[0]

"""Issue #14, self-distillation variants and weighted teachers: Tf-KD's virtual teacher
(``method=tfkd``), per-sample ensemble weights (``teacher.weighting=mean|entropy|ca_mkd``) and
PS-KD / DLB (``scheme=pskd``).

Every expected value of a loss or weighting is worked out by hand in the comments and written as
plain arithmetic here (``math``), never captured from the implementation. The CLI runs drive
``python -m kdbench`` as the README does, in a fresh directory with their own cache and store.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_NO_TEACHER, compose, mlflow_runs, run_cli

from kdbench.losses import (
    ca_mkd_weights,
    entropy_weights,
    kd_loss,
    pskd_loss,
    tfkd_loss,
    virtual_teacher_probs,
    weighted_kd_loss,
    weighted_mixture_logits,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-5, abs=1e-7)


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def entropy(p: list[float]) -> float:
    return -sum(a * math.log(a) for a in p if a > 0)


# --------------------------------------------------------------------------------------------
# Tf-KD: the virtual teacher
# --------------------------------------------------------------------------------------------


def test_virtual_teacher_puts_a_on_the_label_and_the_rest_evenly() -> None:
    # K = 4, a = 0.7: the label's class 0.7, each of the 3 others (1 - 0.7) / 3 = 0.1
    probs = virtual_teacher_probs(torch.tensor([2, 0]), 4, 0.7)
    assert probs.tolist()[0] == [approx(0.1), approx(0.1), approx(0.7), approx(0.1)]
    assert probs.tolist()[1] == [approx(0.7), approx(0.1), approx(0.1), approx(0.1)]


def test_tfkd_reference_form_by_hand() -> None:
    # K = 3, a = 0.9 -> p^d of label 0 = [0.9, 0.05, 0.05]; T = 2.
    # reference code: P = softmax(p^d / T) = softmax([0.45, 0.025, 0.025])
    #   = [e^0.45, e^0.025, e^0.025] / (e^0.45 + 2 e^0.025)
    #   = [1.568312, 1.025315, 1.025315] / 3.618942
    #   = [0.433362, 0.283319, 0.283319]
    # row 0: z = [1, 0, 0] -> q = [e, 1, 1] / (e + 2) = [0.576117, 0.211942, 0.211942]
    # row 1: label 2, z = [0, 0, 0] -> q = [1/3] * 3, P reversed: [0.283319, 0.283319, 0.433362]
    # row 2: label -1 (transfer sample): skipped.
    # loss = mean over the 2 labelled rows of KL(P || q) / K (nn.KLDivLoss's mean over B x K)
    e = math.e
    big, small = math.exp(0.45), math.exp(0.025)
    p0 = [big / (big + 2 * small), small / (big + 2 * small), small / (big + 2 * small)]
    assert p0[0] == pytest.approx(0.433362, abs=1e-6)
    q0 = [e / (e + 2), 1 / (e + 2), 1 / (e + 2)]
    row0 = kl(p0, q0) / 3
    row1 = kl([p0[1], p0[2], p0[0]], [1 / 3] * 3) / 3
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, -5.0, 0.0]], requires_grad=True)
    got = tfkd_loss(z, torch.tensor([0, 2, -1]), 0.9, 2.0, form="reference")
    assert got.item() == approx((row0 + row1) / 2)
    got.backward()
    assert z.grad[2].abs().sum().item() == 0.0  # the unlabelled row takes no part
    only_unlabelled = tfkd_loss(z[2:], torch.tensor([-1]), 0.9, 2.0)
    assert only_unlabelled.item() == 0.0


def test_tfkd_kd_form_by_hand() -> None:
    # METHODS.md's form: T^2 KL(softmax(log p^d / T) || softmax(z / T)), T = 2, a = 0.9, K = 3.
    # softmax(log p / 2) is proportional to sqrt(p): sqrt(0.9) = 0.948683, sqrt(0.05) = 0.223607
    #   -> [0.948683, 0.223607, 0.223607] / 1.395897 = [0.679623, 0.160189, 0.160189]
    # z = [1, 0, 0] at T = 2: softmax([0.5, 0, 0]) = [1.648721, 1, 1] / 3.648721
    #   = [0.451863, 0.274069, 0.274069]
    # loss = 4 * KL = 4 * (0.679623 ln(0.679623/0.451863) + 2 * 0.160189 ln(0.160189/0.274069))
    s9, s05 = math.sqrt(0.9), math.sqrt(0.05)
    p = [s9 / (s9 + 2 * s05), s05 / (s9 + 2 * s05), s05 / (s9 + 2 * s05)]
    r = math.exp(0.5)
    q = [r / (r + 2), 1 / (r + 2), 1 / (r + 2)]
    assert p[0] == pytest.approx(0.679623, abs=1e-6) and q[0] == pytest.approx(0.451863, abs=1e-6)
    expected = 4 * kl(p, q)
    got = tfkd_loss(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([0]), 0.9, 2.0, form="kd")
    assert got.item() == approx(expected)


# --------------------------------------------------------------------------------------------
# PS-KD: the progressively refined target
# --------------------------------------------------------------------------------------------


def test_pskd_loss_by_hand() -> None:
    # K = 3, a_t = 0.5.
    # row 0: y = 1, previous prediction [0.2, 0.3, 0.5]
    #   target = 0.5 [0, 1, 0] + 0.5 [0.2, 0.3, 0.5] = [0.1, 0.65, 0.25]
    #   z = [0, ln 2, 0] -> q = [1, 2, 1] / 4 -> CE = -(0.1 ln 1/4 + 0.65 ln 1/2 + 0.25 ln 1/4)
    #   = 0.35 ln 4 + 0.65 ln 2 = 1.35 ln 2 = 0.935749
    # row 1: y = -1 (unlabelled): no target, not counted.
    # row 2: y = 0, no previous prediction (has_prev False): target = onehot [1, 0, 0]
    #   z = [ln 3, 0, 0] -> q = [3, 1, 1] / 5 -> CE = -ln 0.6 = 0.510826
    # loss = (0.935749 + 0.510826) / 2 = 0.723287
    z = torch.tensor([[0.0, LN2, 0.0], [9.0, 0.0, 0.0], [LN3, 0.0, 0.0]])
    prev = torch.tensor([[0.2, 0.3, 0.5], [0.3, 0.3, 0.4], [0.1, 0.1, 0.8]])
    has = torch.tensor([True, True, False])
    expected = (1.35 * LN2 - math.log(0.6)) / 2
    assert expected == pytest.approx(0.723287, abs=1e-6)
    assert pskd_loss(z, torch.tensor([1, -1, 0]), prev, 0.5, has).item() == approx(expected)
    # a_t = 0: plain cross-entropy on the labelled rows: (ln 2 + ln(5/3)) / 2
    plain = pskd_loss(z, torch.tensor([1, -1, 0]), prev, 0.0)
    assert plain.item() == approx((LN2 + math.log(5 / 3)) / 2)


# --------------------------------------------------------------------------------------------
# multi-teacher weights
# --------------------------------------------------------------------------------------------

# three members, two classes, one sample: p_0 = [3/4, 1/4], p_1 = [1/2, 1/2], p_2 = [1/4, 3/4]
MEMBERS = torch.tensor([[[LN3, 0.0], [0.0, 0.0], [0.0, LN3]]])


def test_entropy_weights_by_hand() -> None:
    # H_0 = H_2 = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.562335, H_1 = ln 2 = 0.693147
    # sum H = 1.817817; w_k = (1 - H_k / sum H) / (K - 1), K - 1 = 2:
    #   w_0 = w_2 = (1 - 0.309346) / 2 = 0.345327, w_1 = (1 - 0.381308) / 2 = 0.309346
    # (METHODS.md's 1 - H_k / sum H would sum to K - 1 = 2: divided by 2 they sum to 1)
    h = entropy([0.75, 0.25])
    assert h == pytest.approx(0.562335, abs=1e-6)
    total = 2 * h + LN2
    expected = [(1 - h / total) / 2, (1 - LN2 / total) / 2, (1 - h / total) / 2]
    got = entropy_weights(MEMBERS)[0].tolist()
    assert got == [approx(v) for v in expected]
    assert sum(got) == approx(1.0)
    # every member certain (float32 one-hot: H = 0 for all): equal weights 1/K
    certain = torch.tensor([[[100.0, -100.0], [100.0, -100.0]]])
    assert entropy_weights(certain)[0].tolist() == [0.5, 0.5]


def test_ca_mkd_weights_by_hand() -> None:
    # label 0: CE_k = -ln p_k[0] = [ln(4/3), ln 2, ln 4] -> e^CE = [4/3, 2, 4], sum 22/3
    #   softmax over members = [4/22, 6/22, 12/22] = [0.181818, 0.272727, 0.545455]
    #   w = (1 - softmax) / (K - 1) = [18/44, 16/44, 10/44] = [0.409091, 0.363636, 0.227273]
    got = ca_mkd_weights(MEMBERS, torch.tensor([0]))[0].tolist()
    assert got == [approx(18 / 44), approx(16 / 44), approx(10 / 44)]
    # two members, label 0: p = [3/4, 1/4] and [1/2, 1/2] -> e^CE = [4/3, 2] -> softmax
    #   [0.4, 0.6] -> w = (1 - [0.4, 0.6]) / 1 = [0.6, 0.4]
    two = ca_mkd_weights(MEMBERS[:, :2], torch.tensor([0]))[0].tolist()
    assert two == [approx(0.6), approx(0.4)]
    # unlabelled (y = -1): the ensemble's prediction stands in for the label. Members
    # [3/4, 1/4], [3/4, 1/4], [1/4, 3/4]: mean [7/12, 5/12] -> class 0; e^CE = [4/3, 4/3, 4]
    #   -> softmax [0.2, 0.2, 0.6] -> w = (1 - s) / 2 = [0.4, 0.4, 0.2]
    members = torch.tensor([[[LN3, 0.0], [LN3, 0.0], [0.0, LN3]]])
    unlabelled = ca_mkd_weights(members, torch.tensor([-1]))[0].tolist()
    assert unlabelled == [approx(0.4), approx(0.4), approx(0.2)]


def test_weighted_mixture_trains_like_the_weighted_sum_of_member_kl() -> None:
    # members p_0 = [3/4, 1/4], p_1 = [1/2, 1/2] (T = 1), weights [0.6, 0.4]
    # mixture p_w = 0.6 [0.75, 0.25] + 0.4 [0.5, 0.5] = [0.65, 0.35]
    # student z = [0, 0] -> q = [1/2, 1/2]:
    #   METHODS.md:  sum_k w_k KL(p_k || q) = 0.6 (0.75 ln 1.5 + 0.25 ln 0.5) + 0.4 * 0
    #              = 0.6 * 0.130812 = 0.078487
    #   kdbench:     KL(p_w || q) = 0.65 ln 1.3 + 0.35 ln 0.7 = 0.045701
    #   difference:  H(p_w) - sum_k w_k H(p_k) = 0.647447 - (0.6 * 0.562335 + 0.4 * ln 2)
    #              = 0.647447 - 0.614660 = 0.032787 (free of the student: same gradient)
    members = MEMBERS[:, :2]
    w = torch.tensor([[0.6, 0.4]])
    mix = weighted_mixture_logits(members, w, 1.0)
    assert mix.softmax(1)[0].tolist() == [approx(0.65), approx(0.35)]
    literal = 0.6 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert literal == pytest.approx(0.078487, abs=1e-6)
    z1 = torch.zeros(1, 2, requires_grad=True)
    z2 = torch.zeros(1, 2, requires_grad=True)
    a, b = weighted_kd_loss(z1, members, w, 1.0), kd_loss(z2, mix, 1.0)
    assert a.item() == approx(literal)
    assert b.item() == approx(0.65 * math.log(1.3) + 0.35 * math.log(0.7))
    gap = entropy([0.65, 0.35]) - (0.6 * entropy([0.75, 0.25]) + 0.4 * LN2)
    assert gap == pytest.approx(0.032787, abs=1e-6)
    assert (a - b).item() == approx(gap)
    a.backward(), b.backward()
    # dL/dz = q - p_w = [0.5 - 0.65, 0.5 - 0.35] for both forms
    assert z1.grad[0].tolist() == [approx(-0.15), approx(0.15)]
    assert z2.grad[0].tolist() == [approx(-0.15), approx(0.15)]
    # T = 2: softmax(mixture / T) = 0.6 softmax([ln 3, 0] / 2) + 0.4 [1/2, 1/2]
    #   softmax([ln 3 / 2, 0]) = [sqrt 3, 1] / (sqrt 3 + 1) = [0.633975, 0.366025]
    #   -> [0.6 * 0.633975 + 0.2, ...] = [0.580385, 0.419615]
    soft = (weighted_mixture_logits(members, w, 2.0) / 2).softmax(1)[0].tolist()
    r3 = math.sqrt(3)
    assert soft == [approx(0.6 * r3 / (r3 + 1) + 0.2), approx(0.6 / (r3 + 1) + 0.2)]


# --------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------


def _cli(tmp_path: Path, *args: str, base: list[str] = TINY):
    """``python -m kdbench`` with the ``base`` overrides, its own store and cache in tmp_path."""
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "KDBENCH_CACHE_DIR": str(tmp_path / "cache"),
    }
    overrides = (*base, *args, "efficiency.enabled=false")
    return run_cli(*overrides, cwd=tmp_path, env=env, tiny=False)


def _history(client, run, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=_step)]


def _step(m):
    return m.step


def test_tfkd_trains_no_teacher(tmp_path) -> None:
    proc = _cli(tmp_path, "method=tfkd", "mlflow.experiment=tfkd")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs("tfkd", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = runs
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "tfkd"
    assert run.data.tags["teacher_source"] == "none"  # neither trained nor loaded
    assert not (tmp_path / "cache" / "teachers").exists()
    assert "teacher/test/acc" not in m and "test/agreement" not in m  # no teacher evaluated
    assert m["train/tfkd"] > 0 and m["train/ce"] > 0 and "train/kd" not in m
    assert 0 <= m["test/acc"] <= 1
    assert run.data.params["method.term.correct_prob"] == "0.99"


def test_ensemble_ca_mkd_weights_are_logged(tmp_path) -> None:
    members = (
        "teacher.members=[{arch: mlp, kwargs: {hidden: [16]}, seed: 0},"
        "{arch: mlp, kwargs: {hidden: [8]}, seed: 1}]"
    )
    proc = _cli(
        tmp_path,
        "teacher=ensemble",
        "teacher.weighting=ca_mkd",
        members,
        "mlflow.experiment=camkd",
        base=TINY_NO_TEACHER,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs("camkd", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.params["teacher.weighting"] == "ca_mkd"
    w0 = _history(client, run, "train/teacher_weight/0")
    w1 = _history(client, run, "train/teacher_weight/1")
    assert len(w0) == len(w1) == 2  # one mean per epoch and member
    for a, b in zip(w0, w1, strict=True):
        assert 0 < a < 1 and 0 < b < 1 and a + b == pytest.approx(1.0, abs=1e-5)
    assert w0[0] != pytest.approx(0.5, abs=1e-4)  # per-sample confidence, not the mean
    assert run.data.metrics["train/kd"] > 0 and 0 <= run.data.metrics["teacher/test/acc"] <= 1


def test_pskd_and_dlb_run(tmp_path) -> None:
    proc = _cli(
        tmp_path,
        "-m",
        "scheme=pskd",
        "scheme.targets=epoch,last_batch",
        "trainer.max_epochs=3",
        "mlflow.experiment=pskd",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs("pskd", f"sqlite:///{tmp_path / 'mlflow.db'}")
    by_targets = {r.data.params["scheme.targets"]: r for r in runs}
    assert set(by_targets) == {"epoch", "last_batch"}
    assert not (tmp_path / "cache" / "teachers").exists()  # no teacher network anywhere
    for targets, run in by_targets.items():
        assert run.info.status == "FINISHED" and run.data.tags["scheme"] == "pskd"
        assert run.data.tags["teacher_source"] == "none"
        # a_t = 0.8 t / 3 at epochs t = 1, 2, 3
        alphas = _history(client, run, "train/pskd_alpha")
        assert alphas == [approx(0.8 / 3), approx(1.6 / 3), approx(0.8)]
        kd = _history(client, run, "train/kd")
        # epoch: KD from the previous epoch's predictions from the second epoch on;
        # last_batch: from the second step on (the previous batch is taught), every epoch
        assert len(kd) == (2 if targets == "epoch" else 3), (targets, kd)
        assert all(v >= 0 for v in kd) and run.data.metrics["train/ce"] > 0
        assert 0 <= run.data.metrics["test/acc"] <= 1
        assert "teacher/test/acc" not in run.data.metrics


@pytest.mark.parametrize(
    "args, key",
    [
        (("teacher=ensemble", "teacher.weighting=median", *TINY_NO_TEACHER), "teacher.weighting"),
        (("method=tfkd", "method.term.correct_prob=1.5"), "method.term.correct_prob"),
        (("method=tfkd", "method.term.form=paper"), "method.term.form"),
        (("scheme=pskd", "scheme.targets=batch"), "scheme.targets"),
        (("scheme=pskd", "scheme.alpha_T=1.5"), "scheme.alpha_T"),
    ],
)
def test_bad_values_are_one_line(tmp_path, args, key) -> None:
    proc = _cli(tmp_path, *args, base=[])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"kdbench: error: {key}="), lines
    assert not (tmp_path / "cache" / "teachers").exists()


def test_teacher_free_is_only_the_virtual_teacher() -> None:
    from kdbench.errors import KdbenchError
    from kdbench.run import prepare

    tf = prepare(compose("method=tfkd"))
    assert tf.method.teacher_free and not tf.method.uses_teacher and tf.info["teacher_free"]
    assert not tf.dm.use_transfer  # no teacher: the unlabelled transfer set is not used
    kd_too = prepare(compose("method=tfkd", "method.alpha=0.5"))  # + KD from a real teacher
    assert kd_too.method.uses_teacher and not kd_too.info["teacher_free"]
    none = prepare(compose("method=none"))  # no distillation, but compared with its teacher
    assert not none.method.teacher_free and not none.info["teacher_free"]
    ens = prepare(compose("teacher=ensemble", "teacher.weighting=entropy", tiny=TINY_NO_TEACHER))
    assert ens.teacher.weighting == "entropy"
    # (in-process: the same KdbenchError the CLI prints as one line, exit 2)
    with pytest.raises(KdbenchError, match=r"^method='fitnet' is invalid: reads teacher feat"):
        prepare(compose("scheme=pskd", "method=fitnet"))
    with pytest.raises(KdbenchError, match=r"^method='tfkd' is invalid: scheme=pskd teaches"):
        prepare(compose("scheme=pskd", "method=tfkd"))


def test_pskd_bank_goes_with_the_checkpoint() -> None:
    from kdbench.run import prepare
    from kdbench.schemes.pskd import PSKD

    ctx = prepare(compose("scheme=pskd", "scheme.targets=last_batch"))
    module = PSKD(ctx.student, ctx.method, ctx.cfg.optim, num_samples=7, num_classes=10)
    module.bank[3] = torch.arange(10.0)
    module.seen[3] = True
    module._last_idx = torch.tensor([3, 5])
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    fresh = PSKD(ctx.student, ctx.method, ctx.cfg.optim, num_samples=7, num_classes=10)
    fresh.load_state_dict(checkpoint["state_dict"])
    fresh.on_load_checkpoint(checkpoint)
    assert fresh.bank[3].tolist() == list(range(10)) and fresh.seen.tolist()[3:5] == [True, False]
    assert fresh._last_idx.tolist() == [3, 5]

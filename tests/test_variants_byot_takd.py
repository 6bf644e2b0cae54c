"""scheme=byot (Be Your Own Teacher, Zhang et al. 2019) and scheme=takd (teacher assistants,
Mirzadeh et al. 2020): the BYOT loss against a value computed by hand, the scheme's terms against
that loss, the assistant cache key, and both schemes through the CLI."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import compose, mlflow_runs, run_cli

from kdbench.losses import byot_feature_loss, byot_loss

# --------------------------------------------------------------------------------------------
# the loss, by hand
# --------------------------------------------------------------------------------------------


def test_byot_loss_by_hand():
    """Two exits (one shallow, the deepest), one sample of label 0, two classes; a = 0.5,
    T = 2, l = 0.1.

    - shallow logits z_1 = [0, 0]: q_1^T = [1/2, 1/2]; CE(z_1, 0) = ln 2 = 0.693147
    - deepest logits z_C = [2 ln 3, 0]: z_C / T = [ln 3, 0], q_C^T = [3/4, 1/4];
      softmax(z_C) = [9/10, 1/10], CE(z_C, 0) = -ln 0.9 = 0.105361
    - KL(q_C^T || q_1^T) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812;
      T^2 KL = 0.523248
    - F_1 = [1, 2], F_C = [0, 0]: ||F_1 - F_C||^2 = 5
    - total = 0.5 (0.693147 + 0.105361) + 0.5 * 0.523248 + 0.1 * 5
            = 0.399254 + 0.261624 + 0.5 = 1.160878
    """
    z1 = torch.zeros(1, 2, requires_grad=True)
    zc = torch.tensor([[2 * math.log(3), 0.0]], requires_grad=True)
    f1 = torch.tensor([[1.0, 2.0]], requires_grad=True)
    fc = torch.zeros(1, 2, requires_grad=True)
    y = torch.tensor([0])
    total = byot_loss([z1, zc], [f1, fc], y, alpha=0.5, temperature=2.0, feature_weight=0.1)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = 0.5 * (math.log(2) - math.log(0.9)) + 0.5 * 4 * kl + 0.1 * 5
    assert expected == pytest.approx(1.160878, abs=1e-6)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    # the deepest exit teaches: its logits get only their own CE's gradient,
    # (1 - a)(softmax(z_C) - onehot) = 0.5 ([0.9, 0.1] - [1, 0]) = [-0.05, 0.05], and F_C none
    assert zc.grad.tolist()[0] == pytest.approx([-0.05, 0.05], abs=1e-6)
    assert fc.grad is None or fc.grad.abs().sum() == 0
    # the hint pulls F_1 to F_C: d/dF_1 of 0.1 ||F_1||^2 = 0.2 F_1 = [0.2, 0.4]
    assert f1.grad.tolist()[0] == pytest.approx([0.2, 0.4], abs=1e-6)
    # batch mean of the squared distance: samples [3, 4] and [0, 0] against 0 -> (25 + 0) / 2
    two = byot_feature_loss(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.zeros(2, 2))
    assert two.item() == pytest.approx(12.5)


def test_byot_scheme_terms_are_the_papers_loss_and_assistant_keys_chain():
    """With method=kd at the paper's weights (gamma 0.7 = 1 - a, alpha 0.3 = a, T 3) the
    scheme's terms add up to byot_loss of the same exits. The TAKD assistant's cache key
    changes with its teacher's weights and with the method."""
    from kdbench.run import prepare
    from kdbench.schemes.byot import BYOT, TAPS, deepest_feature
    from kdbench.schemes.takd import assistant_key, assistant_specs

    overrides = ("method.gamma=0.7", "method.alpha=0.3", "method.temperature=3")
    ctx = prepare(compose("scheme=byot", "student=cnn1d_small", *overrides))
    module = BYOT.from_context(ctx).eval()  # eval: BatchNorm the same in both passes
    assert len(module.exits) == 2  # cnn1d_small: 3 stages, the last read by the classifier
    torch.manual_seed(0)
    x, y = torch.randn(16, *ctx.dm.input_shape), torch.randint(0, 10, (16,))
    with torch.no_grad():
        terms = module.losses((x, y, torch.arange(16)))
        out = module.student(x, TAPS)
        heads = [h(s) for h, s in zip(module.exits, out.features["stages"], strict=False)]
        expected = byot_loss(
            [z for _, z in heads] + [out.logits],
            [f for f, _ in heads] + [deepest_feature(out)],
            y,
            alpha=0.3,
            temperature=3.0,
            feature_weight=0.03,
        )
    assert {"exit1/ce", "exit1/kd", "exit1/feature", "exit2/kd", "exit3/ce"} <= set(terms)
    assert sum(terms.values()).item() == pytest.approx(expected.item(), rel=1e-5)

    ctx = prepare(
        compose("scheme=takd", "scheme.assistants=[{arch:cnn1d,kwargs:{channels:[4,4,8,8]}}]")
    )
    spec, assistant = assistant_specs(ctx.cfg)[0], ctx.info["assistants"][0]
    key = assistant_key(ctx.cfg, ctx.dm, spec, assistant, ctx.teacher, 0)
    assert key == assistant_key(ctx.cfg, ctx.dm, spec, assistant, ctx.teacher, 0)
    with torch.no_grad():
        next(ctx.teacher.parameters()).add_(1.0)  # another teacher
    assert assistant_key(ctx.cfg, ctx.dm, spec, assistant, ctx.teacher, 0) != key
    with torch.no_grad():
        next(ctx.teacher.parameters()).sub_(1.0)
    other = compose("scheme=takd", "scheme.assistants=[{arch:cnn1d,kwargs:{channels:[4,4,8,8]}}]")
    other.method.alpha = 0.5  # another method
    assert assistant_key(other, ctx.dm, spec, assistant, ctx.teacher, 0) != key
    assert assistant_key(ctx.cfg, ctx.dm, spec, assistant, ctx.teacher, 1) != key  # seed


# --------------------------------------------------------------------------------------------
# through the CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_byot_cli_reports_every_exit_and_refuses_a_student_without_stages(tmp_path):
    from kdbench.leaderboard import load_runs, summarize

    proc = run_cli(
        "scheme=byot",
        "student=cnn1d_small",
        "mlflow.experiment=byot",
        "efficiency.latency_runs=5",
        "efficiency.throughput_batch=64",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs("byot")
    (run,) = runs
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    assert run.data.tags["teacher_source"] == "none"  # no teacher network trained or loaded
    for i in (1, 2, 3):
        assert 0.0 <= m[f"test/exit{i}/acc"] <= 1.0
        assert 0.0 <= m[f"test/exit{i}/acc_best"] <= 1.0
        assert m[f"efficiency/exit{i}/latency_ms"] > 0
        assert m[f"efficiency/exit{i}/flops"] > 0
    assert m["test/exit3/acc"] == m["test/acc"]  # the deepest exit is the network itself
    # the truncated networks grow with depth; the deepest is the deployed student
    assert m["efficiency/exit1/flops"] < m["efficiency/exit2/flops"] < m["efficiency/exit3/flops"]
    assert m["efficiency/exit3/params"] == m["student/params"]
    assert m["efficiency/exit3/flops"] == m["student/flops"]
    assert m["efficiency/exit1/params"] < m["student/params"]
    assert m["aux/params"] > 0  # the exit heads: not part of the deployed student
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"exits.pt", "student.pt"} <= arts
    # the leaderboard shows each shallow exit as a row of its own: accuracy and latency there
    table = summarize(load_runs(os.environ["MLFLOW_TRACKING_URI"], "byot"))
    rows = {r.student: r for r in table.itertuples(index=False)}
    assert set(rows) == {"cnn1d_small", "cnn1d_small exit1", "cnn1d_small exit2"}
    assert rows["cnn1d_small exit1"].acc_mean == pytest.approx(m["test/exit1/acc"])
    assert rows["cnn1d_small exit2"].student_latency_ms == pytest.approx(
        m["efficiency/exit2/latency_ms"]
    )
    assert rows["cnn1d_small"].acc_mean == pytest.approx(m["test/acc"])

    proc = run_cli("scheme=byot", "mlflow.experiment=byot_mlp", cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdbench: error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert errors[0].startswith("kdbench: error: student='mlp' is invalid: scheme=byot")
    assert "student=cnn1d_small" in errors[0]


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_takd_cli_trains_each_assistant_once_and_reuses_it(tmp_path):
    """teacher -> one small assistant -> mlp, twice: the first run trains and caches the
    assistant, the second loads it (tag and log say so) and, from the same assistant, gets
    the same student."""
    args = (
        "scheme=takd",
        "scheme.assistants=[{name:ta,arch:cnn1d,kwargs:{channels:[6,6,12,12]}}]",
        "mlflow.experiment=takd",
        "trainer.max_epochs=1",
        "efficiency.enabled=false",
    )
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "kdbench: training assistant 1 ta (not cached yet" in first.stdout
    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "training assistant" not in second.stdout
    assert "assistant 1/1 ta: cache" in second.stdout
    _, runs = mlflow_runs("takd")
    runs = sorted(runs, key=lambda r: r.info.start_time)
    assert [r.data.tags["assistant1_source"] for r in runs] == ["trained", "cache"]
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]
    a, b = (r.data.metrics for r in runs)
    for m in (a, b):
        assert 0.0 <= m["assistant1/test/acc"] <= 1.0
        assert 0.0 <= m["test/acc"] <= 1.0 and 0.0 <= m["teacher/test/acc"] <= 1.0
        assert m["assistant1/params"] > 0
    assert b["assistant1/test/acc"] == a["assistant1/test/acc"]
    assert b["test/acc"] == a["test/acc"]

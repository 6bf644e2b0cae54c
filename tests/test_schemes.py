"""Schemes: online (mutual learning), self (born-again), multi-teacher; every method x scheme."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_NO_TEACHER, compose, finished_method_scheme_pairs, mlflow_runs

from kdbench.errors import KdbenchError
from kdbench.losses import kd_loss
from kdbench.run import Runner, prepare, run
from kdbench.schemes.online import Online


def _online_module(*overrides):
    ctx = prepare(compose("scheme=online", *overrides))
    ctx.dm.prepare_data()
    ctx.dm.setup()
    return ctx, Online.from_context(ctx)


def test_online_targets_are_the_other_peers_detached_outputs():
    ctx, module = _online_module("method=kd", "student=cnn1d_small")
    x, y, idx = ctx.dm.distill_set().__getitems__(list(range(16)))
    terms = module.losses((x, y, idx))
    assert {"teacher/kd", "student/kd", "teacher/ce", "student/ce"} <= set(terms)
    teacher_params = list(module.peers["teacher"].parameters())
    student_params = list(module.peers["student"].parameters())
    # the student's KD term reaches its own weights, never the peer it learns from
    grads = torch.autograd.grad(
        terms["student/kd"], teacher_params + student_params, allow_unused=True, retain_graph=True
    )
    assert all(g is None for g in grads[: len(teacher_params)])
    assert any(g is not None and g.abs().sum() > 0 for g in grads[len(teacher_params) :])
    grads = torch.autograd.grad(
        terms["teacher/kd"], student_params, allow_unused=True, retain_graph=True
    )
    assert all(g is None for g in grads)
    # and its value is KD towards the other peer's output, by the formula
    module.eval()
    with torch.no_grad():
        zs, zt = module.peers["student"](x).logits, module.peers["teacher"](x).logits
    module.train()
    method = module.methods["student__from__teacher"]
    expected = method.alpha * kd_loss(zs, zt, method.temperature)
    module.eval()
    with torch.no_grad():
        again = module.losses((x, y, idx))
    assert again["student/kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_online_rkd_one_shared_call_gives_each_peer_its_own_directions_gradient():
    """Two peers and rkd (symmetric): one rkd call with gradients on both sides replaces the two
    directions' calls; the loss values and every peer's gradient are those of the two calls
    (rkd_loss(A, B.detach()) for A, rkd_loss(B, A.detach()) for B), by rkd_loss itself."""
    from kdbench.losses import rkd_loss

    ctx, module = _online_module("method=rkd", "student=cnn1d_small")
    assert module.shared_term
    x, y, idx = ctx.dm.distill_set().__getitems__(list(range(24)))
    module.eval()  # no batch-norm statistics move between the two passes
    terms = module.losses((x, y, idx))
    outs = {n: p(x, module.taps) for n, p in module.peers.items()}
    e = {n: o.features["embedding"] for n, o in outs.items()}
    beta = module.methods["student__from__teacher"].beta
    two = {
        "student": beta * rkd_loss(e["student"], e["teacher"].detach()),
        "teacher": beta * rkd_loss(e["teacher"], e["student"].detach()),
    }
    for name in ("student", "teacher"):
        assert terms[f"{name}/rkd"].item() == pytest.approx(two[name].item(), rel=1e-5)
    params = [p for peer in module.peers.values() for p in peer.parameters()]
    total = sum(v for k, v in terms.items() if k.endswith("/rkd"))
    shared = torch.autograd.grad(total, params, allow_unused=True)
    separate = torch.autograd.grad(two["student"] + two["teacher"], params, allow_unused=True)
    for a, b in zip(shared, separate, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(a is not None and a.abs().sum() > 0 for a in shared)


def test_online_fitnet_has_a_regressor_per_direction_and_one_optimizer_per_peer():
    ctx, module = _online_module("method=fitnet", "student=cnn1d_small", "scheme.peers=3")
    assert set(module.peers) == {"teacher", "student", "student2"}
    assert len(module.methods) == 6  # ordered pairs
    regs = [id(m.term.regressor) for m in module.methods.values()]
    assert len(set(regs)) == 6
    groups = module.param_groups()
    assert len(groups) == 3
    ids = [{id(p) for p in g} for g in groups]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])


def test_online_training_step_changes_every_peer_and_logs_each_peer(tmp_path):
    from kdbench.run import make_trainer

    cfg = compose("scheme=online", "method=rkd", "student=cnn1d_small", "mlflow.experiment=online")
    ctx, module = _online_module("method=rkd", "student=cnn1d_small")
    before = {n: copy.deepcopy(p.state_dict()) for n, p in module.peers.items()}
    trainer = make_trainer(
        ctx.cfg,
        tmp_path,
        logger=False,
        enable_checkpointing=False,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=ctx.dm)
    for name, peer in module.peers.items():  # one step moved every peer's weights
        after = peer.state_dict()
        assert any(not torch.equal(v, after[k]) for k, v in before[name].items()), name

    metrics = run(cfg)
    for key in (
        "test/acc",
        "test/acc_best",
        "test/teacher/acc",
        "test/student/acc",
        "test/ensemble/acc",
        "teacher/test/acc",
    ):
        assert key in metrics
    assert metrics["test/acc"] == metrics["test/student/acc"]
    _, runs = mlflow_runs("online")
    r = runs[0].data
    assert r.tags["scheme"] == "online" and r.tags["teacher_source"] == "none"
    assert {"train/student/rkd", "train/teacher/rkd", "train/student/ce"} <= set(r.metrics)


def test_self_generation_k_learns_from_the_frozen_final_weights_of_generation_k_minus_1(
    monkeypatch,
):
    seen = []
    original = Runner.fit_and_test

    def spy(self, module, student_model, name=""):
        teacher_before = copy.deepcopy(module.teacher.model.state_dict())
        modes = []
        import lightning as L

        class Watch(L.Callback):
            def on_train_batch_start(self, trainer, m, batch, i):
                modes.append(m.teacher.training)

        # record the teacher's mode during training through a callback on the next trainer
        import kdbench.run as R

        real_make = R.make_trainer

        def make(cfg, root, **kw):
            kw["callbacks"] = [*kw.get("callbacks", []), Watch()]
            return real_make(cfg, root, **kw)

        monkeypatch.setattr(R, "make_trainer", make)
        out = original(self, module, student_model, name)
        monkeypatch.setattr(R, "make_trainer", real_make)
        seen.append(
            {
                "teacher_before": teacher_before,
                "teacher_after": copy.deepcopy(module.teacher.model.state_dict()),
                "student_final": copy.deepcopy(student_model.state_dict()),
                "frozen": all(not p.requires_grad for p in module.teacher.parameters()),
                "modes": modes,
            }
        )
        return out

    monkeypatch.setattr(Runner, "fit_and_test", spy)
    metrics = run(
        compose("scheme=self", "scheme.generations=3", "method=kd", "mlflow.experiment=self")
    )
    assert len(seen) == 2  # generations 1 and 2 are trained; generation 0 is the teacher
    for k in (0, 1):
        assert seen[k]["frozen"] and seen[k]["modes"] and not any(seen[k]["modes"])
        for key, v in seen[k]["teacher_before"].items():
            assert torch.equal(v, seen[k]["teacher_after"][key])  # unchanged, buffers included
    for key, v in seen[0]["student_final"].items():  # gen 2's teacher = gen 1's final weights
        assert torch.equal(v, seen[1]["teacher_before"][key])
    for key in ("test/gen0/acc", "test/gen1/acc", "test/gen2/acc", "test/ensemble/acc", "test/acc"):
        assert key in metrics
    assert metrics["test/acc"] == metrics["test/gen2/acc"]
    assert metrics["student/params"] == metrics["teacher/params"]
    _, runs = mlflow_runs("self")
    assert runs[0].data.tags["student"] == "cnn1d" and runs[0].data.tags["scheme"] == "self"


def test_teacher_ensemble_averages_softened_probabilities():
    from kdbench.teacher import EnsembleTeacher

    members = (
        "teacher.members=[{arch: cnn1d, kwargs: {channels: [8,8,16,16]}, seed: 0},"
        "{arch: mlp, kwargs: {hidden: [16]}, seed: 1}]"
    )
    cfg = compose(
        "teacher=ensemble", members, "method=kd", "mlflow.experiment=ens", tiny=TINY_NO_TEACHER
    )
    ctx = prepare(cfg)
    assert isinstance(ctx.teacher, EnsembleTeacher) and len(ctx.teacher.members) == 2
    x = torch.randn(5, 1, 40)
    T = cfg.method.temperature
    ctx.teacher.eval()
    with torch.no_grad():
        z = ctx.teacher(x).logits
        p = [(m(x).logits / T).softmax(1) for m in ctx.teacher.members]
    # softmax at T of the ensemble's logits is the members' average softened distribution
    assert torch.allclose((z / T).softmax(1), (p[0] + p[1]) / 2, atol=1e-6)
    metrics = run(cfg)
    assert 0 <= metrics["teacher/test/acc"] <= 1
    _, runs = mlflow_runs("ens")
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["teacher"] == "ensemble"


def test_teacher_ensemble_feature_methods_need_a_named_member():
    with pytest.raises(KdbenchError, match="teacher.feature_member=None is invalid"):
        prepare(compose("teacher=ensemble", "method=rkd", tiny=TINY_NO_TEACHER))
    ctx = prepare(
        compose("teacher=ensemble", "method=rkd", "teacher.feature_member=1", tiny=TINY_NO_TEACHER)
    )
    assert ctx.method.term is not None
    with pytest.raises(KdbenchError, match="works with scheme=offline, not scheme=online"):
        prepare(compose("teacher=ensemble", "scheme=online", tiny=TINY_NO_TEACHER))


@pytest.mark.slow  # a long sweep: python -m pytest -m slow (CI runs it)
def test_every_method_runs_under_every_scheme_through_the_cli(tmp_path):
    methods = ("none", "hard", "kd", "fitnet", "at", "rkd")
    pairs = finished_method_scheme_pairs(tmp_path, ",".join(methods))
    assert pairs == {(m, s) for m in methods for s in ("offline", "online", "self")}


def test_a_pair_that_cannot_work_fails_before_training_under_every_scheme(tmp_path):
    for scheme in ("online", "self"):
        overrides = ["method=at", f"scheme={scheme}", "student=mlp"]
        if scheme == "self":  # the student is the teacher's architecture: make that an MLP
            overrides += ["teacher.arch=mlp", "~teacher.kwargs.channels"]
        with pytest.raises(KdbenchError, match="method=at needs spatial feature maps"):
            prepare(compose(*overrides))

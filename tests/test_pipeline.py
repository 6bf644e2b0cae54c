"""The run pipeline in-process: methods on the default pair, teacher freezing and caching."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import compose, mlflow_runs

from kdbench.errors import KdbenchError
from kdbench.run import prepare, run


def _tag_experiment(name):
    return [f"mlflow.experiment={name}"]


@pytest.mark.parametrize(
    "method,student",
    [
        ("none", "mlp"),
        ("hard", "mlp"),
        ("kd", "mlp"),
        ("fitnet", "mlp"),
        ("rkd", "mlp"),
        ("fitnet", "cnn1d_small"),
        ("at", "cnn1d_small"),
        ("rkd", "cnn1d_small"),
    ],
)
def test_every_method_runs_and_records_a_finished_run(method, student):
    exp = f"methods-{method}-{student}"
    metrics = run(compose(f"method={method}", f"student={student}", *_tag_experiment(exp)))
    assert 0.0 <= metrics["test/acc"] <= 1.0
    # tiny teacher (channels 8, 8, 16, 16): counted by hand as in test_models_data
    assert metrics["teacher/params"] == (5 * 8 + 16) + (8 * 8 * 3 + 16) + (8 * 16 * 3 + 32) + (
        16 * 16 * 3 + 32
    ) + (16 * 10 + 10)
    client, runs = mlflow_runs(exp)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    r = runs[0].data
    assert r.tags["method"] == method and r.tags["student"] == (
        "mlp" if student == "mlp" else "cnn1d"
    )
    assert (
        r.tags["scheme"] == "offline" and r.tags["dataset"] == "mnist1d" and r.tags["seed"] == "0"
    )
    for key in (
        "test/acc",
        "test/acc_best",
        "teacher/test/acc",
        "student/params",
        "teacher/params",
        "test/agreement",
        "test/ece",
    ):
        assert key in r.metrics, key
    assert r.params["method.name"] == method
    history = client.get_metric_history(runs[0].info.run_id, "val/acc")
    assert len(history) == 2  # one per epoch
    if method != "none":
        train_terms = {k for k in r.metrics if k.startswith("train/")}
        expected = {
            "none": set(),
            "hard": {"hard"},
            "kd": {"kd"},
            "fitnet": {"fitnet"},
            "rkd": {"rkd"},
            "at": {"at"},
        }[method]
        assert {f"train/{t}" for t in expected} <= train_terms
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"config.yaml", "student.pt"} <= artifacts


def test_attention_transfer_on_the_mlp_student_fails_before_training():
    with pytest.raises(KdbenchError, match="method=at needs spatial feature maps"):
        prepare(compose("method=at", "student=mlp"))


def test_fitnet_regressor_trains_but_is_not_part_of_the_student():
    ctx = prepare(compose("method=fitnet", "student=mlp"))
    reg = ctx.method.term.regressor
    assert sum(p.numel() for p in reg.parameters()) > 0
    student_ids = {id(p) for p in ctx.student.parameters()}
    assert not any(id(p) in student_ids for p in reg.parameters())


class _Recorder:
    pass


def test_frozen_teacher_is_unchanged_and_in_eval_mode_through_training():
    import lightning as L

    from kdbench.run import make_trainer
    from kdbench.schemes.offline import Offline
    from kdbench.teacher import resolve_teacher

    cfg = compose("method=fitnet", "student=cnn1d_small", "teacher_output_cache.enabled=false")
    ctx = prepare(cfg)
    ctx.dm.prepare_data()
    ctx.dm.setup()
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp())
    resolve_teacher(cfg, ctx.dm, ctx.teacher, root)
    before = copy.deepcopy(ctx.teacher.model.state_dict())
    student_before = copy.deepcopy(ctx.student.model.state_dict())
    modes = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            modes.append(
                (
                    module.teacher.training,
                    module.student.training,
                    any(m.training for m in module.teacher.modules()),
                )
            )

    module = Offline.from_context(ctx)
    trainer = make_trainer(cfg, root, logger=False, enable_checkpointing=False, callbacks=[Watch()])
    trainer.fit(module, datamodule=ctx.dm)
    after = ctx.teacher.model.state_dict()
    for key, value in before.items():  # weights and BatchNorm running statistics
        assert torch.equal(value, after[key]), key
    assert any("running_mean" in k for k in before)
    assert modes and all(t is False and s is True and not any_t for t, s, any_t in modes)
    assert all(not p.requires_grad for p in ctx.teacher.parameters())
    changed = [
        k
        for k, v in ctx.student.model.state_dict().items()
        if not torch.equal(v, student_before[k])
    ]
    assert changed  # the student did learn


def test_teacher_is_cached_and_reused_and_keyed_by_what_determines_it():
    m1 = run(compose("method=kd", "mlflow.experiment=cache", "teacher.seed=7"))
    _, runs = mlflow_runs("cache")
    assert runs[0].data.tags["teacher_source"] == "trained"
    m2 = run(compose("method=kd", "mlflow.experiment=cache", "teacher.seed=7", "seed=1"))
    _, runs = mlflow_runs("cache")
    sources = sorted(r.data.tags["teacher_source"] for r in runs)
    assert sources == ["cache", "trained"]
    assert m1["teacher/test/acc"] == m2["teacher/test/acc"]
    # the student's batch size does not determine the teacher; its own seed does
    run(compose("method=kd", "mlflow.experiment=cache2", "teacher.seed=7", "dataset.batch_size=32"))
    run(compose("method=kd", "mlflow.experiment=cache2", "teacher.seed=8"))
    _, runs = mlflow_runs("cache2")
    assert sorted(r.data.tags["teacher_source"] for r in runs) == ["cache", "trained"]


def test_same_seed_gives_the_same_result():
    a = run(compose("method=kd", "mlflow.experiment=det", "seed=3"))
    b = run(compose("method=kd", "mlflow.experiment=det", "seed=3"))
    assert a["test/acc"] == b["test/acc"] and a["val/acc_best"] == b["val/acc_best"]


def test_teacher_output_cache_gives_the_same_training_as_a_teacher_forward_per_step():
    a = run(compose("method=rkd", "student=cnn1d_small", "mlflow.experiment=tcache"))
    b = run(
        compose(
            "method=rkd",
            "student=cnn1d_small",
            "mlflow.experiment=tcache",
            "teacher_output_cache.enabled=false",
        )
    )
    assert a["test/acc"] == pytest.approx(b["test/acc"], abs=1e-6)


def test_a_nan_loss_stops_the_run_naming_the_term_and_marks_it_failed():
    # a learning rate this large blows the weights up after the first step
    with pytest.raises(KdbenchError, match=r"loss term '(ce|kd)' became (nan|inf|-inf) at epoch 0"):
        run(compose("method=kd", "optim.lr=1e30", "mlflow.experiment=nanloss"))
    _, runs = mlflow_runs("nanloss")
    assert [r.info.status for r in runs] == ["FAILED"]


class _Steps(L.Callback):
    def on_fit_end(self, trainer, module):
        self.global_step = trainer.global_step
        self.served = trainer.num_training_batches
        self.lr = [g["lr"] for o in trainer.optimizers for g in o.param_groups]


@pytest.mark.parametrize("scheme", ["offline", "online"])
def test_steps_per_call_trains_exactly_as_one_step_per_batch(scheme):
    one, four = _Steps(), _Steps()
    base = ("method=kd", f"scheme={scheme}", "mlflow.experiment=spc", "seed=2")
    a = run(compose(*base, "steps_per_call=1"), callbacks=[one])
    b = run(compose(*base, "steps_per_call=4"), callbacks=[four])
    assert a["test/acc"] == b["test/acc"] and a["val/acc_best"] == b["val/acc_best"]
    # every optimizer step counts once (per peer), and the cosine schedule ends at 0 in both
    assert one.global_step == four.global_step > 0
    assert four.served == -(-one.served // 4)
    assert one.lr == four.lr and max(one.lr) < 1e-6


class _InitialLr(L.Callback):
    def on_train_start(self, trainer, module):
        self.lr = trainer.optimizers[0].param_groups[0]["initial_lr"]


@pytest.mark.parametrize("ref, factor", [(None, 1.0), (32, 2.0), (128, 0.5)])
def test_lr_reference_batch_scales_the_learning_rate_with_the_total_batch(ref, factor):
    cb = _InitialLr()
    ov = [] if ref is None else [f"optim.lr_reference_batch={ref}"]
    cfg = compose("method=kd", "mlflow.experiment=lrscale", "dataset.batch_size=64", *ov)
    run(cfg, callbacks=[cb])
    assert cb.lr == pytest.approx(cfg.optim.lr * factor)


def test_bf16_mixed_precision_runs_and_the_loss_terms_stay_float32():
    from kdbench.losses import attention_loss, dkd_loss, kd_loss, rkd_loss

    m = run(compose("method=kd", "trainer.precision=bf16-mixed", "mlflow.experiment=bf16"))
    assert 0.1 < m["test/acc"] <= 1.0
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zs, zt = lin(torch.randn(16, 8)), lin(torch.randn(16, 8))
        assert zs.dtype == torch.bfloat16
        y = torch.randint(0, 10, (16,))
        fs, ft = torch.randn(16, 4, 5, dtype=torch.bfloat16), torch.randn(16, 4, 5).bfloat16()
        assert kd_loss(zs, zt, 4.0).dtype == torch.float32
        assert dkd_loss(zs, zt, y, 1.0, 8.0, 4.0).dtype == torch.float32
        assert attention_loss([fs], [ft]).dtype == torch.float32
        assert rkd_loss(zs, zt).dtype == torch.float32


def test_optimizers_use_the_fused_kernel_where_torch_has_one():
    from omegaconf import OmegaConf

    from kdbench.schemes.base import build_optimizer, use_fused

    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("adam", "adamw", "sgd"):
        cfg = OmegaConf.create({"name": name, "lr": 0.1, "weight_decay": 0.0, "fused": "auto"})
        opt, _, _ = build_optimizer(params, cfg, total_steps=10)
        assert opt.defaults["fused"] is True
        cfg.fused = False
        opt, _, _ = build_optimizer(params, cfg, total_steps=10)
        assert not opt.defaults["fused"]
    assert not use_fused([torch.nn.Parameter(torch.zeros(3, device="meta"))], "auto")
    assert not use_fused([torch.zeros(3, dtype=torch.long)], "auto")


def test_the_nan_check_names_the_first_bad_term_and_step_of_a_served_batch():
    from types import SimpleNamespace

    from kdbench.errors import NonFiniteLossError
    from kdbench.schemes.base import SchemeModule

    def step(ce, kd):
        ce, kd = torch.tensor(ce), torch.tensor(kd)
        return (128, ("ce", "kd", "loss"), [ce, kd, ce + kd])

    nan = float("nan")
    module = SimpleNamespace(current_epoch=3, _parts=[step(1.0, 2.0)] * 5)
    SchemeModule.check_finite(module, 0)  # all finite: nothing raised
    module._parts += [step(1.0, 2.0), step(1.0, nan), step(nan, nan)]
    with pytest.raises(NonFiniteLossError, match=r"loss term 'kd' became nan at epoch 3, step 6"):
        SchemeModule.check_finite(module, 5)  # the steps since 5: the first bad one is 6
    module._parts[6] = step(float("inf"), float("-inf"))  # inf + -inf: the total is nan
    with pytest.raises(NonFiniteLossError, match=r"'ce' became inf at epoch 3, step 6"):
        SchemeModule.check_finite(module, 5)

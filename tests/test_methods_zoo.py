"""The method zoo: every method of the published CIFAR-100 table and the logit methods beyond it."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, finished_method_scheme_pairs, mlflow_runs

from kdbench.data.base import UNLABELLED
from kdbench.errors import KdbenchError
from kdbench.losses import dkd_loss, kd_loss, logit_standardize
from kdbench.methods import DKDTerm, Method
from kdbench.run import prepare, run
from kdbench.taps import Outputs

ZOO = ["reverse_kd", "dist", "dkd", "pkt", "sp", "nst", "vid", "crd", "crd_kd"]
NEEDS_MAPS = {"sp", "nst", "vid"}


@pytest.mark.parametrize("method", ZOO)
def test_each_method_runs_on_the_default_pair_or_fails_before_training(method):
    cfg = compose(f"method={method}", f"mlflow.experiment=zoo-{method}")
    if method in NEEDS_MAPS:  # the MLP student has no stage outputs
        with pytest.raises(KdbenchError, match=f"method={method} needs"):
            prepare(cfg)
        cfg = compose(f"method={method}", "student=cnn1d_small", f"mlflow.experiment=zoo-{method}")
    metrics = run(cfg)
    assert 0 <= metrics["test/acc"] <= 1
    client, runs = mlflow_runs(f"zoo-{method}")
    assert runs[0].info.status == "FINISHED"
    assert f"train/{method}" in runs[0].data.metrics
    if method in ("vid", "crd", "crd_kd"):  # trainable auxiliary modules, saved, not counted
        assert metrics["aux/params"] > 0
        assert "aux.pt" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    if method == "crd_kd":
        assert "train/kd" in runs[0].data.metrics


@pytest.mark.slow  # a long sweep: python -m pytest -m slow (CI runs it)
def test_zoo_methods_compose_with_every_scheme_through_the_cli(tmp_path):
    methods = [m for m in ZOO if m != "crd_kd"]
    pairs = finished_method_scheme_pairs(tmp_path, ",".join(methods), "++scheme.peers=2")
    assert pairs == {(m, s) for m in methods for s in ("offline", "online", "self")}


def test_dkd_term_warms_up_and_uses_teacher_labels_for_unlabelled_samples():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, UNLABELLED, 3, UNLABELLED, 2])
    term = DKDTerm(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20)
    target = torch.tensor([0, 1, int(zt[2].argmax()), 3, int(zt[4].argmax()), 2])
    full = dkd_loss(zs, zt, target, 1.0, 8.0, 4.0)
    s, t = Outputs(zs), Outputs(zt)
    assert term(s, t, y, 0, None).item() == pytest.approx(full.item() / 20, rel=1e-6)
    assert term(s, t, y, 9, None).item() == pytest.approx(full.item() * 10 / 20, rel=1e-6)
    assert term(s, t, y, 40, None).item() == pytest.approx(full.item(), rel=1e-6)


def test_logit_standardisation_applies_to_kd_and_not_to_ce():
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(4, 6, generator=g) * 3, torch.randn(4, 6, generator=g) * 7
    y = torch.tensor([0, 1, 2, 3])
    plain = Method("kd", "response", 0.1, 0.9, 0, 2.0)
    std = Method("kd", "response", 0.1, 0.9, 0, 2.0, logit_std=True)
    a, b = plain(Outputs(zs), Outputs(zt), y, 0), std(Outputs(zs), Outputs(zt), y, 0)
    assert a["ce"].item() == pytest.approx(b["ce"].item())
    expected = 0.9 * kd_loss(logit_standardize(zs), logit_standardize(zt), 2.0)
    assert b["kd"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert a["kd"].item() != pytest.approx(b["kd"].item(), rel=1e-3)
    # and from the config of any logit method
    cfg = compose("method=dist", "method.logit_std=true")
    assert prepare(cfg).method.logit_std is True


def test_vid_variances_are_trainable_and_optimised_with_the_student():
    from kdbench.schemes.offline import Offline

    ctx = prepare(compose("method=vid", "student=cnn1d_small"))
    scales = [p for n, p in ctx.method.named_parameters() if n.endswith("log_scale")]
    assert len(scales) == 3 and all(p.requires_grad for p in scales)  # one per stage pair
    module = Offline(ctx.student, ctx.teacher, ctx.method, ctx.cfg.optim)
    optimised = {id(p) for g in module.param_groups() for p in g}
    assert all(id(p) in optimised for p in scales)
    assert not any(id(p) in optimised for p in ctx.teacher.parameters())


def test_crd_memory_banks_cover_the_training_set_and_update():
    from kdbench.schemes.offline import Offline

    ctx = prepare(compose("method=crd", "++method.term.nce_k=32", "student=cnn1d_small"))
    ctx.dm.prepare_data()
    ctx.dm.setup()
    term = ctx.method.term
    term.bind_data(ctx.dm)
    n = len(ctx.dm.distill_set())
    assert term.crd.memory_s.shape == (n, 128) and term.crd.memory_t.shape == (n, 128)
    module = Offline(
        ctx.student, ctx.teacher, ctx.method, ctx.cfg.optim, cache_teacher_outputs=False
    )
    x, y, idx = ctx.dm.distill_set().__getitems__([3, 5, 7, 11])
    before = term.crd.memory_s.clone()
    terms = module.losses((x, y, idx))
    assert torch.isfinite(terms["crd"])
    changed = (term.crd.memory_s != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 5, 7, 11]  # only the anchors' memory entries move


@pytest.mark.parametrize(
    "method", ["hard", "reverse_kd", "fitnet", "at", "rkd", "pkt", "sp", "nst"]
)
def test_config_losses_are_called_directly_with_the_same_value(method):
    import functools

    from hydra.utils import instantiate

    from kdbench.methods import direct_loss

    cfg = compose(f"method={method}").method
    term = prepare(compose(f"method={method}", "student=cnn1d_small")).method.term
    # a plain partial of kdbench's own function, not Hydra's per-call authorising wrapper
    assert type(term.loss) is functools.partial
    assert term.loss.func.__module__ == "kdbench.losses"
    hydra_loss = instantiate(cfg.term.loss)
    assert type(hydra_loss) is not functools.partial  # what direct_loss saves a call of
    s, t = torch.randn(8, 4, 10), torch.randn(8, 4, 10)
    if method in ("hard", "reverse_kd"):
        s, t = s.flatten(1), t.flatten(1)
    args = ([s], [t]) if method == "at" else (s, t)
    assert torch.equal(term.loss(*args), hydra_loss(*args))
    other = instantiate({"_target_": "math.dist", "_partial_": True})
    assert direct_loss(other) is other  # targets outside kdbench keep Hydra's checks

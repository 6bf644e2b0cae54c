"""A generated CIFAR-100 folder in the real pickle format drives resnet32x4 -> resnet8x4 through
the command line: preset, data, augmentation, teacher training and caching, distillation, MLflow."""

from __future__ import annotations

import pytest
from conftest import mlflow_runs, run_cli

from kdbench.data.cifar import write_fake_cifar


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, num_classes=100, n_train=64, n_test=32, seed=0)
    return root


@pytest.mark.slow  # long: python -m pytest -m slow (CI runs it)
def test_resnet32x4_to_resnet8x4_on_a_fake_cifar100_runs_end_to_end(fake_cifar, tmp_path):
    args = [
        "experiment=cifar100_r32x4_r8x4",
        "method=kd",
        f"dataset.root={fake_cifar}",
        "dataset.batch_size=32",
        "dataset.eval_batch_size=64",
        "trainer.max_epochs=2",
        "teacher.epochs=1",
        "teacher.batch_size=32",
        "trainer.enable_progress_bar=false",
        "efficiency.latency_runs=2",
        "efficiency.throughput_batch=8",
        "mlflow.experiment=fake-cifar",
    ]
    proc = run_cli(*args, cwd=tmp_path, tiny=False, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training teacher resnet32x4" in proc.stdout
    _, (r,) = mlflow_runs("fake-cifar")
    assert r.info.status == "FINISHED"
    assert r.data.tags["dataset"] == "cifar100" and r.data.tags["student"] == "resnet8x4"
    assert r.data.tags["teacher_outputs"] == "off (augmentation)"  # random views: no cache
    assert r.data.metrics["student/params"] == 1_233_540
    assert r.data.metrics["teacher/params"] == 7_433_860
    assert 0.0 <= r.data.metrics["test/acc"] <= 1.0
    assert r.data.params["optim.milestones"] == "[150, 180, 210]"
    # the second run finds the teacher in the cache
    # (its own student fit cut to one batch: the teacher's cache is what is checked here)
    again = run_cli(
        *args,
        "trainer.max_epochs=1",
        "++trainer.limit_train_batches=1",
        "efficiency.enabled=false",
        cwd=tmp_path,
        tiny=False,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert again.returncode == 0 and "training teacher" not in again.stdout


def test_a_missing_cifar_folder_is_a_one_line_error_before_any_work(tmp_path):
    proc = run_cli(
        "experiment=cifar100_r32x4_r8x4",
        f"dataset.root={tmp_path / 'none'}",
        cwd=tmp_path,
        tiny=False,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "cifar-100-python.tar.gz" in err

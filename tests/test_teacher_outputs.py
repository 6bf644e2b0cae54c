"""The cross-run cache of the frozen teacher's outputs (kdbench.teacher_outputs)."""

from __future__ import annotations

import pytest
import torch
from conftest import compose, mlflow_runs

from kdbench.run import run
from kdbench.teacher_outputs import weights_digest


def _run(tmp_path, experiment, *overrides):
    return run(
        compose(
            f"mlflow.experiment={experiment}",
            f"teacher_output_cache.dir={tmp_path / 'outputs'}",
            *overrides,
        )
    )


def _tags(experiment):
    _, runs = mlflow_runs(experiment)
    return sorted(r.data.tags.get("teacher_outputs", "-") for r in runs)


def test_a_second_run_reads_the_outputs_and_trains_exactly_as_without_the_cache(tmp_path):
    a = _run(tmp_path, "to1", "method=kd", "seed=1")
    files = list((tmp_path / "outputs").glob("*.pt"))
    assert len(files) == 1
    b = _run(tmp_path, "to1", "method=kd", "seed=1")
    c = _run(tmp_path, "to1-off", "method=kd", "seed=1", "teacher_output_cache.enabled=false")
    assert _tags("to1") == ["cached", "computed"]
    assert _tags("to1-off") == ["off"]
    assert a["test/acc"] == b["test/acc"] == pytest.approx(c["test/acc"], abs=1e-6)
    assert a["val/acc_best"] == b["val/acc_best"]


def test_the_key_changes_with_the_taps_the_data_and_the_teacher(tmp_path):
    _run(tmp_path, "to2", "method=kd")
    _run(tmp_path, "to2", "method=fitnet", "student=cnn1d_small")  # a hint tap besides logits
    _run(tmp_path, "to2", "method=kd", "dataset.transfer_size=200")  # other data
    _run(tmp_path, "to2", "method=kd", "teacher.seed=5")  # other teacher weights
    assert _tags("to2") == ["computed"] * 4
    assert len(list((tmp_path / "outputs").glob("*.pt"))) == 4
    _run(tmp_path, "to2b", "method=dist")  # logits only, same teacher and data as the first
    assert _tags("to2b") == ["cached"]


def test_an_unreadable_entry_is_recomputed_over(tmp_path, capsys):
    _run(tmp_path, "to3", "method=kd")
    (path,) = (tmp_path / "outputs").glob("*.pt")
    good = path.stat().st_size
    path.write_bytes(b"not a checkpoint")
    _run(tmp_path, "to3", "method=kd")
    assert f"the teacher-output cache entry {path} is unreadable" in capsys.readouterr().out
    assert _tags("to3") == ["computed", "computed"]
    assert path.stat().st_size == good
    assert not list((tmp_path / "outputs").glob("*.tmp"))


def test_persist_false_keeps_the_outputs_for_the_run_only(tmp_path):
    _run(tmp_path, "to4", "method=kd", "teacher_output_cache.persist=false")
    assert _tags("to4") == ["computed"]
    assert not (tmp_path / "outputs").exists()


def test_weights_digest_sees_buffers_as_well_as_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    before = weights_digest(net)
    net[1].running_mean += 1e-3
    assert weights_digest(net) != before
    net[1].running_mean -= 1e-3
    assert weights_digest(net) == before

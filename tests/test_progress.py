"""Plain progress lines when stdout is not a terminal (issue #12, item 8): a user who redirects
``python -m kdbench`` to a file sees each phase and one line per epoch with real metrics."""

from __future__ import annotations

import re

import pytest
from conftest import mlflow_runs, run_cli

EPOCH = re.compile(r"^kdbench: epoch (\d+)/(\d+) .*val/acc=([0-9.]+) \(([0-9.]+) s\)$")


def test_redirected_run_prints_phases_and_one_line_per_epoch(tmp_path) -> None:
    # stdout is a pipe here (not a TTY), as in `python -m kdbench > log`; a fresh cache makes
    # the teacher train, so its epochs are reported too
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(
        cwd=tmp_path,
        env={
            "KDBENCH_CACHE_DIR": str(tmp_path / "cache"),
            "MLFLOW_TRACKING_URI": uri,
            "KDBENCH_PROGRESS": None,  # the default: auto
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("kdbench: ")]
    text = "\n".join(lines)

    def index(prefix: str) -> int:
        hits = [i for i, x in enumerate(lines) if x.startswith(prefix)]
        assert hits, f"no line starting {prefix!r} in:\n{text}"
        return hits[0]

    teacher = index("kdbench: training teacher cnn1d")
    fit_teacher = index("kdbench: fitting the teacher (2 epochs)")
    fit_student = index("kdbench: fitting the student (2 epochs)")
    assert teacher < fit_teacher < fit_student < index("kdbench: measuring efficiency")
    assert fit_student < index("kdbench: teacher outputs: computed")
    assert [x for x in lines[fit_student:] if x.startswith("kdbench: testing")] == [
        "kdbench: testing (last epoch)",
        "kdbench: testing (best epoch)",
    ]

    def epochs(block: list[str]) -> list[tuple[int, int, float]]:
        out = []
        for line in block:
            m = EPOCH.match(line)
            if m:
                assert "train/loss=" in line
                out.append((int(m.group(1)), int(m.group(2)), float(m.group(3))))
        return out

    assert [e[:2] for e in epochs(lines[fit_teacher:fit_student])] == [(1, 2), (2, 2)]
    student = epochs(lines[fit_student:])
    assert [e[:2] for e in student] == [(1, 2), (2, 2)]
    # the printed val/acc is the value MLflow records for that epoch
    client, runs = mlflow_runs("kdbench", uri=uri)
    assert len(runs) == 1
    history = sorted(
        client.get_metric_history(runs[0].info.run_id, "val/acc"), key=lambda m: m.step
    )
    assert len(history) == 2
    for (_, _, printed), logged in zip(student, history, strict=True):
        assert printed == pytest.approx(logged.value, abs=5e-5)
    # no progress-bar redraws reached the log
    assert "\r" not in proc.stdout and "it/s" not in proc.stderr


@pytest.mark.parametrize(
    ("value", "callback", "bar"),
    [("plain", True, False), ("bar", False, True), ("none", False, False)],
)
def test_progress_modes_set_the_trainer_options(monkeypatch, value, callback, bar) -> None:
    from kdbench import progress

    monkeypatch.setenv("KDBENCH_PROGRESS", value)
    options = progress.trainer_options({"enable_progress_bar": True, "callbacks": ["x"]})
    names = [type(c).__name__ for c in options["callbacks"]]
    assert ("PlainProgress" in names) is callback
    assert options["enable_progress_bar"] is bar
    assert options["callbacks"][0] == "x"


def test_bad_progress_mode_is_one_line_error(tmp_path) -> None:
    proc = run_cli("trainer.max_epochs=1", cwd=tmp_path, env={"KDBENCH_PROGRESS": "loud"})
    assert proc.returncode == 2
    assert "kdbench: error: KDBENCH_PROGRESS='loud' is invalid" in proc.stderr
    assert "Traceback" not in proc.stderr

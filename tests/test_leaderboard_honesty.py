"""Leaderboard honesty (issue #12, item 5 and the garbage store of item 10), driven as users do:
runs made by ``python -m kdbench``, the table by ``python -m kdbench.leaderboard``.

Rows group runs by their whole result-determining config (never averaging unlike runs), show n and
mark single runs, count only finished and complete runs, blank the gap closed where the teacher is
not better than the matched baseline, and fit a 100-column terminal."""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys

import pytest
from conftest import mlflow_runs, run_cli


def _leaderboard(*args: str, uri: str, cwd, env: dict | None = None):
    cmd = [sys.executable, "-m", "kdbench.leaderboard", "--tracking-uri", uri, *args]
    return subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _markdown_rows(text: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
        for ln in lines[2:]
    ]


def _assert_fits(text: str, width: int = 100) -> None:
    wide = [ln for ln in text.splitlines() if len(ln) > width]
    assert not wide, f"{len(wide)} lines wider than {width}: {wide[:3]}"


@pytest.fixture(scope="module")
def mixed_store(tmp_path_factory):
    """One multirun, as the README shows: kd and none, seeds 0 and 1, 1 and 2 epochs (8 runs).
    Then the kd 2-epoch seed-1 run is left RUNNING (a run killed after logging all its metrics)
    and a FINISHED copy of a kd 1-epoch run without its final metrics is added (a run recorded as
    finished before it was complete): neither may count."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("lb_honesty")
    uri = f"sqlite:///{tmp / 'mixed.db'}"
    proc = run_cli(
        "-m",
        "method=kd,none",
        "seed=0,1",
        "trainer.max_epochs=1,2",
        cwd=tmp,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = mlflow_runs("kdbench", uri=uri)
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)

    def find(method, epochs, seed):
        (run,) = [
            r
            for r in runs
            if r.data.tags["method"] == method
            and r.data.params["trainer.max_epochs"] == str(epochs)
            and r.data.tags["seed"] == str(seed)
        ]
        return run

    client = MlflowClient(tracking_uri=uri)
    killed = find("kd", 2, 1)
    client.update_run(killed.info.run_id, status="RUNNING")
    src = find("kd", 1, 0)
    copy = client.create_run(src.info.experiment_id, tags=dict(src.data.tags))
    for k, v in src.data.params.items():
        client.log_param(copy.info.run_id, k, v)
    for k in ("test/acc", "test/acc_best", "teacher/test/acc", "test/agreement"):
        client.log_metric(copy.info.run_id, k, 0.99)  # would shift the mean if it counted
    client.set_terminated(copy.info.run_id, "FINISHED")
    return tmp, uri, find, killed.info.run_id, copy.info.run_id


def test_leaderboard_groups_by_config_counts_only_complete_runs(mixed_store):
    tmp, uri, find, killed_id, incomplete_id = mixed_store

    def acc(method, epochs, seeds):
        return [find(method, epochs, s).data.metrics["test/acc"] for s in seeds]

    out = tmp / "board"
    proc = _leaderboard("--markdown", "--out-dir", str(out), uri=uri, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not counted: 1 FINISHED without student/params, 1 RUNNING run(s)" in proc.stderr
    rows = _markdown_rows(proc.stdout)
    by = {(r["method"], r["variant"]): r for r in rows}
    assert set(by) == {
        ("kd", "trainer.max_epochs=1"),
        ("kd", "trainer.max_epochs=2"),
        ("none", "trainer.max_epochs=1"),
        ("none", "trainer.max_epochs=2"),
    }
    kd1, kd2 = by["kd", "trainer.max_epochs=1"], by["kd", "trainer.max_epochs=2"]
    none1 = by["none", "trainer.max_epochs=1"]
    # 1 epoch: both seeds, and only them (not the 2-epoch runs, not the incomplete copy)
    assert kd1["n"] == "2"
    mean1, sd1 = statistics.mean(acc("kd", 1, [0, 1])), statistics.stdev(acc("kd", 1, [0, 1]))
    assert kd1["test acc % (last)"] == f"{100 * mean1:.2f} ± {100 * sd1:.2f}"
    # 2 epochs: its own row, the RUNNING seed-1 run not counted, marked as a single run
    assert kd2["n"] == "1"
    assert kd2["test acc % (last)"] == f"{100 * acc('kd', 2, [0])[0]:.2f} (n=1)"
    for r in rows:  # a ± only where there is a spread to show
        assert ("±" in r["test acc % (last)"]) == (r["n"] != "1"), r
    # the baseline is the none row of the same config: 1 epoch against 1 epoch
    none_mean1 = statistics.mean(acc("none", 1, [0, 1]))
    assert none1["n"] == "2" and none1["gain over none"] == ""
    assert kd1["gain over none"] == f"{100 * (mean1 - none_mean1):+.2f}"
    # gap closed: blank exactly where the teacher is not >= 1 point above that baseline
    for (method, variant), r in by.items():
        if method == "none":
            assert r["gap closed %"] == ""
            continue
        base = by["none", variant]
        lead = float(r["teacher acc %"]) - float(base["test acc % (last)"].split()[0])
        if lead < 1.0:
            assert r["gap closed %"] == "", r
        else:
            gain = float(r["gain over none"])
            assert float(r["gap closed %"]) == pytest.approx(100 * gain / lead, abs=0.05)
    assert "| variant |" in proc.stdout and "gap closed: (acc - none) / (teacher - none)" in (
        proc.stdout
    )
    # the CSV keeps every column, with the runs behind each row
    with open(out / "leaderboard.csv", newline="") as f:
        table = list(csv.DictReader(f))
    ids = " ".join(r["run_ids"] for r in table)
    assert killed_id not in ids and incomplete_id not in ids
    kd2_csv = [r for r in table if r["method"] == "kd" and r["variant"] == kd2["variant"]]
    assert kd2_csv[0]["run_ids"] == find("kd", 2, 0).info.run_id
    assert kd2_csv[0]["differs"] == "trainer.max_epochs=2" and kd2_csv[0]["seeds"] == "0"
    # the terminal table at 100 columns: readable, and still flags the variant and the n=1 row
    proc = _leaderboard(uri=uri, cwd=tmp, env={"COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_fits(proc.stdout)
    assert "trainer.max_epochs=2" in proc.stdout
    (single,) = [ln for ln in proc.stdout.splitlines() if "(n=1)" in ln and "±" not in ln]
    assert single.split()[:2] == ["kd", "trainer.max_epochs=2"]


def _log(client, exp, method, seed, acc, params=None, status="FINISHED", **over):
    """A run as kdbench records it: tags, the config as params, the final metrics."""
    from mlflow.entities import Metric, Param

    dataset, teacher, student = over.pop("pair", ("mnist1d", "resnet32x4", "resnet8x4"))
    scheme = over.pop("scheme", "offline")
    tags = {
        "method": method,
        "seed": str(seed),
        "dataset": dataset,
        "teacher": teacher,
        "student": student,
        "scheme": scheme,
        "knowledge": "x",
    }
    run = client.create_run(exp, tags=tags)
    config = {
        "seed": str(seed),
        "method.name": method,
        "method.temperature": "4.0" if method != "none" else "1.0",
        "scheme.name": scheme,
        "trainer.max_epochs": "15",
        "mlflow.tracking_uri": f"sqlite:///somewhere/{seed}.db",  # never splits a row
        "cache_dir": f"/cache/{seed}",
        "efficiency.latency_runs": str(10 + seed),
        **(params or {}),
    }
    metrics = {
        "test/acc": acc,
        "test/acc_best": acc,
        "teacher/test/acc": over.pop("teacher", 0.9),
        "student/params": 100.0,
        "teacher/params": 1000.0,
        "speedup": 3.0,
        **over,
    }
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in config.items()],
    )
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_leaderboard_baselines_gap_and_width_on_many_rows(tmp_path):
    """Several pairs, schemes and variants: each none baseline matched on its config, the gap
    closed only where the teacher leads by a point, born-again runs counted only when their
    last generation is recorded, and a 100-column terminal table."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'many.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("kdbench")
    ep3 = {"trainer.max_epochs": "3"}
    for seed in (0, 1):
        _log(client, exp, "none", seed, 0.50 + 0.01 * seed)
        _log(client, exp, "kd", seed, 0.60 + 0.02 * seed)  # gap (0.61-0.505)/(0.9-0.505)
        _log(client, exp, "kd", seed, 0.58 + 0.01 * seed, params=ep3)  # no 3-epoch none
        # a teacher that barely leads its baseline: no gap closed
        pair2 = ("mnist1d", "wrn_40_2", "wrn_16_2")
        _log(client, exp, "none", seed, 0.895 + 0.002 * seed, pair=pair2)
        _log(
            client, exp, "dkd", seed, 0.93 + 0.01 * seed, pair=pair2, params={"method.beta": "8.0"}
        )
    _log(client, exp, "dkd", 0, 0.92, pair=pair2, params={"method.beta": "2.0"})
    # born-again: generations=3 needs test/gen2/acc; one run stopped after generation 1
    born = {
        "pair": ("mnist1d", "resnet32x4", "resnet32x4"),
        "scheme": "self",
        "params": {"scheme.generations": "3"},
    }
    for seed in (0, 1):
        _log(client, exp, "none", seed, 0.7 + 0.01 * seed, **born, **{"test/gen2/acc": 0.7})
    _log(client, exp, "kd", 0, 0.75, **born, **{"test/gen1/acc": 0.74, "test/gen2/acc": 0.75})
    _log(client, exp, "kd", 1, 0.10, **born, **{"test/gen1/acc": 0.10})
    # one call: the terminal table at 100 columns, and every column in leaderboard.md
    out = tmp_path / "board"
    proc = _leaderboard(
        "--out-dir", str(out), "--no-mlflow", uri=uri, cwd=tmp_path, env={"COLUMNS": "100"}
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 FINISHED without test/gen2/acc" in proc.stderr
    rows = _markdown_rows((out / "leaderboard.md").read_text())
    by = {(r["teacher -> student"], r["scheme"], r["method"], r["variant"]): r for r in rows}
    kd = by["resnet32x4 -> resnet8x4", "offline", "kd", "trainer.max_epochs=15"]
    assert kd["n"] == "2" and kd["gain over none"] == "+10.50"
    assert float(kd["gap closed %"]) == pytest.approx(100 * 0.105 / 0.395, abs=0.01)
    kd3 = by["resnet32x4 -> resnet8x4", "offline", "kd", "trainer.max_epochs=3"]
    assert kd3["gain over none"] == "" and kd3["gap closed %"] == ""  # no matching baseline
    none = by["resnet32x4 -> resnet8x4", "offline", "none", ""]
    assert none["n"] == "2" and none["test acc % (last)"] == "50.50 ± 0.71"
    beta8 = by["wrn_40_2 -> wrn_16_2", "offline", "dkd", "method.beta=8.0"]
    beta2 = by["wrn_40_2 -> wrn_16_2", "offline", "dkd", "method.beta=2.0"]
    assert beta8["n"] == "2" and beta2["n"] == "1" and beta2["test acc % (last)"] == "92.00 (n=1)"
    assert beta8["gain over none"] == "+3.90" and beta8["gap closed %"] == ""  # lead 0.4 point
    self_kd = by["resnet32x4 -> resnet32x4", "self", "kd", ""]
    assert self_kd["n"] == "1" and self_kd["test acc % (last)"] == "75.00 (n=1)"
    # the terminal: every row there, nothing wider than 100 columns
    _assert_fits(proc.stdout)
    for text in ("method.beta=2.0", "trainer.max_epochs=3", "92.00 (n=1)", "61.00 ± 1.41"):
        assert text in proc.stdout
    assert "± 0.00" not in proc.stdout


@pytest.mark.parametrize(
    "store",
    ["garbage", "missing_dir", "directory", "bad_scheme", "not_mlflow"],
)
def test_leaderboard_unreadable_store_is_one_line(tmp_path, store):
    import sqlite3

    garbage = tmp_path / "not_a_db.txt"
    garbage.write_bytes(os.urandom(4096))
    other = tmp_path / "optuna.db"
    sqlite3.connect(other).execute("create table studies (id integer)").connection.close()
    uri = {
        "garbage": f"sqlite:///{garbage}",
        "missing_dir": f"sqlite:///{tmp_path / 'no' / 'such' / 'mlflow.db'}",
        "directory": f"sqlite:///{tmp_path}",
        "bad_scheme": "foo://bar/mlflow",
        "not_mlflow": f"sqlite:///{other}",
    }[store]
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = _leaderboard(uri=uri, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdbench: error: --tracking-uri "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    with sqlite3.connect(other) as con:  # nothing added to another program's database
        assert {r[0] for r in con.execute("select name from sqlite_master")} == {"studies"}

"""``python -m kdbench.leaderboard``: compare methods over MLflow runs, on accuracy and efficiency.

Which runs count: a run counts when it is FINISHED and has its final metrics (``test/acc`` and
``student/params``, which are logged last, and for ``scheme=self`` the last generation's
``test/gen<G-1>/acc``). RUNNING (killed), FAILED and KILLED runs and finished runs without those
metrics never count (they are reported on stderr as left out); tuning trials and study runs are
left out unless ``--include-trials``.

Rows: one row per distinct result-determining config. Every run logs its whole resolved config
as MLflow params (``method.temperature``, ``trainer.max_epochs``, ...); runs are grouped by
dataset, teacher, student, scheme and method AND by all of those params except the ones that
cannot change the result:

- ``seed`` (the rows aggregate over seeds) and ``resume`` (a resumed run is the same run);
- ``mlflow.*`` (where the run is recorded), ``cache_dir``, ``dataset.data_dir``,
  ``teacher_output_cache.*`` (a cache of the frozen teacher's outputs: identical outputs) and
  ``tune.*`` (the tuner's own settings; a trial's hyperparameters are ``method.*`` params);
- ``dataset.root`` of the CIFAR datasets (where the official archive lies);
- ``efficiency.*`` (measurements taken after the result, not part of it);
- ``steps_per_call`` (same batches, same order, same result by construction);
- ``trainer.enable_progress_bar``, ``trainer.enable_model_summary``,
  ``trainer.log_every_n_steps`` (display and logging only).

Everything else determines the result, including keys unknown here (when unsure, it does).
Runs of one dataset, pair, scheme and method whose configs differ are never averaged: each config
is its own row, and the ``variant`` column names a shortest list of ``key=value`` params that
tells those rows apart (keys chosen greedily, the same keys on each of those rows; the CSV's
``differs`` column lists every param that differs, ``run_ids`` and ``seeds`` the runs).

Columns, over the seeds of a row: student test accuracy (last and best-validation epoch), mean ±
sample standard deviation with the count ``n`` (a single run has no spread and shows ``(n=1)``);
the gain over ``none``; the teacher's accuracy and the share of it retained; the gap closed;
agreement with the teacher, ECE, the student's parameters, the compression ratio and the measured
speed-up over the teacher; its size (MB: the state dict, or the deployed file), batch-1 latency
(ms) and batched throughput (samples/s).

Deployed rows: a run that deployed its student (``python -m kdbench deploy=<form>`` or
``python -m kdbench.export``: ``deploy/<form>/test/acc``) adds one row per form, the student named
``<student> <form>`` (``mlp int8``, ``resnet8x4 onnx``), with the deployed model's accuracy,
agreement, ECE, parameters, file size, latency, throughput and speed-up over the teacher, grouped
by the run's config plus the form's options (the run's tag ``kdbench.deploy.<form>``). The
``deploy.*`` params group the float rows only for ``deploy=qat`` (the one form that changes
training; its training options, as one ``deploy`` entry); the other forms leave the float
student as it is.

``none`` baseline: the ``method=none`` row with the same config except the method (same dataset,
pair, scheme and every result-determining param other than ``method.*``); where there is no such
row the gain and gap are blank.

Gap closed: ``(acc - none) / (teacher - none)``, the share of the teacher's lead over the
baseline that the method recovers (above 100 %: the student beats its teacher). It is shown only
where the row's teacher beats the matched baseline by at least ``GAP_MARGIN`` (1 accuracy point);
otherwise it is blank, as the ratio of two small differences is noise (or has no meaning when the
teacher is worse than the baseline).

Writes ``leaderboard.md``, ``leaderboard.csv`` and Pareto plots (accuracy against size and against
latency) to ``--out-dir`` and logs them to a ``leaderboard`` run in MLflow. A store that cannot be
read (not an MLflow store, a missing file or directory, an unknown URI scheme) is a one-line
error; reading never creates a store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from kdbench.errors import KdbenchError

GROUP = ["dataset", "teacher", "student", "scheme", "method"]
PAIR = GROUP[:-1]
GAP_MARGIN = 0.01  # gap closed only where the teacher beats the matched baseline by >= 1 point

# params that cannot change a run's result (see the module docstring); all others determine it
IGNORED_KEYS = frozenset(
    {
        "seed",
        "resume",
        "cache_dir",
        "steps_per_call",
        "dataset.data_dir",
        "trainer.enable_progress_bar",
        "trainer.enable_model_summary",
        "trainer.log_every_n_steps",
    }
)
IGNORED_PREFIXES = ("mlflow.", "teacher_output_cache.", "tune.", "efficiency.")
ARCHIVE_DATASETS = ("kdbench.data.cifar.CIFAR10", "kdbench.data.cifar.CIFAR100")
STORE_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql")
STORE_SCHEMES += ("databricks", "databricks-uc", "uc")
UNSET = "(unset)"  # a param one run has and another lacks
# deploy options applied after training (export, calibration): never the float student's result
DEPLOY_AFTER = ("_target_", "exporter", "opset", "calibration", "calibration_samples")


def determines_result(key: str, params: dict[str, str]) -> bool:
    """Whether the config param ``key`` can change the result of a run with ``params``."""
    if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
        return False
    if key == "dataset.root":  # the official archive wherever it lies; an image folder IS the data
        return params.get("dataset._target_") not in ARCHIVE_DATASETS
    if key.startswith("deploy."):  # a post-step on the float student, except qat (training)
        return params.get("deploy.name") == "qat" and key[len("deploy.") :] not in DEPLOY_AFTER
    return True


def result_config(params: dict[str, str]) -> dict[str, str]:
    """The params of a run that determine its result (the ``deploy.*`` ones of a qat run as one
    entry, ``deploy``: ``qat ema=0.01 per_channel=True``, which the variant column shows)."""
    config = {k: v for k, v in params.items() if determines_result(k, params)}
    deploy = {k[len("deploy.") :]: config.pop(k) for k in sorted(config) if k.startswith("deploy.")}
    if deploy:
        name = deploy.pop("name", "?")
        config["deploy"] = " ".join([name, *(f"{k}={v}" for k, v in deploy.items())])
    return config


def config_id(config: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def check_store(uri: str) -> None:
    """Refuse a store that cannot be read without creating or altering anything: a missing
    SQLite file or directory, a file that is not an SQLite database or holds no MLflow tables."""
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme.lower()
    if scheme.split("+")[0] not in STORE_SCHEMES and len(scheme) != 1:  # C: a drive
        raise KdbenchError(
            f"--tracking-uri {uri}: unknown store scheme {scheme!r}: give sqlite:///FILE, a "
            "directory, http(s)://HOST or a database URL (postgresql://, mysql://, mssql://)"
        )
    if scheme.startswith("sqlite"):
        path = uri.split(":///", 1)[1].split("?", 1)[0] if ":///" in uri else ""
        if not path or path.startswith(":memory:"):
            raise KdbenchError(f"--tracking-uri {uri} names no database file")
        if not os.path.isfile(path):
            what = (
                "is a directory, not a database file"
                if os.path.isdir(path)
                else "does not exist"
                if os.path.isdir(os.path.dirname(path) or ".")
                else "is in a directory that does not exist"
            )
            raise KdbenchError(
                f"--tracking-uri {uri}: {path} {what}; give the store the runs wrote "
                "(default sqlite:///mlflow.db in the directory they ran in)"
            )
        try:
            with open(path, "rb") as f:
                header = f.read(16)
        except OSError as exc:
            raise KdbenchError(f"--tracking-uri {uri}: cannot read {path}: {exc.strerror}") from exc
        if header != b"SQLite format 3\x00":
            raise KdbenchError(f"--tracking-uri {uri}: {path} is not an SQLite database")
        import sqlite3

        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                tables = {r[0] for r in con.execute("select name from sqlite_master")}
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise KdbenchError(f"--tracking-uri {uri}: cannot read {path}: {exc}") from None
        if not {"experiments", "runs"} <= tables:
            raise KdbenchError(f"--tracking-uri {uri}: {path} is not an MLflow store (no runs)")
    elif scheme in ("", "file"):
        path = uri[len("file://") :] if scheme == "file" else uri
        if not os.path.isdir(path):
            raise KdbenchError(f"--tracking-uri {uri}: no such MLflow store directory ({path})")


def _complete(metrics: dict, params: dict, scheme: str | None) -> str | None:
    """Why a FINISHED run's record is incomplete, or None when it has its final metrics."""
    for key in ("test/acc", "student/params"):
        if key not in metrics:
            return f"FINISHED without {key}"
    if scheme == "self":
        gens = params.get("scheme.generations")
        if gens is not None and gens.isdigit() and f"test/gen{int(gens) - 1}/acc" not in metrics:
            return f"FINISHED without test/gen{int(gens) - 1}/acc"
    return None


def load_runs(
    tracking_uri: str | list[str], experiment: str, include_trials: bool = False, **filters
):
    """One row per counted result run: tags, result config and final metrics (a DataFrame).

    ``tracking_uri`` may be a list and ``experiment`` a comma-separated list: the runs of every
    such experiment found in every store are pooled. The runs left out (not FINISHED, or
    incomplete) are listed in ``df.attrs["left_out"]`` as ``(run_id, reason)``."""
    uris = [tracking_uri] if isinstance(tracking_uri, str) else list(tracking_uri)
    for uri in uris:  # before MLflow is imported: a bad store is refused in a fraction of a second
        check_store(uri)
    import pandas as pd
    from mlflow.tracking import MlflowClient

    runs = []
    for uri in uris:
        try:
            client = MlflowClient(tracking_uri=uri)
            exps = [client.get_experiment_by_name(name.strip()) for name in experiment.split(",")]
            ids = [e.experiment_id for e in exps if e is not None]
            if ids:
                runs += client.search_runs(ids, "", max_results=50000)
        except Exception as exc:  # noqa: BLE001 - any store failure is the store's: one line
            raise KdbenchError(f"cannot read the MLflow store {uri}: {_first_line(exc)}") from None
    rows, left_out = [], []
    for r in runs:
        tags = r.data.tags
        if "method" not in tags or (not include_trials and "kdbench.study" in tags):
            continue  # study/leaderboard runs, tuning trials
        row = {k: tags.get(k) for k in GROUP + ["seed", "knowledge"]}
        row["student"] = tags.get("student_config", tags.get("student"))
        row["teacher"] = tags.get("teacher_config", tags.get("teacher"))
        if not all(filters.get(k) in (None, row[k]) for k in GROUP):
            continue
        why = None
        if r.info.status != "FINISHED":
            why = r.info.status
        else:
            why = _complete(r.data.metrics, r.data.params, row["scheme"])
        if why is not None:
            left_out.append((r.info.run_id, why))
            continue
        config = result_config(r.data.params)
        row["config"] = json.dumps(config, sort_keys=True)
        row["config_id"] = config_id(config)
        row["run_id"] = r.info.run_id
        row.update(r.data.metrics)
        row.update({k: v for k, v in tags.items() if k.startswith(DEPLOY_TAG + ".")})
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["left_out"] = left_out
    if not rows and not left_out and not runs:
        raise SystemExit(f"kdbench: error: no run of experiment {experiment!r} in {uris}")
    return df


def _distinguishing_keys(configs: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    """(the fewest keys whose values tell ``configs`` apart, every key that differs), chosen
    greedily: at each step the key that splits the configs into the most groups."""
    keys = sorted({k for c in configs for k in c})
    differs = [k for k in keys if len({c.get(k, UNSET) for c in configs}) > 1]
    chosen: list[str] = []

    def groups(ks):
        return len({tuple(c.get(k, UNSET) for k in ks) for c in configs})

    while groups(chosen) < len(configs):
        best = max(differs, key=lambda k: (groups(chosen + [k]), -differs.index(k)))
        chosen.append(best)
    return sorted(chosen), differs


def _variants(agg) -> tuple[list[str], list[str]]:
    """Per row: the variant label and the list of every differing key (for the CSV)."""
    variant = [""] * len(agg)
    differs = [""] * len(agg)
    for _, idx in agg.groupby(GROUP, dropna=False).indices.items():
        if len(idx) < 2:
            continue
        configs = [json.loads(agg["config"].iloc[i]) for i in idx]
        chosen, diff = _distinguishing_keys(configs)
        for i, c in zip(idx, configs, strict=True):
            variant[i] = ", ".join(f"{k}={c.get(k, UNSET)}" for k in chosen)
            differs[i] = ", ".join(f"{k}={c.get(k, UNSET)}" for k in diff)
    return variant, differs


def _baseline_key(row) -> str:
    config = {k: v for k, v in json.loads(row.config).items() if not k.startswith("method.")}
    return json.dumps([[getattr(row, c) for c in PAIR], config], sort_keys=True)


def with_exit_rows(runs):
    """``runs`` plus one row per shallow exit of a run that reports exits (``scheme=byot``:
    ``test/exit<i>/acc``): the student named ``<student> exit<i>``, with that exit's accuracy
    and the latency, FLOPs and parameters of the network truncated there (the early-exit
    trade-off); the deepest exit is the run's own row. Agreement and ECE are blank there."""
    import re

    import pandas as pd

    exit_cols = sorted(
        (int(m.group(1)), c) for c in runs.columns if (m := re.fullmatch(r"test/exit(\d+)/acc", c))
    )
    if not exit_cols:
        return runs
    nan = float("nan")
    extra = []
    for _, r in runs.iterrows():
        present = [i for i, c in exit_cols if pd.notna(r[c])]
        for i in present[:-1]:
            row = r.copy()
            row["student"] = f"{r['student']} exit{i}"
            row["test/acc"] = r[f"test/exit{i}/acc"]
            for key, col in (
                ("test/acc_best", f"test/exit{i}/acc_best"),
                ("student/latency_ms", f"efficiency/exit{i}/latency_ms"),
                ("student/flops", f"efficiency/exit{i}/flops"),
                ("student/params", f"efficiency/exit{i}/params"),
            ):
                row[key] = r.get(col, nan)
            row["speedup"] = r.get("teacher/latency_ms", nan) / row["student/latency_ms"]
            row["test/agreement"] = row["test/ece"] = nan
            extra.append(row)
    return pd.concat([runs, pd.DataFrame(extra)], ignore_index=True) if extra else runs


DEPLOY_TAG = "kdbench.deploy"  # kdbench.deploy.<form>: the options of a deployed form (JSON)
# a deployed row's figures: (row column, deploy/<form>/ metric)
DEPLOYED = (
    ("test/acc", "test/acc"),
    ("test/acc_best", "test/acc_best"),
    ("test/agreement", "test/agreement"),
    ("test/ece", "test/ece"),
    ("student/params", "params"),
    ("student/latency_ms", "latency_ms"),
    ("student/throughput", "throughput"),
    ("speedup", "speedup"),
)


def with_deployed_rows(runs):
    """``runs`` plus one row per deployed form of a run (see the module docstring)."""
    import re

    import pandas as pd

    forms = sorted(
        {m.group(1) for c in runs.columns if (m := re.fullmatch(r"deploy/([^/]+)/test/acc", c))}
    )
    nan = float("nan")
    extra = []
    for _, r in runs.iterrows() if forms else ():
        if re.search(r" exit\d+$", str(r["student"])):  # a shallow exit's row: not deployed
            continue
        for form in forms:
            p = f"deploy/{form}/"
            if pd.isna(r.get(p + "test/acc", nan)):
                continue
            row = r.copy()
            row["student"] = f"{r['student']} {form}"
            for key, metric in DEPLOYED:
                row[key] = r.get(p + metric, nan)
            row["student/size_mb"] = r.get(p + "size_bytes", nan) / 2**20
            row["student/flops"] = nan
            options = r.get(f"{DEPLOY_TAG}.{form}")
            config = json.loads(row["config"])
            if isinstance(options, str):
                config.update(
                    {f"deploy.{form}.{k}": str(v) for k, v in json.loads(options).items()}
                )
            row["config"] = json.dumps(config, sort_keys=True)
            row["config_id"] = config_id(config)
            extra.append(row)
    return pd.concat([runs, pd.DataFrame(extra)], ignore_index=True) if extra else runs


def summarize(runs):
    """Mean, std and count over seeds for each (group, result config), with the comparisons
    against the matched ``none`` baseline."""
    import pandas as pd

    if runs.empty:
        return pd.DataFrame()
    runs = runs.copy()
    for col in (
        "test/acc_best",
        "teacher/test/acc",
        "test/agreement",
        "test/ece",
        "student/params",
        "teacher/params",
        "speedup",
        "student/latency_ms",
        "student/flops",
        "student/size_mb",
        "student/throughput",
        "test/bpc",
        "test/exact_match",
        "efficiency/tokens_per_s",
    ):
        if col not in runs:
            runs[col] = float("nan")
    runs = with_exit_rows(runs)
    if "config" not in runs:  # runs without params: one config
        runs["config"], runs["config_id"] = "{}", config_id({})
    runs = with_deployed_rows(runs)
    for col in GROUP:
        runs[col] = runs[col].fillna("?").astype(str)
    agg = (
        runs.groupby(GROUP + ["config_id", "config"], dropna=False)
        .agg(
            acc_mean=("test/acc", "mean"),
            acc_std=("test/acc", "std"),
            acc_best_mean=("test/acc_best", "mean"),
            acc_best_std=("test/acc_best", "std"),
            n=("test/acc", "count"),
            teacher_acc=("teacher/test/acc", "mean"),
            agreement=("test/agreement", "mean"),
            ece=("test/ece", "mean"),
            student_params=("student/params", "mean"),
            teacher_params=("teacher/params", "mean"),
            student_flops=("student/flops", "mean"),
            student_latency_ms=("student/latency_ms", "mean"),
            student_size_mb=("student/size_mb", "mean"),
            student_throughput=("student/throughput", "mean"),
            speedup=("speedup", "mean"),
            bpc=("test/bpc", "mean"),  # language models (lower is better)
            exact_match=("test/exact_match", "mean"),  # arithmetic: final answers
            tokens_per_s=("efficiency/tokens_per_s", "mean"),  # generation, batch 1
            seeds=("seed", lambda s: " ".join(sorted(map(str, s), key=_seed_order))),
            run_ids=("run_id", " ".join),
        )
        .reset_index()
    )
    agg["variant"], agg["differs"] = _variants(agg)
    # the none baseline: same pair, scheme and result config except method.*, and unique
    base: dict[str, list[int]] = {}
    keys = [_baseline_key(r) for r in agg.itertuples(index=False)]
    for i, (k, m) in enumerate(zip(keys, agg["method"], strict=True)):
        if m == "none":
            base.setdefault(k, []).append(i)
    nan = float("nan")
    match = [base[k][0] if len(base.get(k, [])) == 1 else None for k in keys]
    is_none = agg["method"] == "none"
    agg["none_acc"] = [
        nan if j is None or is_none.iloc[i] else agg["acc_mean"].iloc[j]
        for i, j in enumerate(match)
    ]
    agg["none_n"] = [0 if j is None else int(agg["n"].iloc[j]) for j in match]
    agg["gain_over_none"] = agg["acc_mean"] - agg["none_acc"]
    agg["retained"] = agg["acc_mean"] / agg["teacher_acc"]
    lead = agg["teacher_acc"] - agg["none_acc"]
    gap = (agg["acc_mean"] - agg["none_acc"]) / lead
    agg["gap_closed"] = gap.where(lead >= GAP_MARGIN - 1e-9)
    agg["compression"] = agg["teacher_params"] / agg["student_params"]
    agg = agg.sort_values(
        PAIR + ["acc_mean", "variant"], ascending=[True] * len(PAIR) + [False, True]
    )
    return agg.reset_index(drop=True)


def _seed_order(s: str):
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def _nan(x) -> bool:
    return x is None or x != x


def _pct(x) -> str:
    return "" if _nan(x) else f"{100 * x:.2f}"


def _acc(m, s, n) -> str:
    """``mean ± std`` over the runs of a row; a single run has no spread: ``mean (n=1)``."""
    if _nan(m):
        return ""
    if n == 1 or _nan(s):
        return f"{100 * m:.2f} (n={int(n)})"
    return f"{100 * m:.2f} ± {100 * s:.2f}"


LEGEND = [
    "n: runs (seeds) in the row; ±: sample standard deviation over them; (n=1): a single run, "
    "no spread.",
    "variant: what tells apart rows of one dataset, pair, scheme and method whose configs differ "
    "(never averaged together).",
    "gain over none: acc - acc of the method=none row with the same config except the method "
    "(blank: no such row).",
    "gap closed: (acc - none) / (teacher - none); blank where the teacher is less than "
    f"{100 * GAP_MARGIN:g} point above that none row.",
]

COLUMNS = [
    "dataset",
    "teacher -> student",
    "scheme",
    "method",
    "variant",
    "test acc % (last)",
    "test acc % (best val)",
    "n",
    "gain over none",
    "teacher acc %",
    "retained %",
    "gap closed %",
    "agreement %",
    "ECE",
    "student params",
    "compression",
    "speed-up",
    "size MB",
    "latency ms",
    "throughput /s",
    "test bpc",
    "exact match %",
    "tokens/s",
]


def _gain(x) -> str:
    return "" if _nan(x) else f"{100 * x:+.2f}"


def rows(table) -> list[list[str]]:
    out = []
    for r in table.itertuples(index=False):
        out.append(
            [
                r.dataset,
                f"{r.teacher} -> {r.student}",
                r.scheme,
                r.method,
                r.variant,
                _acc(r.acc_mean, r.acc_std, r.n),
                _acc(r.acc_best_mean, r.acc_best_std, r.n),
                str(r.n),
                _gain(r.gain_over_none),
                _pct(r.teacher_acc),
                _pct(r.retained),
                _pct(r.gap_closed),
                _pct(r.agreement),
                "" if _nan(r.ece) else f"{r.ece:.3f}",
                "" if _nan(r.student_params) else f"{int(r.student_params)}",
                "" if _nan(r.compression) else f"{r.compression:.1f}x",
                "" if _nan(r.speedup) else f"{r.speedup:.1f}x",
                "" if _nan(r.student_size_mb) else f"{r.student_size_mb:.4g}",
                "" if _nan(r.student_latency_ms) else f"{r.student_latency_ms:.3g}",
                "" if _nan(r.student_throughput) else f"{r.student_throughput:.3g}",
                "" if _nan(r.bpc) else f"{r.bpc:.3f}",
                _pct(r.exact_match),
                "" if _nan(r.tokens_per_s) else f"{r.tokens_per_s:.3g}",
            ]
        )
    return out


def to_markdown(table) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(table)]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {line}" for line in LEGEND) + "\n"


def pivot_markdown(table, column: str = "scheme") -> str:
    """Methods (and variants) as rows, the values of ``column`` (e.g. scheme) as columns:
    mean ± std test acc and n. Where two rows would land in one cell (e.g. two pairs under one
    scheme), the rows are labelled with the dataset/pair/scheme fields that vary as well."""
    cols = sorted(table[column].unique())
    records = list(table.sort_values(["method", "variant"]).itertuples(index=False))
    extra = [c for c in ("dataset", "scheme") if c != column and table[c].nunique() > 1]
    keys = {
        (*(getattr(r, c) for c in extra), r.method, r.variant, getattr(r, column)) for r in records
    }
    if len(keys) < len(records):  # rows of several pairs would share a cell: name the pair too
        extra = [c for c in PAIR if c != column and table[c].nunique() > 1]

    def label(r) -> str:
        words = [getattr(r, c) for c in extra] + [r.method]
        return " ".join(words) + (f" [{r.variant}]" if r.variant else "")

    cells: dict[tuple, list] = {}
    for r in records:
        cells.setdefault((label(r), getattr(r, column)), []).append(r)
    head = " ".join([*extra, "method"])
    lines = [f"| {head} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in sorted(dict.fromkeys(label(r) for r in records)):
        row = []
        for c in cols:
            found = cells.get((name, c), [])
            row.append("; ".join(_acc_n(r) for r in found) if found else "n/a")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {line}" for line in LEGEND[:2]) + "\n"


def _acc_n(r) -> str:
    text = _acc(r.acc_mean, r.acc_std, r.n)
    return text if r.n == 1 else f"{text} (n={r.n})"


def plot_pareto(table, path: Path) -> Path:
    """Accuracy against student size and against latency, one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    size = table["student_size_mb"] if "student_size_mb" in table else float("nan")
    # deployed rows: the file a user ships; float rows: the state dict (else float32 parameters)
    table = table.assign(plot_size_mb=size).fillna(
        {"plot_size_mb": table["student_params"] * 4 / 2**20}
    )
    for ax, col, label in (
        (axes[0], "plot_size_mb", "student size (MB): state dict, or the deployed file"),
        (axes[1], "student_latency_ms", "student latency, batch 1 (ms)"),
    ):
        for (pair, scheme), g in table.groupby(
            [table["teacher"] + " -> " + table["student"], "scheme"]
        ):
            ax.errorbar(
                g[col],
                100 * g["acc_mean"],
                yerr=100 * g["acc_std"].fillna(0),
                fmt="o",
                capsize=3,
                label=f"{pair} ({scheme})",
            )
            for r in g.itertuples(index=False):
                ax.annotate(
                    f"{r.method} [{r.variant}]" if r.variant else r.method,
                    (getattr(r, col), 100 * r.acc_mean),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy % (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("kdbench leaderboard: accuracy against size and latency")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# the terminal table: one block per dataset, pair and scheme (named in its title), fewer and
# shorter columns (the Markdown and CSV keep every column)
TERMINAL = [  # (header, cell)
    ("method", lambda r: r.method),
    ("variant", lambda r: r.variant),
    ("acc %", lambda r: _acc(r.acc_mean, r.acc_std, r.n)),
    ("n", lambda r: str(r.n)),
    ("vs none", lambda r: _gain(r.gain_over_none)),
    ("gap %", lambda r: _pct(r.gap_closed)),
    ("teacher %", lambda r: _pct(r.teacher_acc)),
    ("speed-up", lambda r: "" if _nan(r.speedup) else f"{r.speedup:.1f}x"),
    ("bpc", lambda r: "" if _nan(r.bpc) else f"{r.bpc:.3f}"),  # language models only
    ("exact %", lambda r: _pct(r.exact_match)),  # arithmetic only
]
TERMINAL_LEGEND = [
    *LEGEND[:3],
    "gap %: gap closed, (acc - none) / (teacher - none); blank where the teacher is less than "
    f"{100 * GAP_MARGIN:g} point above none. Every column: --markdown or --out-dir.",
]


def print_rich(table) -> None:
    """The table for a terminal of ``$COLUMNS`` (or the terminal's) width: one block per
    dataset, pair and scheme, the same column widths in every block; only variants wrap (between
    their ``key=value`` items)."""
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain Markdown without rich
        print(to_markdown(table))
        return
    console = Console()
    records = list(table.itertuples(index=False))
    cells = {h: [f(r) for r in records] for h, f in TERMINAL}
    widths = {h: max(len(h), *(len(c) for c in cells[h])) for h, _ in TERMINAL}
    has_variant = any(cells["variant"])
    optional = ("variant", "bpc", "exact %")  # shown where some row has a value
    shown = [h for h, _ in TERMINAL if h not in optional or any(cells[h])]
    dropped = []

    def fixed():
        return 1 + sum(widths[h] + 3 for h in shown if h != "variant")  # padding, separator

    for h in ("speed-up", "teacher %", "gap %", "vs none"):  # a narrow terminal: fewer columns
        if fixed() + (15 if has_variant else 0) <= console.width:
            break
        if h not in shown:
            continue
        shown.remove(h)
        dropped.append(h)
    widths["variant"] = max(12, min(widths["variant"], console.width - fixed() - 3))
    blocks: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        blocks.setdefault((r.dataset, f"{r.teacher} -> {r.student}", r.scheme), []).append(i)
    for (dataset, pair, scheme), idx in blocks.items():
        t = Table(
            title=f"{dataset}  {pair}  scheme={scheme}",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for h in shown:
            text = h in ("method", "variant")
            t.add_column(
                h,
                justify="left" if text else "right",
                no_wrap=h != "variant",
                overflow="fold" if h == "variant" else "ellipsis",
                min_width=widths[h],
                max_width=widths[h],
            )
        for i in idx:
            t.add_row(*(cells[h][i] for h in shown))
        console.print(t)
    if dropped:
        console.print(f"Left out for the width: {', '.join(dropped)}.", highlight=False)
    for line in TERMINAL_LEGEND:
        console.print(line, highlight=False, markup=False)


def write(table, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv = out_dir / "leaderboard.md", out_dir / "leaderboard.csv"
    md.write_text(to_markdown(table))
    table.drop(columns=["config"]).to_csv(csv, index=False)
    return [md, csv, plot_pareto(table, out_dir / "leaderboard_pareto.png")]


def log_to_mlflow(tracking_uri: str, experiment: str, files: list[Path]) -> str:
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment.split(",")[0].strip())
        if exp is None:
            raise KdbenchError(f"no experiment {experiment!r} in {tracking_uri} to log to")
        run = client.create_run(
            exp.experiment_id, run_name="leaderboard", tags={"kdbench.role": "leaderboard"}
        )
        for f in files:
            client.log_artifact(run.info.run_id, str(f))
        client.set_terminated(run.info.run_id, "FINISHED")
    except KdbenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a store that cannot be written: one line
        raise KdbenchError(
            f"cannot log the leaderboard to {tracking_uri}: {_first_line(exc)} "
            "(--no-mlflow skips it)"
        ) from None
    return run.info.run_id


def _report_left_out(left_out: list[tuple[str, str]]) -> None:
    if not left_out:
        return
    by_reason: dict[str, list[str]] = {}
    for run_id, why in left_out:
        by_reason.setdefault(why, []).append(run_id)
    parts = [f"{len(ids)} {why}" for why, ids in sorted(by_reason.items())]
    print(f"kdbench: not counted: {', '.join(parts)} run(s)", file=sys.stderr)


def leaderboard(args) -> None:
    filters = {k: getattr(args, k) for k in GROUP}
    runs = load_runs(args.tracking_uri, args.experiment, args.include_trials, **filters)
    _report_left_out(runs.attrs.get("left_out", []))
    table = summarize(runs)
    if table.empty:
        print("kdbench: error: no FINISHED runs match", file=sys.stderr)
        raise SystemExit(1)
    if args.pivot:
        if args.pivot not in table.columns:
            raise KdbenchError(f"--pivot {args.pivot} is invalid: give one of {GROUP}")
        print(pivot_markdown(table, args.pivot))
    elif args.markdown:
        print(to_markdown(table))
    else:
        print_rich(table)
    if args.out_dir:
        files = write(table, Path(args.out_dir))
        if not args.no_mlflow:
            log_to_mlflow(args.tracking_uri[0], args.experiment, files)
        print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    from kdbench.errors import run_or_exit

    p = argparse.ArgumentParser(
        prog="python -m kdbench.leaderboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tracking-uri",
        action="append",
        help="MLflow store, repeatable (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db); "
        "with --out-dir the files are logged to the first",
    )
    p.add_argument("--experiment", default="kdbench", help="experiment name(s), comma-separated")
    for key in GROUP:
        p.add_argument(f"--{key}", help=f"only runs with this {key}")
    p.add_argument("--include-trials", action="store_true", help="count tuning trials too")
    p.add_argument("--out-dir", help="write leaderboard.md/.csv and the Pareto plot here")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the files to MLflow")
    p.add_argument("--pivot", help="print one column per value of this tag (e.g. scheme)")
    p.add_argument("--markdown", action="store_true", help="print Markdown instead of a table")
    args = p.parse_args(argv)
    default_uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    args.tracking_uri = args.tracking_uri or [default_uri]
    # a server that does not answer: an error in seconds, not after minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    run_or_exit(leaderboard, args)


if __name__ == "__main__":
    main()

"""``python -m kdbench.leaderboard``: compare methods over MLflow runs, on accuracy and efficiency.

Reads FINISHED runs only (FAILED and KILLED never count; tuning trials and study runs are left out
unless ``--include-trials``), groups them by dataset, teacher, student, scheme and method, and
reports over seeds: student test accuracy (last and best-validation epoch, mean ± std, count), the
gain over ``none`` for the same pair and scheme, the teacher's accuracy, the share of it retained,
the gap closed ``(acc - none) / (teacher - none)``, agreement with the teacher, ECE, the
student's parameters, the compression ratio and the measured speed-up over the teacher.
Writes ``leaderboard.md``, ``leaderboard.csv`` and Pareto plots (accuracy against size and against
latency) to ``--out-dir`` and logs them to a ``leaderboard`` run in MLflow.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

GROUP = ["dataset", "teacher", "student", "scheme", "method"]
PAIR = GROUP[:-1]


def load_runs(
    tracking_uri: str | list[str], experiment: str, include_trials: bool = False, **filters
):
    """One row per FINISHED result run: tags and final metrics (a pandas DataFrame).

    ``tracking_uri`` may be a list and ``experiment`` a comma-separated list: the runs of every
    such experiment found in every store are pooled."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    uris = [tracking_uri] if isinstance(tracking_uri, str) else list(tracking_uri)
    runs = []
    for uri in uris:
        client = MlflowClient(tracking_uri=uri)
        exps = [client.get_experiment_by_name(name.strip()) for name in experiment.split(",")]
        ids = [e.experiment_id for e in exps if e is not None]
        if ids:
            runs += client.search_runs(ids, "attributes.status = 'FINISHED'", max_results=50000)
    if not runs:
        raise SystemExit(f"kdbench: error: no finished run of experiment {experiment!r} in {uris}")
    rows = []
    for r in runs:
        tags = r.data.tags
        if "method" not in tags or (not include_trials and "kdbench.study" in tags):
            continue  # study/leaderboard runs, tuning trials
        row = {k: tags.get(k) for k in GROUP + ["seed", "knowledge"]}
        row["student"] = tags.get("student_config", tags.get("student"))
        row["teacher"] = tags.get("teacher_config", tags.get("teacher"))
        row["run_id"] = r.info.run_id
        row.update(r.data.metrics)
        if all(filters.get(k) in (None, row[k]) for k in GROUP):
            rows.append(row)
    return pd.DataFrame(rows)


def summarize(runs):
    """Mean, std and count over seeds for each group, with the derived comparisons."""
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
    ):
        if col not in runs:
            runs[col] = float("nan")
    agg = (
        runs.groupby(GROUP, dropna=False)
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
            speedup=("speedup", "mean"),
        )
        .reset_index()
    )
    base = agg[agg["method"] == "none"].set_index(PAIR)["acc_mean"]
    keys = list(zip(*(agg[c] for c in PAIR), strict=True))
    none_acc = pd.Series([base.get(k, float("nan")) for k in keys], index=agg.index)
    agg["gain_over_none"] = agg["acc_mean"] - none_acc
    agg["retained"] = agg["acc_mean"] / agg["teacher_acc"]
    agg["gap_closed"] = (agg["acc_mean"] - none_acc) / (agg["teacher_acc"] - none_acc)
    agg["compression"] = agg["teacher_params"] / agg["student_params"]
    return agg.sort_values(PAIR + ["acc_mean"], ascending=[True] * len(PAIR) + [False])


def _pct(x) -> str:
    return "" if x != x else f"{100 * x:.2f}"


def _pm(m, s) -> str:
    return f"{100 * m:.2f} ± {100 * (0.0 if s != s else s):.2f}"


COLUMNS = [
    "dataset",
    "teacher -> student",
    "scheme",
    "method",
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
]


def rows(table) -> list[list[str]]:
    out = []
    for r in table.itertuples(index=False):
        gain = "" if r.gain_over_none != r.gain_over_none else f"{100 * r.gain_over_none:+.2f}"
        out.append(
            [
                r.dataset,
                f"{r.teacher} -> {r.student}",
                r.scheme,
                r.method,
                _pm(r.acc_mean, r.acc_std),
                _pm(r.acc_best_mean, r.acc_best_std),
                str(r.n),
                gain,
                _pct(r.teacher_acc),
                _pct(r.retained),
                _pct(r.gap_closed),
                _pct(r.agreement),
                "" if r.ece != r.ece else f"{r.ece:.3f}",
                "" if r.student_params != r.student_params else f"{int(r.student_params)}",
                "" if r.compression != r.compression else f"{r.compression:.1f}x",
                "" if r.speedup != r.speedup else f"{r.speedup:.1f}x",
            ]
        )
    return out


def to_markdown(table) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(table)]
    return "\n".join(lines) + "\n"


def pivot_markdown(table, column: str = "scheme") -> str:
    """Methods as rows, the values of ``column`` (e.g. scheme) as columns: mean ± std test acc."""
    cols = sorted(table[column].unique())
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    cells = {(r.method, getattr(r, column)): r for r in table.itertuples(index=False)}
    for method in dict.fromkeys(table.sort_values("method")["method"]):
        row = []
        for c in cols:
            r = cells.get((method, c))
            row.append("n/a" if r is None else f"{_pm(r.acc_mean, r.acc_std)} (n={r.n})")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_pareto(table, path: Path) -> Path:
    """Accuracy against student size and against latency, one point per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, col, label in (
        (axes[0], "student_params", "student parameters"),
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
                    r.method,
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


def print_rich(table) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain Markdown without rich
        print(to_markdown(table))
        return
    t = Table(title="kdbench leaderboard")
    for c in COLUMNS:
        t.add_column(c, overflow="fold")
    for r in rows(table):
        t.add_row(*r)
    Console().print(t)


def write(table, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv = out_dir / "leaderboard.md", out_dir / "leaderboard.csv"
    md.write_text(to_markdown(table))
    table.to_csv(csv, index=False)
    return [md, csv, plot_pareto(table, out_dir / "leaderboard_pareto.png")]


def log_to_mlflow(tracking_uri: str, experiment: str, files: list[Path]) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment.split(",")[0].strip())
    run = client.create_run(
        exp.experiment_id, run_name="leaderboard", tags={"kdbench.role": "leaderboard"}
    )
    for f in files:
        client.log_artifact(run.info.run_id, str(f))
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def main(argv: list[str] | None = None) -> None:
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
    filters = {k: getattr(args, k) for k in GROUP}
    table = summarize(load_runs(args.tracking_uri, args.experiment, args.include_trials, **filters))
    if table.empty:
        print("kdbench: error: no FINISHED runs match", file=sys.stderr)
        raise SystemExit(1)
    if args.pivot:
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


if __name__ == "__main__":
    main()

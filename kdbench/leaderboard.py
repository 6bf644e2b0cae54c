"""Compare methods across MLflow runs: ``python -m kdbench.leaderboard``.

Reads FINISHED runs only (a FAILED or KILLED run never counts as a result), groups them by
dataset, teacher, student, scheme and method, and reports over seeds the mean +- std of the
student's test accuracy, the gain over ``none`` for the same pair and scheme, and the teacher.
"""

from __future__ import annotations

import argparse
import os
import sys

GROUP = ["dataset", "teacher", "student", "scheme", "method"]


def load_runs(tracking_uri: str, experiment: str):
    """One row per FINISHED run: its tags and final metrics (a pandas DataFrame)."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"kdbench: error: no experiment {experiment!r} in {tracking_uri}")
    rows = []
    for r in client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'FINISHED'", max_results=50000
    ):
        tags = r.data.tags
        row = {k: tags.get(k) for k in GROUP + ["seed", "knowledge"]}
        row["student"] = tags.get("student_config", tags.get("student"))
        row["teacher"] = tags.get("teacher_config", tags.get("teacher"))
        row.update(r.data.metrics)
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(runs):
    """Mean, std and count over seeds for each group, with the gain over ``none``."""
    import pandas as pd

    if runs.empty:
        return pd.DataFrame()
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
            student_params=("student/params", "first"),
            teacher_params=("teacher/params", "first"),
        )
        .reset_index()
    )
    base = agg[agg["method"] == "none"].set_index(GROUP[:-1])["acc_mean"]
    keys = list(zip(*(agg[c] for c in GROUP[:-1]), strict=True))
    agg["gain_over_none"] = [
        a - base[k] if k in base.index else float("nan")
        for a, k in zip(agg["acc_mean"], keys, strict=True)
    ]
    return agg.sort_values(GROUP[:-1] + ["acc_mean"], ascending=[True] * 4 + [False])


def to_markdown(table) -> str:
    def pct(m, s):
        return f"{100 * m:.2f} ± {100 * (0 if s != s else s):.2f}"

    lines = [
        "| dataset | teacher -> student | scheme | method | test acc % (last) "
        "| test acc % (best val) "
        "| n | gain over none | teacher acc % | agreement % | ECE | student params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples(index=False):
        gain = "" if r.gain_over_none != r.gain_over_none else f"{100 * r.gain_over_none:+.2f}"
        lines.append(
            f"| {r.dataset} | {r.teacher} -> {r.student} | {r.scheme} | {r.method} "
            f"| {pct(r.acc_mean, r.acc_std)} | {pct(r.acc_best_mean, r.acc_best_std)} | {r.n} "
            f"| {gain} | {100 * r.teacher_acc:.2f} | {100 * r.agreement:.2f} | {r.ece:.3f} "
            f"| {int(r.student_params)} |"
        )
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
            std = 0.0 if r is None or r.acc_std != r.acc_std else r.acc_std
            row.append(
                "n/a" if r is None else f"{100 * r.acc_mean:.2f} ± {100 * std:.2f} (n={r.n})"
            )
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kdbench.leaderboard", description=__doc__)
    p.add_argument(
        "--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    )
    p.add_argument("--experiment", default="kdbench")
    p.add_argument("--out", help="write the table as Markdown to this file")
    p.add_argument("--pivot", help="one column per value of this tag (e.g. scheme)")
    args = p.parse_args(argv)
    table = summarize(load_runs(args.tracking_uri, args.experiment))
    if table.empty:
        print("no FINISHED runs", file=sys.stderr)
        raise SystemExit(1)
    md = pivot_markdown(table, args.pivot) if args.pivot else to_markdown(table)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)


if __name__ == "__main__":
    main()

"""results/deploy.md: what a user would ship, on MNIST-1D.

For the default pair (cnn1d -> mlp) and the small CNN student (cnn1d -> cnn1d_small), methods
none, kd and dist (the best method on the default pair in results/mnist1d_zoo.md), 3 seeds: the
float PyTorch student against its deployed forms (ONNX, int8 post-training quantization,
quantization-aware distillation, pruned + KD), each with its test accuracy (mean ± std over
seeds), size, batch-1 latency and speed-up over the teacher (ONNX Runtime for the deployed
forms, PyTorch for the float student and the teacher; timed in alternation, one thread).

Commands (written at the top of the results file too):

    python -m kdbench -m student=mlp,cnn1d_small method=none,kd,dist seed=0,1,2 deploy=int8 ...
    python -m kdbench -m student=mlp,cnn1d_small method=none,kd,dist seed=0,1,2 deploy=qat ...
    python -m kdbench.export RUN_ID deploy=prune          # each deploy=int8 run

    python scripts/deploy_grid.py     # the grid (about 40 minutes on 2 CPU cores)

Settings through the environment (defaults: the grid above): DEPLOY_STUDENTS, DEPLOY_METHODS,
DEPLOY_SEEDS (comma-separated), DEPLOY_EXTRA (overrides for every run, space-separated;
default dataset.transfer_size=5000),
DEPLOY_OUT (the results file), DEPLOY_DB (the MLflow store file). A smoke test of the script:

    DEPLOY_SEEDS=0 DEPLOY_METHODS=none,kd DEPLOY_OUT=outputs/deploy_smoke.md \\
    DEPLOY_EXTRA="trainer.max_epochs=1 dataset.num_samples=600 dataset.transfer_size=400 \\
    deploy.finetune_epochs=1" python scripts/deploy_grid.py

Runs already in the store are not run again (a stopped grid continues where it was).
"""

from __future__ import annotations

import datetime
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "deploy"
FORMS = ("float", "onnx", "int8", "qat", "prune")


def env_list(name: str, default: str) -> list[str]:
    return [v for v in os.environ.get(name, default).split(",") if v]


STUDENTS = env_list("DEPLOY_STUDENTS", "mlp,cnn1d_small")
METHODS = env_list("DEPLOY_METHODS", "none,kd,dist")
SEEDS = env_list("DEPLOY_SEEDS", "0,1,2")
# a transfer set of 5000 (not 20000), as the other MNIST-1D grids, keeps the grid to about 40
# minutes on 2 CPU cores
DEFAULT_EXTRA = "dataset.transfer_size=5000"
EXTRA = shlex.split(os.environ.get("DEPLOY_EXTRA", DEFAULT_EXTRA))
OUT = ROOT / os.environ.get("DEPLOY_OUT", "results/deploy.md")
DB = ROOT / os.environ.get("DEPLOY_DB", "outputs/deploy.db")
URI = f"sqlite:///{DB}"
DEFAULT = not any(k in os.environ for k in ("DEPLOY_STUDENTS", "DEPLOY_METHODS", "DEPLOY_SEEDS"))
DEFAULT = DEFAULT and os.environ.get("DEPLOY_EXTRA", DEFAULT_EXTRA) == DEFAULT_EXTRA


def grid(form: str) -> list[str]:
    """The multirun of one training form (DEPLOY_EXTRA's deploy.* keys go to the prune step)."""
    sweep = [f"student={','.join(STUDENTS)}", f"method={','.join(METHODS)}"]
    sweep += [f"seed={','.join(SEEDS)}", f"deploy={form}", f"mlflow.experiment={EXPERIMENT}"]
    extra = [e for e in EXTRA if not e.startswith("deploy.")]
    return [sys.executable, "-m", "kdbench", "-m", *sweep, *extra]


def runs():
    from mlflow.tracking import MlflowClient

    client = MlflowClient(URI)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    found = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    return [r for r in found if "method" in r.data.tags]


def key(r) -> tuple[str, str, str, str]:
    t = r.data.tags
    return t["student_config"], t["method"], t["seed"], r.data.params.get("deploy.name", "none")


def run(cmd: list[str]) -> None:
    print("+ " + shlex.join(cmd[1:] if cmd[0] == sys.executable else cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "MLFLOW_TRACKING_URI": URI})


def train() -> None:
    """The deploy=int8 and deploy=qat runs not yet in the store, then prune each int8 run."""
    for form in ("int8", "qat"):
        done = {key(r) for r in runs()}
        todo = [
            (s, m, seed)
            for s in STUDENTS
            for m in METHODS
            for seed in SEEDS
            if (s, m, seed, form) not in done
        ]
        if todo:
            run(grid(form))
    prune_extra = [e for e in EXTRA if e.startswith("deploy.")]
    for r in runs():
        if key(r)[3] == "int8" and "deploy/prune/test/acc" not in r.data.metrics:
            cmd = [sys.executable, "-m", "kdbench.export", r.info.run_id, "deploy=prune"]
            run(cmd + prune_extra)


def figures(r, form: str) -> dict[str, float] | None:
    """(acc, size in KB, latency in ms, speed-up over the teacher, params) of one form."""
    m = r.data.metrics
    if form == "float":
        if "student/latency_ms" not in m:
            return None
        return {
            "acc": m["test/acc"],
            "kb": m["student/size_mb"] * 1024,
            "ms": m["student/latency_ms"],
            "speedup": m["speedup"],
            "params": m["student/params"],
        }
    p = f"deploy/{form}/"
    if p + "test/acc" not in m:
        return None
    return {
        "acc": m[p + "test/acc"],
        "kb": m[p + "size_bytes"] / 1024,
        "ms": m[p + "latency_ms"],
        "speedup": m[p + "speedup"],
        "params": m[p + "params"],
    }


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return ""
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def table() -> tuple[list[str], list[str]]:
    rows = [
        "| student | method | form | test acc % | n | size KB | params | latency ms (b=1) "
        "| speed-up over teacher |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    headline = []
    found = runs()
    teacher_acc = [r.data.metrics.get("teacher/test/acc") for r in found]
    teacher_acc = [a for a in teacher_acc if a is not None]
    teacher_ms = [r.data.metrics.get("teacher/latency_ms") for r in found]
    teacher_ms = [t for t in teacher_ms if t is not None]
    for s in STUDENTS:
        for meth in METHODS:
            accs = {}
            for form in FORMS:
                source = "qat" if form == "qat" else "int8"
                picked = [
                    f
                    for r in found
                    if key(r)[:2] == (s, meth)
                    and key(r)[3] == source
                    and (f := figures(r, form)) is not None
                ]
                if not picked:
                    continue
                accs[form] = statistics.mean(p["acc"] for p in picked)
                rows.append(
                    f"| {s} | {meth} | {form} | {mean_std([p['acc'] for p in picked], 100)} | "
                    f"{len(picked)} | {statistics.mean(p['kb'] for p in picked):.1f} | "
                    f"{statistics.mean(p['params'] for p in picked):.0f} | "
                    f"{mean_std([p['ms'] for p in picked], digits=3)} | "
                    f"{statistics.mean(p['speedup'] for p in picked):.1f}x |"
                )
            if "float" in accs:
                deltas = ", ".join(
                    f"{f} {100 * (accs[f] - accs['float']):+.2f}" for f in FORMS[1:] if f in accs
                )
                headline.append(
                    f"- {s}, {meth}: float {100 * accs['float']:.2f}%; points against float: "
                    f"{deltas}"
                )
    if teacher_acc:
        headline.insert(
            0,
            f"- teacher cnn1d: {100 * statistics.mean(teacher_acc):.2f}% test accuracy, "
            f"{statistics.mean(teacher_ms):.3f} ms at batch 1 (PyTorch, one thread).",
        )
    return rows, headline


def write() -> None:
    rows, headline = table()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    extra = " ".join(EXTRA)
    note = (
        []
        if DEFAULT
        else [
            "**SMOKE SETTING, NOT RESULTS**: made with overrides of the grid "
            f"(students {STUDENTS}, methods {METHODS}, seeds {SEEDS}, extra `{extra}`). "
            "Run `python scripts/deploy_grid.py` for the real table.",
            "",
        ]
    )
    students, methods, seeds = ",".join(STUDENTS), ",".join(METHODS), ",".join(SEEDS)
    train_extra = " ".join(e for e in EXTRA if not e.startswith("deploy."))
    prune_extra = " ".join(e for e in EXTRA if e.startswith("deploy."))
    common = f"seed={seeds} mlflow.experiment={EXPERIMENT} {train_extra}".rstrip()
    lines = [
        "# Shipping the student: float, ONNX, int8, quantization-aware KD, pruned + KD",
        "",
        *note,
        f"Produced by `python scripts/deploy_grid.py` ({datetime.date.today()}, "
        f"{os.cpu_count()} CPU cores, kdbench {commit or '?'}), MLflow store `{DB.name}`:",
        "",
        "```",
        f"python -m kdbench -m student={students} method={methods} deploy=int8 {common}",
        f"python -m kdbench -m student={students} method={methods} deploy=qat {common}",
        f"python -m kdbench.export RUN_ID deploy=prune {prune_extra}".rstrip()
        + "   # every deploy=int8 run",
        "```",
        "",
        "MNIST-1D, teacher cnn1d (88k parameters), 15 epochs unless the command says otherwise,",
        "a transfer set of 5000 unlabelled samples (dataset.transfer_size) for the KD methods.",
        "Forms: `float` is the PyTorch student (size: its state dict); `onnx` its ONNX export;",
        "`int8` ONNX Runtime static int8 quantization (1024 calibration samples from the training",
        "split); `qat` quantization-aware distillation (fake int8 during training, then the same",
        "int8 quantization); `prune` half of the channels of every prunable layer removed (L1",
        "norm), then 5 epochs of KD from the teacher. Deployed forms run with ONNX Runtime on the",
        "CPU; latency is the median at batch 1, one thread, timed in alternation with the PyTorch",
        "teacher; speed-up is the teacher's latency over the form's. Accuracy: mean ± std over",
        "seeds. `none` is the student trained alone (then pruned and distilled for `prune`).",
        "",
        *rows,
        "",
        "Headline figures (accuracy points of each form against the float student):",
        "",
        *headline,
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


def main() -> None:
    DB.parent.mkdir(parents=True, exist_ok=True)
    train()
    write()


if __name__ == "__main__":
    main()

"""Wall time of the default ``python -m kdbench`` on this machine, cold and warm.

cold: a new working directory and an empty cache (data generated, teacher trained, new MLflow
store); warm: the same command again (data and teacher cached). Writes results/wall_time.md.
Usage: python scripts/wall_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or "?"


def timed(cmd, cwd, env) -> float:
    start = time.perf_counter()
    subprocess.run(
        cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "results" / "wall_time.md"))
    args = p.parse_args()
    cmd = [sys.executable, "-m", "kdbench", "trainer.enable_progress_bar=false"]
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "KDBENCH_CACHE_DIR": f"{tmp}/cache"}
            env.pop("MLFLOW_TRACKING_URI", None)
            cold.append(timed(cmd, tmp, env))
            warm.append(timed(cmd, tmp, env))
    helpt = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            helpt.append(timed([sys.executable, "-m", "kdbench", "--help"], tmp, dict(os.environ)))

    def fmt(xs):
        return f"{statistics.median(xs):.1f} s (runs: {', '.join(f'{x:.1f}' for x in xs)})"

    text = (
        "# Wall time of `python -m kdbench` (default: kd, cnn1d -> mlp, MNIST-1D, 15 epochs)\n\n"
        f"Produced by `python scripts/wall_time.py --repeats {args.repeats}` on "
        f"{os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"kdbench {commit()}.\n\n"
        "| case | median wall time |\n|---|---|\n"
        "| cold: new directory, empty cache (data generated, teacher trained, new MLflow store) "
        f"| {fmt(cold)} |\n"
        f"| warm: data and teacher cached | {fmt(warm)} |\n"
        f"| `python -m kdbench --help` | {fmt(helpt)} |\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Shared fixtures: tiny configs composed from the real conf/ with Hydra's compose API, and a
session-wide cache and MLflow store in a temporary directory (nothing touches ~ or the repo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Small enough for seconds per run on 2 CPU cores, large enough that every code path runs.
TINY = [
    "dataset.num_samples=600",
    "dataset.val_size=80",
    "dataset.transfer_size=400",
    "dataset.batch_size=64",
    "teacher.epochs=2",
    "teacher.kwargs.channels=[8,8,16,16]",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kdbench")


@pytest.fixture(scope="session", autouse=True)
def isolated_env(workdir):
    """Cache and MLflow store of the whole test session live in a temporary directory."""
    old = {k: os.environ.get(k) for k in ("KDBENCH_CACHE_DIR", "MLFLOW_TRACKING_URI")}
    os.environ["KDBENCH_CACHE_DIR"] = str(workdir / "cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["KDBENCH_PRINT_METRICS"] = "0"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# TINY without the single-teacher keys, for teacher=ensemble (whose members say their own)
TINY_NO_TEACHER = [o for o in TINY if not o.startswith("teacher.kwargs")]


def compose(*overrides: str, tiny: bool | list[str] = True, config_name: str = "config"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from kdbench.cli import config_dir

    with initialize_config_dir(config_dir(), version_base="1.3"):
        base = tiny if isinstance(tiny, list) else TINY if tiny else []
        return hydra_compose(config_name, overrides=[*base, *overrides])


def run_cli(*args: str, cwd: Path, tiny: bool = True, env: dict | None = None, timeout: int = 600):
    """``python -m kdbench ARGS`` in a subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset it
    flags = [a for a in args if a.startswith("-")]  # argparse wants flags before overrides
    overrides = [a for a in args if not a.startswith("-")]
    cmd = [sys.executable, "-m", "kdbench", *flags, *(TINY if tiny else []), *overrides]
    return subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def mlflow_runs(experiment: str, uri: str | None = None):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri or os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, []
    return client, client.search_runs([exp.experiment_id])


def finished_method_scheme_pairs(tmp_path: Path, methods: str, *extra: str) -> set[tuple[str, str]]:
    """Sweep ``methods`` x every scheme through the CLI (tiny, 1 epoch, the small CNN student);
    return the (method, scheme) pairs whose MLflow run FINISHED."""
    uri = f"sqlite:///{tmp_path / 'pairs.db'}"
    proc = run_cli(
        "-m",
        f"method={methods}",
        "scheme=offline,online,self",
        "student=cnn1d_small",
        "++scheme.generations=2",
        "trainer.max_epochs=1",
        # composition is what is tested here, not training: one served batch, no efficiency
        "++trainer.limit_train_batches=1",
        "efficiency.enabled=false",
        *extra,
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": uri},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = mlflow_runs("kdbench", uri=uri)
    return {
        (r.data.tags["method"], r.data.tags["scheme"]) for r in runs if r.info.status == "FINISHED"
    }


def run_main_in_process(override: str, cwd: Path) -> subprocess.CompletedProcess:
    """``kdbench.cli.main()`` on one override in a fresh interpreter; its stdout ends with
    ``EXIT <code> <torch imported> <lightning imported>`` (config errors must come before torch)."""
    code = (
        "import sys\n"
        "from kdbench.cli import main\n"
        f"sys.argv = ['kdbench', {override!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n"
        "    print('EXIT', e.code, 'torch' in sys.modules, 'lightning' in sys.modules)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches run far faster on one thread than on two threads that share busy cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

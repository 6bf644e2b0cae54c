"""``python -m kdbench``: compose the experiment with Hydra and run it.

Config errors print one line (``kdbench: error: ...``) and exit 2, without a traceback.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig


def config_dir() -> str:
    """``conf/`` of a source checkout, else the copy installed as ``kdbench/conf``."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"kdbench's conf/ directory was not found next to {here}")


@hydra.main(config_path=config_dir(), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> float:
    from kdbench.errors import quiet_store_logs, run_or_exit
    from kdbench.validate import check_config

    run_or_exit(check_config, cfg)  # config-only checks first: no torch import for a typo
    quiet_store_logs()  # a full or read-only store: one line from run_or_exit, no log dump
    from kdbench.run import run

    metrics = run_or_exit(run, cfg)
    return metrics["val/acc_best"]  # what a Hydra sweeper would optimise: never test accuracy


def sweep_main(entry) -> None:
    """Call the ``@hydra.main`` function ``entry``. A refused or failed job of a multirun
    (``-m``) does not stop the sweep: the other jobs run, and at the end each failed job is
    listed in one line and the exit code is 1 (see :func:`kdbench.errors.report`)."""
    import os
    import sys
    import tempfile

    from kdbench.errors import FAILURES_ENV

    fd, path = tempfile.mkstemp(prefix="kdbench-failures-", suffix=".txt")
    os.close(fd)
    old = os.environ.get(FAILURES_ENV)
    os.environ[FAILURES_ENV] = path  # inherited by the jobs (the joblib launcher's workers too)
    try:
        entry()
        code = None
    except SystemExit as exc:
        code = exc
    finally:
        with open(path) as f:
            failed = [line.rstrip("\n") for line in f if line.strip()]
        os.unlink(path)
        if old is None:
            os.environ.pop(FAILURES_ENV, None)
        else:
            os.environ[FAILURES_ENV] = old
    if failed:
        print(
            f"kdbench: error: {len(failed)} job(s) of the multirun failed (the other jobs ran):",
            file=sys.stderr,
        )
        for line in failed:
            print(line, file=sys.stderr)
        signalled = code is not None and isinstance(code.code, int) and code.code > 2
        sys.exit(code.code if signalled else 1)  # 130 / 143: a signal stopped the sweep
    if code is not None:
        raise code


def main() -> None:
    sweep_main(_main)


if __name__ == "__main__":
    main()

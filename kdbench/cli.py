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
    from kdbench.errors import run_or_exit
    from kdbench.validate import check_config

    run_or_exit(check_config, cfg)  # config-only checks first: no torch import for a typo
    from kdbench.run import run

    metrics = run_or_exit(run, cfg)
    return metrics["val/acc_best"]  # what a Hydra sweeper would optimise: never test accuracy


def main() -> None:
    _main()


if __name__ == "__main__":
    main()

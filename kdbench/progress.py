"""Plain progress lines for logs: what runs now, and one line per epoch.

Lightning's progress bar redraws one terminal line, so a run whose output goes to a file or a
pipe (a cluster job, ``nohup``, CI) stays silent for minutes. Where stdout is not a terminal,
every Trainer kdbench builds (the teacher's included) prints instead::

    kdbench: fitting the teacher (15 epochs, 29 batches per epoch)
    kdbench: epoch 3/15 train/loss=0.8123 val/acc=0.7125 (4.1 s)

``KDBENCH_PROGRESS`` chooses: ``auto`` (default: the bar on a terminal, as
``trainer.enable_progress_bar`` says; plain lines otherwise), ``plain`` (lines, no bar), ``bar``
(the bar only) or ``none`` (neither; phase lines off too). Phase lines (teacher training, teacher
outputs, testing, efficiency, generations) go through :func:`say`.
"""

from __future__ import annotations

import os
import sys
import time

MODES = ("auto", "plain", "bar", "none")


def mode() -> str:
    """The effective mode: ``plain``, ``bar`` or ``none`` (``auto`` resolved on stdout)."""
    value = os.environ.get("KDBENCH_PROGRESS", "auto").strip().lower() or "auto"
    if value not in MODES:
        from kdbench.errors import ConfigError

        raise ConfigError("KDBENCH_PROGRESS", value, f"use one of {', '.join(MODES)}")
    if value == "auto":
        try:
            tty = sys.stdout.isatty()
        except (AttributeError, ValueError):  # replaced or closed stdout
            tty = False
        return "bar" if tty else "plain"
    return value


def say(msg: str) -> None:
    """Print ``kdbench: msg`` now (flushed), unless ``KDBENCH_PROGRESS=none``."""
    if mode() != "none":
        print(f"kdbench: {msg}", flush=True)


def _format(value) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


def _make_callback():
    import lightning as L

    class PlainProgress(L.Callback):
        """One ``kdbench: epoch E/N ...`` line per training epoch (rank 0 only), with the
        epoch's training losses and validation accuracy, and a line when a fit or test starts.

        An epoch's line is printed when the next epoch starts (or the fit ends): only then has
        the module logged the epoch's training losses (its ``on_train_epoch_end`` runs after
        the callbacks')."""

        def __init__(self) -> None:
            self._epoch: int | None = None
            self._start = 0.0

        def on_fit_start(self, trainer, pl_module) -> None:
            if not trainer.is_global_zero:
                return
            role = "the teacher" if not trainer.loggers else "the student"
            if type(pl_module).__name__ == "Online":
                role = "the peers"
            prefix = getattr(pl_module, "tag_prefix", "").rstrip("_")
            if prefix:
                role += f" ({prefix})"
            say(f"fitting {role} ({trainer.max_epochs} epochs)")

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._report(trainer)
            self._epoch, self._start = trainer.current_epoch, time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            self._report(trainer)

        def on_test_start(self, trainer, pl_module) -> None:
            if trainer.is_global_zero:
                which = getattr(pl_module, "test_tag", "")
                say(f"testing{f' ({which} epoch)' if which else ''}")

        def _report(self, trainer) -> None:
            epoch, self._epoch = self._epoch, None
            if epoch is None or not trainer.is_global_zero:
                return
            metrics = trainer.callback_metrics
            shown = [
                f"{k}={_format(v)}"
                for k, v in sorted(metrics.items())
                if k.startswith("train/") and k.endswith("loss")
            ]
            if "val/acc" in metrics:
                shown.append(f"val/acc={_format(metrics['val/acc'])}")
            seconds = time.perf_counter() - self._start
            total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
            say(f"epoch {epoch + 1}/{total} {' '.join(shown)} ({seconds:.1f} s)".replace("  ", " "))

    return PlainProgress()


def trainer_options(kwargs: dict) -> dict:
    """``lightning.Trainer`` keyword arguments with kdbench's progress reporting: the plain
    callback added (mode ``plain``) and the bar off unless the mode is ``bar``."""
    current = mode()
    if current == "bar":
        return kwargs
    callbacks = kwargs.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
    if current == "plain":
        callbacks.append(_make_callback())
    return {**kwargs, "callbacks": callbacks, "enable_progress_bar": False}

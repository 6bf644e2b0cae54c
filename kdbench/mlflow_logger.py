"""Lightning's MLFlowLogger, except that kdbench, not Lightning, ends the MLflow run.

Lightning's logger marks the run FINISHED whenever a fit or a test ends. kdbench ends it itself,
once everything the run records is recorded (:func:`kdbench.run.run`): a run killed between its
fit and its last artifact stays unfinished and resumable, and a born-again run is not FINISHED
between generations. A module of its own (importing Lightning) so that the class pickles by
name, as ``ddp_spawn`` needs.
"""

from __future__ import annotations

from lightning.pytorch.loggers import MLFlowLogger


class KdbenchMLFlowLogger(MLFlowLogger):
    def finalize(self, status: str = "success") -> None:  # kdbench sets the run's status
        pass

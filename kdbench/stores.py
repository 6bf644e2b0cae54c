"""The MLflow and Optuna stores, safe to open from several processes starting at once.

Opening a new store creates its schema, and opening an experiment is a check then a create:
two processes doing either at the same time on a fresh store lose one of them (``table
registered_models already exists``, Optuna's ``alembic_version``, a unique-constraint error on
the experiment name). For SQLite stores, kdbench holds an exclusive lock on ``<database>.lock``
(next to the database file) around both; for PostgreSQL stores (workers on several machines), a
PostgreSQL advisory lock of the database; other databases get the experiment with a retry when
another process created it first. SQLite writers wait for each other (MLflow sets a 20 s busy
timeout itself; Optuna's storage gets 60 s) instead of failing with ``database is locked``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from kdbench.cachefile import file_lock
from kdbench.errors import KdbenchError

SQLITE_TIMEOUT_S = 60  # how long an Optuna SQLite writer waits for another one


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:`` URL (None: not SQLite, or in memory)."""
    if not str(url).startswith("sqlite"):
        return None
    try:
        from sqlalchemy.engine import make_url

        database = make_url(str(url)).database
    except Exception:  # noqa: BLE001 - a malformed URL fails later, where it is opened
        return None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser().absolute()


# the advisory lock's key, one per database: "kdbe" (any constant shared by all kdbench processes)
PG_LOCK_KEY = 0x6B646265


PG_CONNECT_TIMEOUT_S = 10  # a host that drops packets: no 2-minute TCP wait


@contextlib.contextmanager
def _postgres_lock(url: str):
    """PostgreSQL's session advisory lock ``PG_LOCK_KEY`` on the database of ``url``, held on a
    connection of its own. Without it, two processes opening a fresh database at once both
    create the schema and one fails (``duplicate key value violates unique constraint
    "pg_type_typname_nsp_index"``: MLflow's and Optuna's ``alembic_version``). A database that
    cannot be reached (no server, a wrong host, password or database name) is one line here,
    at once: MLflow's own open retries for ~2 minutes and ends in a traceback."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.pool import NullPool

    try:
        engine = create_engine(
            url, poolclass=NullPool, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S}
        )
        con = engine.connect()
    except OperationalError as exc:
        cause = str(exc.orig or exc).strip().splitlines()
        raise KdbenchError(
            f"the database at {url} cannot be reached ({cause[0] if cause else 'no reason given'})"
            ": start its server or fix the URL (mlflow.tracking_uri / MLFLOW_TRACKING_URI, or "
            "tune.storage)"
        ) from None
    except Exception:  # noqa: BLE001 - a missing driver and the like: the store's open says so
        yield False
        return
    try:
        con.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_LOCK_KEY})
        yield True
    finally:
        with contextlib.suppress(Exception):
            con.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY})
        con.close()
        engine.dispose()


def store_lock(url: str):
    """An exclusive lock for a check-then-create on the store at ``url``: a file lock next to an
    SQLite database, an advisory lock in a PostgreSQL one (a no-op for other URLs: their
    callers resolve the race afterwards)."""
    path = sqlite_path(url)
    if path is not None:
        return file_lock(path)
    if str(url).split(":", 1)[0].split("+", 1)[0].lower() == "postgresql":
        return _postgres_lock(str(url))
    return contextlib.nullcontext(False)


def _get_or_create_experiment(client, experiment: str) -> str:
    from mlflow.exceptions import MlflowException

    for attempt in range(5):
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise KdbenchError(
                    f"mlflow.experiment={experiment!r} is deleted in {client.tracking_uri}: "
                    f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id})"
                    " or choose another mlflow.experiment"
                )
            return exp.experiment_id
        try:
            return client.create_experiment(experiment)
        except MlflowException as exc:  # another process created it between our check and now
            if "already exists" not in str(exc).lower() and "unique" not in str(exc).lower():
                raise
            time.sleep(0.1 * (attempt + 1))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise KdbenchError(f"cannot create mlflow.experiment={experiment!r}")
    return exp.experiment_id


def prepare_mlflow(uri: str, experiment: str) -> str:
    """Open the MLflow store at ``uri`` (creating its schema if it is new) and get or create
    ``experiment``; return the experiment's id. Safe when many processes call it at once."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        return _get_or_create_experiment(client, experiment)


def optuna_storage(
    url: str,
    heartbeat_s: int = 30,
    on_stale: Callable | None = None,
):
    """An Optuna ``RDBStorage`` at ``url``, its schema created under the store lock.

    Every running trial records a heartbeat every ``heartbeat_s`` seconds; a trial whose
    heartbeat is older than twice that (its worker was killed) is marked FAIL when any worker
    of the study next starts a trial, and ``on_stale(study, trial)`` runs for it."""
    import warnings

    import optuna

    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite_path(url) else {}
    with store_lock(url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=int(heartbeat_s),
            grace_period=2 * int(heartbeat_s),
            heartbeat_stale_trial_callback=on_stale,
        )


def fail_stale_trials(study) -> None:
    """Mark the trials of killed workers FAIL now (Optuna does it before each new trial)."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)

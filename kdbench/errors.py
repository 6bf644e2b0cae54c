"""Errors that kdbench reports to the user as one line, without a traceback."""

from __future__ import annotations

import errno
import os
import re
import sys

from hydra.errors import CompactHydraException


class KdbenchError(Exception):
    """A problem the user can fix: the message names it and says how (one line)."""


class ConfigError(KdbenchError):
    """An invalid configuration value, found before any work starts."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        super().__init__(f"{key}={value!r} is invalid: {allowed}")
        self.key = key
        self.value = value


class NonFiniteLossError(KdbenchError):
    """A loss term became NaN or infinite during training."""


class Interrupted(KdbenchError):
    """The run was stopped by SIGINT or SIGTERM: its MLflow run is KILLED and resumable; the
    process exits with 128 + the signal's number, as a shell reports a signal."""

    def __init__(
        self, signum: int, hint: str = "continue it with the same command and resume=true"
    ) -> None:
        import signal

        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}: the MLflow run is KILLED; {hint}")
        self.exit_code = 128 + signum


# scheme://user:password@host (a password may hold any character but blanks, quotes and @)
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s:/@'\"]*):[^\s@'\"]*@")
# ...?password=secret&... (query parameters of database and server URLs)
_PARAM_SECRET = re.compile(
    r"(\b(?:password|passwd|pwd|token|secret|api_key|access_token)=)[^&\s'\"]+", re.IGNORECASE
)


def mask_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL in it masked
    (``user:***@``), and ``password=...``-style query parameters too. Every one-line error of
    :func:`run_or_exit` goes through it; so should anything that prints or logs a store URL."""
    return _PARAM_SECRET.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", str(text)))


def checked_instantiate(node, **kwargs):
    """``hydra.utils.instantiate`` that lets a :class:`KdbenchError` from the constructor through
    as itself (Hydra wraps it), and turns other construction errors into one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, KdbenchError):
            raise cause from None
        detail = str(cause or exc).strip().splitlines()[0] if str(cause or exc).strip() else ""
        raise KdbenchError(f"cannot build {node.get('_target_')}: {detail}") from None


# A store or output that cannot be written: these end a run as one line, not a traceback
# (SQLAlchemy's message of a failed sqlite write holds the statement and every parameter).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_STORAGE_MESSAGES = (
    "database or disk is full",
    "disk i/o error",
    "attempt to write a readonly database",
    "unable to open database file",
    "no space left on device",
    "read-only file system",
    "disk quota exceeded",
    "file too large",
)


def storage_failure(exc: BaseException) -> str | None:
    """One line describing a full, read-only or unwritable disk or database found anywhere in
    ``exc``'s chain of causes, or None when ``exc`` is something else."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            where = f" writing {exc.filename}" if exc.filename else ""
            return (
                f"cannot write{where}: {os.strerror(exc.errno)}: free disk space or point "
                "KDBENCH_CACHE_DIR / MLFLOW_TRACKING_URI / the output directory elsewhere"
            )
        text = str(exc).lower()
        for marker in _STORAGE_MESSAGES:
            if marker in text:
                return (
                    f"the MLflow store or an output file cannot be written ({marker}): free disk "
                    "space, or point MLFLOW_TRACKING_URI (mlflow.tracking_uri) at a writable place"
                )
        exc = exc.__cause__ or exc.__context__
    return None


def quiet_store_logs() -> None:
    """MLflow logs every failed database write with its traceback (some 40 lines, and the
    statement with its parameters); the error itself still reaches :func:`run_or_exit`, which
    reports it in one line (or re-raises what is not a storage problem)."""
    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


class JobFailed(CompactHydraException):
    """A refused or failed job of a Hydra multirun: Hydra records it as FAILED and the other
    jobs run (``sys.exit`` would end the whole sweep); Hydra prints this one line."""


FAILURES_ENV = "KDBENCH_MULTIRUN_FAILURES"  # a file each failed multirun job appends a line to


def _multirun_job() -> str | None:
    """``job N (overrides)`` when this is a job of a Hydra multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        overrides = list(hc.overrides.task)
        swept = set()  # keys the command line sweeps (a,b / range() / choice() / glob())
        for arg in sys.argv[1:]:
            key, _, value = arg.partition("=")
            value = re.sub(r"\[[^\]]*\]|\{[^}]*\}", "", value)  # a list or dict value
            if value and ("," in value or "(" in value):
                swept.add(key.lstrip("+~"))
        shown = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept]
        return f"job {hc.job.num} ({' '.join(shown or overrides)})"
    except Exception:  # noqa: BLE001 - no Hydra context (the Python API): a plain run
        return None


def report(exc: BaseException) -> None:
    """Print ``exc`` as one line (credentials masked) and end the run: exit code 2 (or the
    error's ``exit_code``); in a Hydra multirun, record the failure and raise
    :class:`JobFailed`, so that the other jobs run and the sweep ends non-zero."""
    message = mask_credentials(" ".join(str(exc).split()))
    job = _multirun_job()
    if job is None or hasattr(exc, "exit_code"):  # a signal stops the whole sweep
        print(f"kdbench: error: {message}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    line = f"kdbench: error: {job}: {message}"
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get(FAILURES_ENV)
    if path:
        try:
            with open(path, "a") as f:  # one short append per job: whole lines
                f.write(line + "\n")
        except OSError:
            pass
    raise JobFailed(line) from None  # Hydra prints it when the sweep ends


def run_or_exit(fn, *args):
    """``fn(*args)``; a :class:`KdbenchError`, or a full or read-only disk or database, becomes
    one line on stderr and exit code 2 (see :func:`report`; a multirun job fails alone)."""
    try:
        return fn(*args)
    except KdbenchError as exc:
        report(exc)
    except Exception as exc:
        problem = storage_failure(exc)
        if problem is None:
            _record_crash(exc)
            raise
        report(KdbenchError(problem))


def _record_crash(exc: Exception) -> None:
    """A multirun job that crashed (a bug: Hydra prints its traceback) is listed at the end too."""
    job, path = _multirun_job(), os.environ.get(FAILURES_ENV)
    if job and path:
        first = mask_credentials((str(exc).strip().splitlines() or [""])[0][:300])
        try:
            with open(path, "a") as f:
                f.write(f"kdbench: error: {job}: crashed: {type(exc).__name__}: {first}\n")
        except OSError:
            pass

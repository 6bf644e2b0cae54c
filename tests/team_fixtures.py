"""Throwaway team components for tests/test_team.py: a PostgreSQL server (initdb in a temporary
directory, a free port on 127.0.0.1, its unix socket in that directory) and an MLflow tracking
server backed by it. Both are stopped, and their directories removed, afterwards.

A missing component (no PostgreSQL binaries, no psycopg, no submitit launcher) skips the tests
that need it with the reason and the install command, except where ``CI`` is set: there it fails
them, so that CI never passes by skipping what it was meant to test (``.ci/run`` installs them).

PostgreSQL refuses to run as root: under root (CI containers) the server runs as the ``postgres``
user the Debian package creates (``nobody`` where there is none), through ``subprocess``'s
``user=`` (no su, sudo or runuser needed), in a directory created for it under /tmp (pytest's
temporary directory is private to root).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


def require(ok: bool, what: str) -> None:
    """Skip (fail under ``CI``) unless ``ok``; ``what`` says what is missing and how to get it."""
    if ok:
        return
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{what} (CI is set: a missing component is a failure, not a skip)")
    pytest.skip(what)


def require_module(module: str, extra: str = "team") -> None:
    require(
        importlib.util.find_spec(module) is not None,
        f"{module} is not installed: pip install -c constraints.txt '.[{extra}]'",
    )


def postgres_bin() -> Path | None:
    """The directory holding ``initdb``, ``postgres`` and ``pg_ctl``: ``$PG_BIN``, ``PATH``, or
    Debian's ``/usr/lib/postgresql/<version>/bin`` (the newest), where ``apt-get install
    postgresql`` puts them (off ``PATH``)."""
    candidates = [os.environ.get("PG_BIN", "")]
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).resolve().parent))

    def version(path: str) -> tuple[int, ...]:
        digits = Path(path).parent.parent.name.split(".")
        return tuple(int(d) for d in digits if d.isdigit())

    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    candidates += [str(Path(p).parent) for p in debian]
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "postgres").is_file():
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> dict:
    """``subprocess`` keywords that run the server as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return {}
    import pwd

    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(name)
            return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    raise RuntimeError("running as root, and no postgres or nobody user to run PostgreSQL as")


class Postgres:
    """A running throwaway server; ``uri(db)`` is the SQLAlchemy URL of a database on it."""

    user = "kdbench"

    def __init__(self, port: int, folder: Path, proc: subprocess.Popen) -> None:
        self.port, self.folder, self.proc = port, folder, proc

    def uri(self, db: str = "kdbench") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{db}"

    def create_database(self, db: str) -> str:
        """A new, empty database ``db``; returns its URL."""
        import psycopg

        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{db}"')
        return self.uri(db)

    def conninfo(self, db: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={db}"

    def log(self) -> str:
        path = self.folder / "postgres.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _start(pg_bin: Path, folder: Path, run_as: dict) -> Postgres:
    env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "LANG": "C"}
    data, sock = folder / "data", folder / "sock"
    sock.mkdir()
    if run_as:
        for p in (folder, sock):
            os.chown(p, run_as["user"], run_as["group"])
    init = subprocess.run(
        [str(pg_bin / "initdb"), "-D", str(data), "-U", Postgres.user, "--auth=trust"]
        + ["--no-locale", "-E", "UTF8", "--no-sync"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **run_as,
    )
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {(init.stdout + init.stderr)[-2000:]}")
    for _attempt in range(5):  # a port taken between free_port() and the bind: another one
        port = free_port()
        log = open(folder / "postgres.log", "ab")  # noqa: SIM115 - the server writes to it
        if run_as:
            os.chown(folder / "postgres.log", run_as["user"], run_as["group"])
        proc = subprocess.Popen(
            [str(pg_bin / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock)]
            + ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]
            + ["-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
            + ["-c", "max_connections=200"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            **run_as,
        )
        log.close()
        server = Postgres(port, folder, proc)
        if _wait_ready(server):
            return server
        _stop(proc)
    raise RuntimeError(f"PostgreSQL did not start:\n{server.log()}")


def _wait_ready(server: Postgres, timeout: float = 60) -> bool:
    import psycopg

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False
        try:
            with psycopg.connect(server.conninfo("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            time.sleep(0.2)
    return False


def _stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """Stop a server we started (PostgreSQL: SIGINT is its fast shutdown)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the session; yields it (``.uri(db)``,
    ``.create_database(db)``). Skips where PostgreSQL is not installed (fails under ``CI``)."""
    require_module("psycopg")
    pg_bin = postgres_bin()
    require(
        pg_bin is not None,
        "PostgreSQL is not installed (no initdb on PATH, in $PG_BIN or in "
        "/usr/lib/postgresql/*/bin): apt-get install postgresql",
    )
    run_as = _server_user()
    # not pytest's temporary directory (private to root), nor $TMPDIR (it may be): /tmp
    top = "/tmp" if run_as and os.path.isdir("/tmp") else None
    folder = Path(tempfile.mkdtemp(prefix="kdbench-pg-", dir=top))
    server = None
    try:
        server = _start(pg_bin, folder, run_as)
        server.create_database("kdbench")
        yield server
    finally:
        if server is not None:
            _stop(server.proc)
        shutil.rmtree(folder, ignore_errors=True)


def start_mlflow_server(backend_uri: str, artifacts: Path, log: Path):
    """``mlflow server`` on a free port of 127.0.0.1 over ``backend_uri``, serving artifacts from
    ``artifacts`` (proxied: clients upload through the server), answering only requests for
    ``127.0.0.1:<port>`` (``--allowed-hosts``, as a team's server names its own host name);
    returns (its URL, the process)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--allowed-hosts",
        f"127.0.0.1:{port}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # as deployed
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=log.parent,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return url, proc
        time.sleep(0.5)
    stop_group(proc)
    raise RuntimeError(f"mlflow server did not start:\n{log.read_text(errors='replace')[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process we started in its own session, with its children (a server's workers)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

"""Files of kdbench's caches (data arrays, trained teachers, teacher outputs), shared safely.

Several processes may use one cache at once (a joblib sweep, two tuning workers, a shared
``KDBENCH_CACHE_DIR``), and any of them may be killed or meet a full or read-only disk. So:

- a writer writes ``.<name>.<pid>.tmp`` next to the entry and renames it over the entry
  (:func:`atomic_write`): a reader sees the old entry, the new one or none, never half of one;
  temp files left by killed writers (their pid gone, or older than an hour) are removed when the
  directory is next written;
- entries are readable by everyone the umask allows (``0o666 & ~umask``, as ``open`` creates);
- an unreadable entry is a missing one (:func:`read_or_none`): it is regenerated and replaced;
- a cache that cannot be written costs the cache, never the run: a notice says where and why,
  and the run goes on with what it has in memory;
- work that many processes would otherwise repeat (training one teacher) is done by one of them
  under :func:`file_lock`, while the others wait and then read its result.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

STALE_AFTER_S = 3600  # a temp file this old is a killed writer's, whatever its pid
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:(?P<host>[\w-]+)-)?(?P<pid>\d+)\.tmp$")
_HOST = re.sub(r"[^\w-]", "_", socket.gethostname()) or "host"  # a pid means something on its host
_OLD_TEMP = re.compile(r"^tmp[\w-]+\.tmp(\.npz)?$")  # tempfile.mkstemp names of kdbench <= 0.1


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid < 2**22  # another user's process (or an impossible pid: dead)
    return True


def temp_path(path: Path) -> Path:
    """Where this process writes ``path`` before renaming it into place."""
    return path.with_name(f".{path.name}.{_HOST}-{os.getpid()}.tmp")


def clean_stale_temps(directory: Path) -> list[Path]:
    """Remove the temp files of writers that died (pid gone, on this host) or are over an hour
    old."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None and not _OLD_TEMP.match(entry.name):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            # a pid is judged on its own host only (a cache shared across machines): elsewhere
            # the age alone says a writer is gone
            here = m is not None and m["host"] in (None, _HOST)
            dead = here and not _pid_alive(int(m["pid"]))
            if (old or dead) and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def atomic_write(
    path: Path, write_fn: Callable[[IO[bytes]], Any], what: str = "cache entry"
) -> bool:
    """Write ``path`` with ``write_fn(binary file)`` all at once (temp file, then rename).

    Returns False, after a one-line notice, when it cannot be written (read-only or full disk,
    a parent that is not a directory, ...): a cache entry is never worth the run."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(path.parent)
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        return True
    except Exception as exc:  # noqa: BLE001 - ENOSPC, EROFS, EACCES, ENOTDIR, a writer's error
        print(
            f"kdbench: notice: could not save the {what} to {path} ({_why(exc)}); continuing "
            "without it (this run keeps it in memory)"
        )
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_or_none(path: Path, read_fn: Callable[[Path], Any], what: str = "cache entry") -> Any:
    """``read_fn(path)``; None when the entry is absent or unreadable (truncated, corrupt, of an
    older format: ``read_fn`` raises), after a notice that it will be regenerated."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read_fn(path)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, EOFError, UnpicklingError, KeyError...
        print(f"kdbench: notice: the {what} {path} is unreadable ({_why(exc)}); regenerating it")
        return None


@contextlib.contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[bool]:
    """Hold an exclusive lock on ``<path>.lock`` (``fcntl.flock``: released when the holder
    exits, however it exits). Yields False, without waiting, where no lock file can be made
    (read-only or missing directory): the caller then works unlocked. ``waiting``: printed if
    another process holds the lock."""
    lock = Path(f"{path}.lock")
    fd = None
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        with contextlib.suppress(OSError):
            fd = os.open(lock, os.O_RDONLY)  # another user's lock file in a shared cache
    if fd is None:
        yield False
        return
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts)
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock

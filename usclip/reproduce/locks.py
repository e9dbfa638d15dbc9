"""A lock per run folder, so that two sweeps on the same runs folder never run one run twice.

Two sweeps may share a runs folder: two GPUs of one machine, or two machines on a shared file system. Before a
sweep starts a run it creates ``<run dir>/sweep.lock`` with ``os.open(O_CREAT | O_EXCL)``, which is atomic on a
local file system and on NFS v3 and later: of two sweeps racing for one run, exactly one creates the file. The file
holds the holder's host, pid, start time and a random token (JSON). The holder refreshes its modification time
every ``stale_after / 4`` seconds (:class:`Heartbeat`) and removes it when the run ends, on an exception and on
SIGTERM (the sweep turns SIGTERM into an exception; a SIGKILL leaves the file behind).

A lock is **stale**, and the next sweep takes it over with a warning, when

- its host is this host and its pid is not alive (the sweep was killed), or
- its host is another host and the file was not refreshed for ``stale_after`` seconds (600 by default:
  ``usclip sweep --lock-stale-after``; a live holder refreshes it every ``stale_after / 4`` s, so only a dead or
  frozen one gets there), or
- it was written by an earlier incarnation of this very SLURM job (same job or array task id, a lower
  ``SLURM_RESTART_COUNT``): a requeued job, perhaps on another node, whose first incarnation was killed, or
- it cannot be read (a holder killed between creating and writing it) and is older than :data:`UNREADABLE_GRACE_S`.

A pid reused by an unrelated process after a reboot keeps a same-host lock until that process ends; delete the
file by hand if ``usclip sweep`` reports a lock held by a pid that is not a sweep.

Hand-written because none of the chosen dependencies provides a lock file that records its holder and can be
taken over when the holder died (``fcntl`` locks do not work across NFS clients and die with the descriptor, which
does not tell a second machine that the holder crashed).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STALE_AFTER_S",
    "LOCK_NAME",
    "UNREADABLE_GRACE_S",
    "Heartbeat",
    "LockHeldError",
    "LockInfo",
    "RunLock",
    "is_stale",
    "read_lock",
]

LOCK_NAME = "sweep.lock"
#: seconds without a refresh after which a lock of another host counts as stale
DEFAULT_STALE_AFTER_S = 600.0
#: seconds after which a lock file that cannot be read (half-written) counts as stale
UNREADABLE_GRACE_S = 30.0


class LockHeldError(RuntimeError):
    """The run's lock is held by another live sweep (the message names its host, pid and start time)."""


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder.

    Attributes:
        host: the holder's host name (``socket.gethostname()``).
        pid: the holder's process id on that host.
        started: when the holder took the lock (ISO 8601, UTC).
        token: a random string that tells two holders with the same host and pid apart.
        age_s: seconds since the file was last refreshed (its modification time).
        slurm_job: the holder's SLURM job (``<array job>_<task>`` or the job id), ``None`` outside SLURM.
        slurm_restart: the holder's ``SLURM_RESTART_COUNT`` (0 for a job's first incarnation).
    """

    host: str
    pid: int
    started: str
    token: str
    age_s: float
    slurm_job: str | None = None
    slurm_restart: int = 0

    def describe(self) -> str:
        """``host pid N since TIME`` for messages."""
        return f"{self.host} pid {self.pid} since {self.started}"


def _slurm_job() -> tuple[str | None, int]:
    """This process's SLURM job and restart count (as ``usclip.callbacks``, which imports Lightning)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if array else os.environ.get("SLURM_JOB_ID")
    try:
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        restart = 0
    return job or None, restart


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def read_lock(path: str | os.PathLike[str]) -> LockInfo | None:
    """The lock at ``path``, or ``None`` if there is none; an unreadable file gives ``pid -1``, host ``?``."""
    path = Path(path)
    try:
        age = time.time() - path.stat().st_mtime
        data = json.loads(path.read_text(encoding="utf-8"))
        job = data.get("slurm_job")
        return LockInfo(
            str(data["host"]),
            int(data["pid"]),
            str(data["started"]),
            str(data["token"]),
            age,
            None if job is None else str(job),
            int(data.get("slurm_restart", 0)),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return LockInfo("?", -1, "?", "", age)


def is_stale(info: LockInfo, stale_after: float = DEFAULT_STALE_AFTER_S) -> bool:
    """Whether the lock's holder is gone: dead pid on this host, or no refresh for ``stale_after`` s elsewhere."""
    if info.pid == -1:
        return info.age_s > UNREADABLE_GRACE_S
    job, restart = _slurm_job()
    if info.slurm_job is not None and info.slurm_job == job and info.slurm_restart < restart:
        return True  # an earlier incarnation of this requeued job
    if info.host == socket.gethostname():
        return not _pid_alive(info.pid)
    return info.age_s > stale_after


class RunLock:
    """The lock of one run folder (``<run dir>/sweep.lock``); see the module docstring for the rules.

    Args:
        run_dir: the run's folder (created if missing).
        stale_after: seconds without a refresh after which another host's lock is taken over.

    Use :meth:`acquire` / :meth:`release`, or ``with RunLock(d):`` (raises :class:`LockHeldError` if held).
    """

    def __init__(self, run_dir: str | os.PathLike[str], stale_after: float = DEFAULT_STALE_AFTER_S) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.stale_after = stale_after
        self.token = ""

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return bool(self.token)

    def _create(self) -> bool:
        token = secrets.token_hex(8)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        job, restart = _slurm_job()
        body = {"host": socket.gethostname(), "pid": os.getpid(), "started": started, "token": token}
        if job is not None:
            body |= {"slurm_job": job, "slurm_restart": restart}
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(body) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.token = token
        return True

    def _take_over(self, seen: LockInfo) -> None:
        """Move the stale lock ``seen`` aside; if it changed meanwhile (another sweep took it over), put it back."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another sweep moved it first
        now = read_lock(aside)
        if now is not None and (now.host, now.pid, now.token) != (seen.host, seen.pid, seen.token):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # a fresh lock of another sweep: restore it (fails if yet another exists)
        else:
            log.warning(
                "%s: took over the stale lock of %s (%s)",
                self.path.parent,
                seen.describe(),
                "dead process on this host" if seen.host == socket.gethostname() else f"{seen.age_s:.0f} s old",
            )
        aside.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Take the lock, taking over a stale one.

        Raises:
            LockHeldError: another live sweep holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                return
            info = read_lock(self.path)
            if info is None:
                continue  # released meanwhile
            if not is_stale(info, self.stale_after):
                raise LockHeldError(f"{self.path.parent} is being run by {info.describe()} (lock file {self.path})")
            self._take_over(info)
        raise LockHeldError(f"{self.path}: could not take the lock after 5 tries (other sweeps race for it)")

    def refresh(self) -> None:
        """Touch the lock file so that other hosts see the holder alive."""
        if self.held:
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Remove the lock file if it is still this object's (a lock taken over by another sweep stays)."""
        if not self.held:
            return
        info = read_lock(self.path)
        if info is not None and info.token == self.token:
            self.path.unlink(missing_ok=True)
        elif info is not None:
            log.warning("%s: the lock was taken over by %s; left in place", self.path.parent, info.describe())
        self.token = ""

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Heartbeat:
    """A daemon thread that refreshes the given locks every ``interval`` seconds until :meth:`stop`.

    Args:
        locks: a live view of the held locks (e.g. a dict's ``values()``), read at every beat.
        interval: seconds between refreshes.
    """

    def __init__(self, locks: Iterable[RunLock], interval: float) -> None:
        self._locks = locks
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="usclip-sweep-locks", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            for lock in list(self._locks):
                lock.refresh()

    def stop(self) -> None:
        """End the thread."""
        self._stop.set()
        self._thread.join()

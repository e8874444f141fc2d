"""Output folders that belong to one run and change all at once.

``OutputFolder(out)`` (a context manager) takes an OS lock for the whole run (``fcntl.flock`` on
``.{name}.lock`` beside the folder, holding the holder's pid and command line), so a second run on the same
folder is refused with a one-line error; the run writes its outputs into a staging folder beside ``out`` and
``publish()`` swaps it in with one rename (``renameat2(RENAME_EXCHANGE)`` where the kernel has it), so readers
see the previous outputs or the new ones, never a mix. On failure the staging folder is removed and a folder
the run created is removed again if it is empty: the previous contents of ``out`` are left as they were.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from asrshrink.errors import AsrshrinkError

_UMASK = os.umask(0)
os.umask(_UMASK)


def lock_path(out: Path) -> Path:
    """The lock file of output folder ``out``: beside it, so it survives the folder being swapped."""
    return out.parent / f".{out.name}.lock"


def holder(out: Path) -> dict:
    """The pid and command line written into ``out``'s lock file ({} when unreadable)."""
    try:
        return json.loads(lock_path(out).read_text() or "{}")
    except (OSError, ValueError):
        return {}


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``lock_path(out)``, released when the process ends in any way
    (kill -9 included). The lock file is removed on release; a waiter that opened a removed file notices
    (its inode is no longer the path's) and retries, so two holders can never coexist."""

    def __init__(self, out: Path, option: str = "-o"):
        self.out, self.option, self.fd = Path(out), option, None

    def acquire(self) -> "OutputLock":
        path = lock_path(self.out)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AsrshrinkError(f"{self.out}: cannot create the folder for {self.option} ({exc.strerror}); "
                                 f"choose a writable location") from None
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            except OSError as exc:
                raise AsrshrinkError(f"{path.parent}: not writable ({exc.strerror}), so {self.option} {self.out} "
                                     f"cannot be written; choose a writable location") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                who = holder(self.out)
                what = f"pid {who.get('pid', '?')}: {who.get('command', '?')}" if who else "another process"
                raise AsrshrinkError(f"{self.out}: in use by another asrshrink run ({what}); wait for it to "
                                     f"finish, or choose another {self.option}") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed the file after we opened it: lock the new one
                os.close(fd)
                continue
            record = json.dumps({"pid": os.getpid(), "command": shlex.join(sys.argv)}) + "\n"
            os.ftruncate(fd, 0)
            os.write(fd, record.encode())
            self.fd = fd
            return self
        raise AsrshrinkError(f"{path}: could not be locked; remove it if no asrshrink run is using {self.out}")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            lock_path(self.out).unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish_folder(staging: Path, out: Path) -> None:
    """Replace folder ``out`` (if any) by the finished ``staging`` folder in one step, and delete the old one."""
    os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700 directories; outputs get the usual permissions
    if not out.exists():
        os.replace(staging, out)
        return
    if _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous contents
        return
    old = out.parent / f".{out.name}.{os.getpid()}.old"
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


class OutputFolder:
    """One run's output folder: locked on entry, staged beside ``out``, published together.

    ``owned`` names the files and folders asrshrink writes there; an existing folder holding anything else is
    refused before any work, so a mistyped -o cannot replace someone's folder."""

    def __init__(self, out: str | Path, *, owned: Iterable[str], option: str = "-o"):
        self.out, self.option, self.owned = Path(out), option, set(owned)
        self.lock = OutputLock(self.out, option)
        self.staging: Path | None = None
        self.created = False
        self.published = False

    def check(self) -> None:
        """Refuse a path that cannot become the output folder; called before the lock is taken."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise AsrshrinkError(f"{out}: {self.option} takes a folder and this is a file; choose a folder name")
        if out.is_dir():
            foreign = sorted(p.name for p in out.iterdir() if p.name not in self.owned)
            if foreign:
                raise AsrshrinkError(f"{out}: the folder holds files asrshrink did not write ({', '.join(foreign[:3])}"
                                     f"{' ...' if len(foreign) > 3 else ''}); choose a new or empty folder for "
                                     f"{self.option}")
            if not os.access(out, os.W_OK | os.X_OK):
                raise AsrshrinkError(f"{out}: not writable; choose a writable folder for {self.option}")

    def __enter__(self) -> "OutputFolder":
        self.check()
        self.lock.acquire()
        try:
            for stale in self.out.parent.glob(f".{self.out.name}.*.tmp"):  # left by a killed run; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            self.created = not self.out.exists()
            try:
                self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp",
                                                     dir=self.out.parent))
            except OSError as exc:
                raise AsrshrinkError(f"{self.out.parent}: cannot write there ({exc.strerror}), so {self.option} "
                                     f"{self.out} cannot be written; choose a writable location") from None
        except BaseException:
            self.lock.release()
            raise
        return self

    def publish(self) -> Path:
        """Swap the staged outputs in; returns ``out``."""
        assert self.staging is not None
        publish_folder(self.staging, self.out)
        self.staging, self.published = None, True
        return self.out

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
            if kind is not None and not self.published and self.created and self.out.is_dir():
                try:
                    self.out.rmdir()  # only if empty: a run that leaves a resumable state keeps it
                except OSError:
                    pass
        finally:
            self.lock.release()

"""One process at a time in a folder: an advisory lock that the kernel releases when its holder dies."""

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"
_HELD_HERE = set()  # lock files this process holds: POSIX locks would let the holder take its own lock twice


class FolderInUseError(OSError):
    """Another live process holds the folder's lock (an OSError, as a busy file is)."""


class FolderLock:
    """
    `with FolderLock(folder, purpose):` holds `folder/.lock` (created with `folder`), or raises `FolderInUseError`
    naming the process that holds it. The lock file records the holder (host, pid, purpose, start).

    A POSIX record lock (`lockf`): the kernel drops it the moment its process dies, so a killed run never blocks the
    next one, and forked children (DataLoader workers) do not inherit it, unlike `flock`'s. It works across hosts on
    NFS with a lock manager; with `nolock`/`local_lock` mounts it only excludes processes of the same host. An
    unwritable folder raises an `OSError` naming it.
    """

    def __init__(self, folder, purpose="a run"):
        self.path = Path(folder) / LOCK_FILE
        self.purpose = purpose
        self.descriptor = None

    def acquire(self):
        folder = self.path.parent
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder} exists and is not a folder.")
        key = str(self.path.resolve())
        if key in _HELD_HERE:
            raise FolderInUseError(f"{folder} is in use by another run of this process.")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            failure = type(error)(f"Cannot write in {folder}: {error.strerror}.")
            failure.errno = error.errno
            raise failure from error
        try:
            try:
                fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EACCES or EAGAIN: held by another process
                holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip() or "unknown"
                raise FolderInUseError(f"{folder} is in use by another process ({holder}); wait for it to end, or "
                                       "choose another folder.") from None
            holder = {"host": socket.gethostname(), "pid": os.getpid(), "purpose": self.purpose,
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        except BaseException:
            os.close(descriptor)  # closing drops the lock, if it was taken
            raise
        self.descriptor = descriptor
        _HELD_HERE.add(key)
        return self

    def release(self):
        """Drop the lock (closing the file drops it even where clearing the holder's record fails)."""
        if self.descriptor is None:
            return
        descriptor, self.descriptor = self.descriptor, None
        _HELD_HERE.discard(str(self.path.resolve()))
        try:
            os.ftruncate(descriptor, 0)
        except OSError:
            pass  # the record is informative only
        finally:
            os.close(descriptor)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()

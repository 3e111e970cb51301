"""Inter-process file locks, so that runs sharing a folder take turns instead of colliding.

``fcntl.flock`` locks belong to an open file: the kernel releases them when the holder's process
ends, however it ends, so a SIGKILLed run never blocks the next one; and two opens of one file
conflict even within one process, so threads (the flow's fan-outs) take turns like processes do.
The folder's filesystem must support flock: local disks do; on NFS, Linux emulates it with
byte-range locks (NFSv4, or v3 with lockd running).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class LockError(OSError):
    """A folder's filesystem cannot lock files."""


@contextmanager
def file_lock(path: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created with the umask's mode when missing);
    ``on_wait`` is called once when another holder makes this one wait.

    Lock files are left in place: deleting one that another process has open would let a third
    process lock a new file of the same name at the same time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read-only is enough to lock, so a lock file another user created can be locked too.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as err:  # e.g. ENOLCK on an NFS mount without a lock daemon
            raise LockError(f"cannot lock {path} ({err.strerror}): its filesystem does not support file "
                            "locks (flock); use a folder on a local disk or on NFSv4") from err
        yield
    finally:
        os.close(fd)  # releases the lock

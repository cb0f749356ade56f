"""Built once, read by every process: a folder named by a key of what determines it, made under a
temporary name and renamed when complete, by whichever process takes its lock first.

The others wait on the lock (a ``flock`` on a file beside the folder: released by the kernel when
its holder exits, however it exits), then find the folder and read it. A build that fails on bad
data leaves its one-line error beside the folder for the processes that were waiting, so that they
stop with it instead of each failing the same way again; a process that starts later tries again.
A change to anything the key covers names another folder, so a stale one is never read.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from ebft_megatron.data.sources import DataError
from ebft_megatron.runtime import watchdog

POLL_S = 0.2  # how often a waiting process looks at the lock (and tells the watchdog it is alive)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock


def say(message: str) -> None:
    print(f"[data] {message}", file=sys.stderr, flush=True)


def key_of(description: dict) -> str:
    """A hex digest of everything that determines what is built (a JSON-able description)."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "another process"
    except OSError:
        return "another process"


@contextmanager
def _exclusive(lock: Path, what: str, verbose: bool) -> Iterator[None]:
    """Hold ``lock``; wait (telling the watchdog so) while another process holds it."""
    handle = open(lock, "a+")
    try:
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting and verbose:
                    say(f"waiting for {_holder(lock)}, which is building {what}")
                waiting = True
                watchdog.progress("data")
                time.sleep(POLL_S)
            except OSError as err:
                if err.errno not in NO_LOCKS:
                    raise
                # without locks every process may build; the renames keep that correct, only slower
                say(f"{lock.parent}: the file system has no file locks; each process may build {what} itself")
                break
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def built_once(target: Path, build: Callable[[Path], None], what: str, verbose: bool = False) -> bool:
    """Make sure the folder ``target`` exists: built by ``build(temporary folder)`` in this
    process, or by another one that holds the lock. True when this process built it."""
    if target.is_dir():
        return False
    started = time.time()
    target.parent.mkdir(parents=True, exist_ok=True)
    failed = target.with_name(f"{target.name}.error")
    with _exclusive(target.with_name(f"{target.name}.lock"), what, verbose):
        if target.is_dir():  # built while this process waited
            return False
        if failed.is_file() and failed.stat().st_mtime >= started:  # failed while this process waited
            raise DataError(failed.read_text().strip())
        for stale in target.parent.glob(f"{target.name}.partial-*"):  # left by a process that died building
            shutil.rmtree(stale, ignore_errors=True)
        temp = target.with_name(f"{target.name}.partial-{socket.gethostname()}-{os.getpid()}")
        temp.mkdir()
        try:
            build(temp)
            os.rename(temp, target)
        except DataError as err:
            _write_atomically(failed, f"{err}\n")
            raise
        except OSError:
            if not target.is_dir():
                raise
            return False  # without file locks another process renamed the same build there first
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        failed.unlink(missing_ok=True)
    return True


def _write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    temp.write_text(text)
    os.replace(temp, path)


def writable_folder(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)

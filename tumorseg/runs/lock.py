"""The run-folder lock: one train.py process per run folder at a time."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import IO

try:
    import fcntl  # POSIX file locks; absent on Windows, where run folders are not locked
except ImportError:
    fcntl = None


RUN_LOCK_NAME = ".train.lock"


class RunFolderBusy(Exception):
    """Another live process is training in this run folder."""


def lock_run_folder(folder: Path) -> IO[str] | None:
    """Hold an exclusive lock on run folder `folder` while the returned file stays open; raise RunFolderBusy if taken.

    Two train.py processes in one folder (two `--resume`s, or a resume of a
    run still training) would interleave checkpoints and history rows, so the
    second is refused, with the holder named. The operating system drops the
    lock when its holder ends, even by kill -9, so a crashed run never blocks
    its own resume. Without fcntl (Windows) nothing is locked: None.
    """
    if fcntl is None:
        return None
    handle = open(Path(folder) / RUN_LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderBusy(f"{folder} is in use by {holder} (a run still training there, or another --resume); "
                            "wait for it to end or stop it, then resume") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle

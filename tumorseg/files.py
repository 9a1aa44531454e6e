"""Writing outputs safely: staging names, atomic writes, strict JSON, fresh folders, and the one publisher."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
from datetime import datetime
from pathlib import Path
from typing import Any


def new_output_dir(parent: Path, name: str) -> Path:
    """Create parent/name, or parent/<timestamp> when name is empty; never reuse an existing folder."""
    parent = Path(parent)
    if not name:
        name = datetime.now().strftime("%Y%m%d-%H%M%S")
        base, suffix = name, 1
        while (parent / name).exists():  # two runs started in the same second
            suffix += 1
            name = f"{base}-{suffix}"
    folder = parent / name
    if folder.exists():
        raise FileExistsError(f"{folder}: already exists; choose another name or remove it")
    folder.mkdir(parents=True)
    return folder


# The host has no '.' (see staging_host), so the last four dot-separated fields are unambiguous.
STAGING_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}"
                             r"\.(?:tmp|partial|old)$")


class OutputError(Exception):
    """An output could not be written (disk full, no permission...); its message names the file."""


def staging_host() -> str:
    """This machine's name as staging names carry it: every character but letters, digits and '-' as '_'.

    Host names are letters, digits, '-' and '.', so only the dots change and
    two machines still differ.
    """
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())


def staging_name(final_name: str, kind: str = "tmp") -> str:
    """A hidden name unique to this process for staging `final_name`: '.<name>.<host>.<pid>.<random>.<kind>'.

    Unique per process so two writers never share (or delete) each other's
    staging file; host and pid let a later start tell a dead writer's
    leftovers, also where several machines share the folder (NFS).
    """
    return f".{final_name}.{staging_host()}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def describe_write_error(path: Path, error: OSError) -> str:
    """'no space left on device while writing X' for a full disk, else the system's reason."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"no space left on device while writing {path}; free some space and run again"
    return f"cannot write {path}: {error.strerror or error}"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to a staging file beside `path`, fsync it, then rename it onto `path`.

    Readers see the old file or the new one, never half of one; after a crash
    only a hidden staging file can be left (see `remove_stale_staging`). On a
    write error the staging file is removed and OutputError names `path`; on
    an interruption (Ctrl-C, SIGTERM under `sigterm_as_interrupt`) it is
    removed too and the interruption goes on.
    """
    path = Path(path)
    tmp = path.with_name(staging_name(path.name))
    # surrogateescape writes file names that are not valid UTF-8 back as their original bytes
    payload = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    try:
        with open(tmp, "xb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:  # KeyboardInterrupt too: callers that say "nothing was written" must be right
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(describe_write_error(path, error)) from error
        raise


def remove_stale_staging(folder: Path) -> list[Path]:
    """Delete staging files and folders in `folder` left by writers on this machine that are no longer running.

    Only names this project's `staging_name` makes are touched, and only when
    they name this machine and their process id is gone here, so another live
    run's staging is never removed; another machine's process ids mean
    nothing here, so its staging files (on a shared folder) are left alone.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    host = staging_host()
    for entry in entries:
        match = STAGING_PATTERN.match(entry.name)
        if match is None or match["host"] != host or process_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def json_ready(value: Any) -> Any:
    """`value` with every NaN as None (null) and keys as text, so the JSON written is strict: browsers and jq read it."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def save_json(path: Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")

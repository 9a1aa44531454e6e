"""Writing outputs safely: staging names, atomic writes, strict JSON, fresh folders, and the one publisher."""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
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
                             r"\.(?P<kind>tmp|partial|old)$")


class OutputError(Exception):
    """An output could not be written (disk full, no permission...); its message names the file."""


class OutputExists(OutputError):
    """A target of `publish` exists (or appeared meanwhile, made by another process) and may not be replaced."""


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


# renameat2(2) flags (Linux 3.15+, glibc 2.28+): rename without replacing, and swap two names atomically.
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100
# What renameat2 answers where the kernel, the C library or the file system lacks a flag: fall back.
RENAMEAT2_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def libc_function(name: str, argument_types: list[Any]) -> Any | None:
    """The C library's function `name` taking int results and setting errno, or None where there is none."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):  # not Linux, or a C library without it
        return None
    function.argtypes = argument_types
    function.restype = ctypes.c_int
    return function


RENAMEAT2 = libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
SYNCFS = libc_function("syncfs", [ctypes.c_int])  # Linux: flush one file system in one call


def renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2(2) `source` to `target` with `flags`: True when done, False where this system cannot.

    Raises the OSError the call gave otherwise (FileExistsError for an
    existing target under RENAME_NOREPLACE).
    """
    if RENAMEAT2 is None:
        return False
    if RENAMEAT2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in RENAMEAT2_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename `source` (a file or a folder) to `target`; FileExistsError when `target` exists, even if just made.

    renameat2's RENAME_NOREPLACE where there is one; else a folder claims
    `target` by creating it (only one process can) and replaces that empty
    folder, and a file is hard-linked to `target` (refused if it exists), then
    unlinked. Windows' rename never replaces.
    """
    if renameat2(source, target, RENAME_NOREPLACE):
        return
    if os.name == "nt":
        os.rename(source, target)
        return
    if os.path.isdir(source) and not os.path.islink(source):
        moving = identity(source)
        try:
            os.mkdir(target)
            os.replace(source, target)  # onto the empty folder just made, never onto anyone else's
        except FileExistsError:
            raise
        except BaseException:
            if identity(target) != moving:
                with suppress(OSError):
                    os.rmdir(target)  # the claim, if it was made: rmdir removes only an empty folder
            raise
        return
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        raise
    except (OSError, NotImplementedError):  # no hard links here: check, then rename (a narrow race remains)
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(source, target)
        return
    os.unlink(source)


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of `path` itself (links not followed), None when nothing is there."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def fsync_tree(path: Path) -> None:
    """fsync `path`: a file, or a folder with everything in it, so a power cut cannot leave them empty.

    A folder goes through one syncfs where Linux has it: a prediction folder
    holds thousands of PNGs, and one fsync each costs seconds on a busy disk.
    """
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        return
    if SYNCFS is not None:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            if SYNCFS(descriptor) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code), str(path))
        finally:
            os.close(descriptor)
        return
    for folder, _, names in os.walk(path):
        for name in names:
            fsync_tree(Path(folder) / name)
        fsync_folder(Path(folder))


def fsync_folder(folder: Path) -> None:
    """fsync a folder's entries (names created, renamed, removed); nothing where folders cannot be opened (Windows)."""
    if os.name == "nt":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def interruptions_held() -> Iterator[list[int]]:
    """Inside the block, SIGINT and SIGTERM are noted in the yielded list instead of raised, so it runs to its end.

    For the few renames that put things back or finish a publication: an
    interruption there would leave half of each. Outside the main thread
    (where handlers cannot be set) the block changes nothing.
    """
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum))
                    for signum in signals}
    except ValueError:  # not the main thread
        yield received
        return
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@dataclass
class Swap:
    """One target of `publish`: the staged output, where a replaced original waits, and both their identities."""

    target: Path
    staged: Path
    aside: Path
    new: tuple[int, int] | None
    old: tuple[int, int] | None = None


def publish(outputs: Mapping[Path, Path], overwrite: bool = False) -> None:
    """Put each staged file or folder (a value) at its target (its key): all of them, or on any failure none.

    Each staged output lies beside its target under a `staging_name`; it is
    fsynced, then renamed in. A target that exists is replaced only with
    `overwrite`; without it, or for a target another process creates
    meanwhile, OutputExists names it and nothing is renamed onto it (renames
    that refuse an existing name). A replaced original is swapped out
    atomically where the system can (renameat2 RENAME_EXCHANGE, or a hard
    link kept while the new file replaces it) and deleted only once every
    target holds its new output; a folder elsewhere waits under a staging
    name, which `remove_stale_staging` puts back if the process was killed.

    On any exception, Ctrl-C and SIGTERM included, every new output is taken
    back to its staged name (for the caller to remove) and every original is
    put back; OSErrors come as OutputError naming the target. An
    interruption while the last originals are deleted is noted on stderr
    and not raised: the new outputs are complete by then.
    """
    swaps: list[Swap] = []
    try:
        for target, staged in outputs.items():
            fsync_tree(staged)
        for target, staged in outputs.items():
            target = Path(target)
            swaps.append(Swap(target, Path(staged), target.with_name(staging_name(target.name, "old")),
                              identity(staged)))
            put_in_place(swaps[-1], overwrite)
    except BaseException as error:
        with interruptions_held():
            for swap in reversed(swaps):
                try:
                    take_back(swap)
                except (OSError, OutputError) as undo_error:
                    error.add_note(f"{swap.target} could not be put back as it was: {undo_error}")
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise OutputError(describe_write_error(swaps[-1].target if swaps else Path(next(iter(outputs))),
                                                   error)) from error
        raise
    with interruptions_held() as received:
        for swap in swaps:
            remove_original(swap)
        for folder in {swap.target.parent for swap in swaps}:
            with suppress(OSError):
                fsync_folder(folder)
    if received:
        print(f"note: interrupted while publishing {', '.join(str(swap.target) for swap in swaps)}; "
              "they were already complete and are kept", file=sys.stderr)


def publish_files(payloads: Mapping[Path, bytes | str], overwrite: bool = False) -> None:
    """Write each payload to a staging file beside its path, then `publish` them together; on failure none stays."""
    staged = {Path(path): Path(path).with_name(staging_name(Path(path).name, "partial")) for path in payloads}
    try:
        for path, payload in payloads.items():
            write_atomic(staged[path], payload)
        publish(staged, overwrite)
    finally:
        for staging in staged.values():
            staging.unlink(missing_ok=True)


def put_in_place(swap: Swap, overwrite: bool) -> None:
    """Rename `swap.staged` to `swap.target`, replacing what is there only with `overwrite` (see `publish`)."""
    target, staged = swap.target, swap.staged
    while not os.path.lexists(target):
        try:
            rename_noreplace(staged, target)
            return
        except FileExistsError:  # created since the check: by another process
            if not overwrite:
                break
    if not overwrite:
        raise OutputExists(f"{target}: already exists (made by another process meanwhile?); "
                           "pass --overwrite to replace it")
    swap.old = identity(target)
    if renameat2(staged, target, RENAME_EXCHANGE):  # the original now lies at the staged name
        return
    if not os.path.isdir(target) or os.path.islink(target):
        try:
            os.link(target, swap.aside, follow_symlinks=False)  # the original stays in place meanwhile
        except (OSError, NotImplementedError):
            pass  # no hard links on this file system: moved aside below
        else:
            os.replace(staged, target)
            return
    os.rename(target, swap.aside)  # a fresh name of this process's: nothing is replaced
    rename_noreplace(staged, target)


def take_back(swap: Swap) -> None:
    """Undo `put_in_place` however far it got, reading the file system: the new output back, the original back."""
    target, staged, aside = swap.target, swap.staged, swap.aside
    if swap.new is not None and identity(target) == swap.new:  # the new output got in
        if swap.old is not None and identity(staged) == swap.old:  # swapped: swap back
            if renameat2(staged, target, RENAME_EXCHANGE):
                return
        if identity(staged) == swap.new:  # hard-linked in, not yet unlinked from its staged name
            os.unlink(target)
        else:
            rename_noreplace(target, staged)
    if not os.path.lexists(aside):
        return
    if swap.old is not None and identity(target) == swap.old:  # a hard link of the original, still in place
        os.unlink(aside)
        return
    if os.path.isdir(target) and not os.path.islink(target) and not os.listdir(target):
        os.rmdir(target)  # a claim `rename_noreplace` made and could not fill
    restore_original(aside, target)


def restore_original(aside: Path, target: Path) -> None:
    """Rename a moved-aside original back to `target`, unless something else took that name meanwhile."""
    try:
        rename_noreplace(aside, target)
    except FileExistsError:
        raise OutputError(f"{target}: taken by another process while it was being replaced; its earlier "
                          f"version is kept as {aside}") from None


def remove_original(swap: Swap) -> None:
    """Delete the original `publish` replaced at `swap.target`, wherever it waits (aside, or at the staged name)."""
    for leftover in (swap.aside, swap.staged):
        with suppress(OSError):  # what cannot go now is a dead writer's staging later: remove_stale_staging
            if os.path.isdir(leftover) and not os.path.islink(leftover):
                shutil.rmtree(leftover)
            elif os.path.lexists(leftover):
                os.unlink(leftover)


def remove_stale_staging(folder: Path) -> list[Path]:
    """Delete staging files and folders in `folder` left by writers on this machine that are no longer running.

    Only names this project's `staging_name` makes are touched, and only when
    they name this machine and their process id is gone here, so another live
    run's staging is never removed; another machine's process ids mean
    nothing here, so its staging files (on a shared folder) are left alone.
    An original that `publish` had moved aside when its writer was killed is
    put back instead where its name is free (or holds the empty folder a
    claim left), and is not listed.
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
        if match["kind"] == "old" and put_back(entry, entry.with_name(match["name"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def put_back(aside: Path, target: Path) -> bool:
    """Rename a dead writer's moved-aside original back to `target` when nothing else holds that name; whether done."""
    with suppress(OSError):
        if os.path.isdir(target) and not os.path.islink(target) and not os.listdir(target):
            os.rmdir(target)
        if not os.path.lexists(target):
            rename_noreplace(aside, target)
            return True
    return False


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

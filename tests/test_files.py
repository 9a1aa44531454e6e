"""tumorseg/files.py: atomic writes, stale staging clean-up, and the publisher."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tumorseg import files
from tumorseg.files import OutputError, remove_stale_staging, staging_name, write_atomic


def dead_pid() -> int:
    """The id of a process that has finished (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_write_atomic_replaces_whole_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "a.json"
    write_atomic(target, "old")
    write_atomic(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_full_disk_is_named_keeps_the_old_file_and_removes_the_staging_file(tmp_path, monkeypatch):
    target = tmp_path / "best.pt"
    write_atomic(target, b"previous")
    real_open = open

    class FullDisk:
        def __init__(self, path, mode):
            self.file = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "open", FullDisk, raising=False)
    with pytest.raises(OutputError, match=f"no space left on device while writing {target}"):
        write_atomic(target, b"x" * 100)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_stale_staging_of_dead_writers_goes_and_live_or_foreign_files_stay(tmp_path):
    host = files.staging_host()
    dead = tmp_path / f".last.pt.{host}.{dead_pid()}.0123abcd.tmp"
    dead_folder = tmp_path / f".run.{host}.{dead_pid()}.0123abcd.partial"
    alive = tmp_path / f".last.pt.{host}.{1}.0123abcd.tmp"  # pid 1 always runs
    mine = tmp_path / staging_name("best.pt")
    foreign = tmp_path / "notes.tmp"
    for path in (dead, alive, mine, foreign):
        path.write_text("x")
    dead_folder.mkdir()
    (dead_folder / "masks").mkdir()
    removed = remove_stale_staging(tmp_path)
    assert sorted(removed) == sorted([dead, dead_folder])
    assert alive.exists() and mine.exists() and foreign.exists()


def test_staging_of_another_machine_on_a_shared_folder_is_never_removed(tmp_path, monkeypatch):
    pid = dead_pid()  # gone here; on the other machine it may be writing right now

    def staged_on(host: str) -> Path:
        monkeypatch.setattr(files.socket, "gethostname", lambda: host)
        path = tmp_path / staging_name("last.pt").replace(f".{os.getpid()}.", f".{pid}.")
        path.write_text("x")
        return path

    theirs = staged_on("node-b.cluster")
    assert theirs.name.startswith(f".last.pt.node-b_cluster.{pid}.")  # the host's dots would blur the fields
    older = tmp_path / f".best.pt.{pid}.0123abcd.tmp"  # named before staging names held the host: host unknown
    older.write_text("x")
    ours = staged_on("node-a.cluster")
    assert remove_stale_staging(tmp_path) == [ours]
    assert theirs.exists() and older.exists()

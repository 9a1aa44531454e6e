"""tumorseg/files.py: atomic writes, stale staging clean-up, and the publisher."""

import errno
import os
import signal
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


# ----------------------------------------------------------------------------- the publisher

def snapshot(path: Path):
    """What a path holds: a file's bytes, a folder's {relative name: bytes}, None when nothing is there."""
    if not os.path.lexists(path):
        return None
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes()


def stage(target: Path, kind: str, text: str) -> Path:
    """A staged output for `target` beside it: a file, or a folder of two files (one in a sub-folder)."""
    staged = target.with_name(staging_name(target.name, "partial"))
    if kind == "file":
        staged.write_text(text)
    else:
        (staged / "masks").mkdir(parents=True)
        (staged / "summary.json").write_text(text)
        (staged / "masks" / "a.png").write_text(text * 3)
    return staged


def publish_case(folder: Path, kind: str, original: bool) -> tuple[Path, Path, object, object]:
    """A target (with an earlier version when `original`) and its staged new version; both snapshots."""
    target = folder / ("model.pt" if kind == "file" else "run")
    if original:
        os.replace(stage(target, kind, "earlier"), target)
    staged = stage(target, kind, "new")
    return target, staged, snapshot(target), snapshot(staged)


# Every file-system step the publisher takes: the injected fault lands on the k-th call of any of them.
STEPS = ("fsync", "replace", "rename", "link", "unlink", "mkdir", "rmdir")


def inject_at_step(monkeypatch, k: int, fault):
    """Call `fault(when)` around the k-th file-system step ('before' it runs or 'after'); a list counts the steps."""
    calls = []

    def wrap(real):
        def step(*args, **kwargs):
            calls.append(real)
            if len(calls) == k + 1:
                fault("before")
            result = real(*args, **kwargs)
            if len(calls) == k + 1:
                fault("after")
            return result
        return step

    for name in STEPS:
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(files, "renameat2", wrap(files.renameat2))
    return calls


def use_renameat2_or_not(renameat2: bool, monkeypatch, syncfs: bool = True) -> None:
    """Publish with renameat2 (skip where this system lacks it) or through the fallback; syncfs off on request."""
    if renameat2 and files.RENAMEAT2 is None:
        pytest.skip("no renameat2 here")
    if not renameat2:
        monkeypatch.setattr(files, "RENAMEAT2", None)
        if not syncfs:
            monkeypatch.setattr(files, "SYNCFS", None)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("kind", ["file", "folder"])
@pytest.mark.parametrize("original", [True, False], ids=["replacing", "fresh"])
def test_a_fault_at_every_step_of_publishing_keeps_the_earlier_output_or_the_complete_new_one(
        tmp_path, monkeypatch, renameat2, kind, original):
    # without renameat2, also one fsync per file: the steps where neither renameat2 nor syncfs exists
    use_renameat2_or_not(renameat2, monkeypatch, syncfs=False)
    faults = {"Ctrl-C before": ("before", lambda: signal.raise_signal(signal.SIGINT)),  # a real signal: held or not
              "Ctrl-C after": ("after", lambda: signal.raise_signal(signal.SIGINT)),
              "error": ("before", lambda: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))}
    case = tmp_path / "count"
    case.mkdir()
    target, staged, _, _ = publish_case(case, kind, original)
    with monkeypatch.context() as counting:  # how many steps a clean publication takes
        steps = inject_at_step(counting, -2, lambda when: None)
        files.publish({target: staged}, overwrite=original)
        total = len(steps)
    assert total >= 2
    for k in range(total):
        for label, (at, fault) in faults.items():
            case = tmp_path / f"{k}-{label}"
            case.mkdir()
            target, staged, before, new = publish_case(case, kind, original)
            with monkeypatch.context() as patched:
                injected = []
                inject_at_step(patched, k, lambda when: (injected.append(when), fault()) if when == at else None)
                try:
                    files.publish({target: staged}, overwrite=original)
                    outcome = "published"
                except (KeyboardInterrupt, OSError, files.OutputError) as error:
                    outcome = type(error).__name__
            where = f"step {k} of {total}, {label}: {outcome}"
            assert injected, where
            if outcome == "published":  # a fault after the new output was in place
                assert snapshot(target) == new, where
                assert all(files.STAGING_PATTERN.match(p.name) for p in case.iterdir() if p != target), where
            else:
                assert snapshot(target) == before, where  # the earlier output, whole (or still nothing)
                assert snapshot(staged) == new, where  # the new one back at its staged name, for the caller
                assert sorted(case.iterdir()) == sorted(p for p in (target, staged) if os.path.lexists(p)), where


def publish_in_a_child_killed_at_step(target: Path, staged: Path, k: int, monkeypatch) -> tuple[int, int]:
    """Publish in a forked child that dies at its k-th step as kill -9 would (no clean-up, no rollback).

    Returns the child's exit status and how many steps it took (for a child never killed, k = 0).
    """
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest clean-up may run here, whatever happens
        try:
            os.close(reader)
            killed_at = k

            def die(when):
                os._exit(137)

            steps = inject_at_step(monkeypatch, killed_at - 1, lambda when: die(when) if when == "after" else None)
            files.publish({target: staged}, overwrite=True)
            os.write(writer, str(len(steps)).encode())
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(writer)
    with os.fdopen(reader) as pipe:
        steps = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), int(steps or 0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_kill_at_every_step_of_replacing_never_loses_both_versions(tmp_path, monkeypatch, renameat2, kind):
    use_renameat2_or_not(renameat2, monkeypatch, syncfs=False)
    (tmp_path / "whole").mkdir()
    target, staged, _, new = publish_case(tmp_path / "whole", kind, original=True)
    code, total = publish_in_a_child_killed_at_step(target, staged, 0, monkeypatch)  # never killed: counts
    assert code == 0 and total >= 2 and snapshot(target) == new
    for k in range(1, total + 1):
        case = tmp_path / f"killed-{k}"
        case.mkdir()
        target, staged, before, new = publish_case(case, kind, original=True)
        code, _ = publish_in_a_child_killed_at_step(target, staged, k, monkeypatch)
        assert code == 137, f"step {k}"
        if renameat2 or kind == "file":  # swapped atomically: even before any clean-up
            assert snapshot(target) in (before, new), f"killed after step {k} of {total}"
        remove_stale_staging(case)  # what the next start does with the killed writer's leftovers
        assert snapshot(target) in (before, new), f"killed after step {k} of {total}"
        # the staged name carries this test's pid (alive), where a real writer's would be the dead one's
        left = {p.name for p in case.iterdir()} - {staged.name}
        assert left == {target.name}, f"killed after step {k} of {total}"


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_publishing_never_replaces_what_another_process_created(tmp_path, monkeypatch, renameat2, kind):
    use_renameat2_or_not(renameat2, monkeypatch)
    target, staged, _, new = publish_case(tmp_path, kind, original=False)
    real_renameat2 = files.renameat2

    def theirs_appears(source, destination, flags):  # after every check, right before the rename
        if destination == target and not os.path.lexists(target):
            target.mkdir() if kind == "folder" else target.write_text("theirs")
            if kind == "folder":
                (target / "theirs.txt").write_text("theirs")
        return real_renameat2(source, destination, flags)

    monkeypatch.setattr(files, "renameat2", theirs_appears)
    theirs = None
    with pytest.raises(files.OutputExists, match=f"{target}: already exists"):
        try:
            files.publish({target: staged})
        finally:
            theirs = snapshot(target)
    assert theirs in (b"theirs", {"theirs.txt": b"theirs"}) and snapshot(staged) == new
    with pytest.raises(FileExistsError):
        files.rename_noreplace(staged, target)
    assert snapshot(target) == theirs and snapshot(staged) == new


def test_publishing_several_outputs_is_all_or_nothing(tmp_path):
    model, sidecar = tmp_path / "model.pt", tmp_path / "model.pt.json"
    sidecar.write_text("theirs")  # made by someone else after any check
    with pytest.raises(files.OutputExists, match="model.pt.json"):
        files.publish_files({model: b"weights", sidecar: "{}"})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt.json"] and sidecar.read_text() == "theirs"
    files.publish_files({model: b"weights", sidecar: "{}"}, overwrite=True)
    assert model.read_bytes() == b"weights" and sidecar.read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model.pt.json"]


def test_an_interruption_while_the_replaced_originals_are_removed_is_noted_not_raised(tmp_path, monkeypatch, capsys):
    target, staged, _, new = publish_case(tmp_path, "folder", original=True)
    real_rmtree = files.shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the earlier folder is being deleted
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(files.shutil, "rmtree", interrupted_rmtree)
    files.publish({target: staged}, overwrite=True)
    assert snapshot(target) == new and [p.name for p in tmp_path.iterdir()] == [target.name]
    assert "they were already complete and are kept" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

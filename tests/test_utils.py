"""utils.py: atomic writes, stale staging clean-up, device names, checkpoint loading across versions."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils
from conftest import ROOT
from config import Config
from utils import (CheckpointError, OutputError, load_checkpoint, model_arguments, pick_device,
                   remove_stale_staging, save_checkpoints, staging_name, write_atomic)


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

    monkeypatch.setattr(utils, "open", FullDisk, raising=False)
    with pytest.raises(OutputError, match=f"no space left on device while writing {target}"):
        write_atomic(target, b"x" * 100)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_stale_staging_of_dead_writers_goes_and_live_or_foreign_files_stay(tmp_path):
    host = utils.staging_host()
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
        monkeypatch.setattr(utils.socket, "gethostname", lambda: host)
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


@pytest.mark.parametrize("name, message", [
    ("gpu0", "not a device name"),
    ("cuda", "no CUDA GPU"),
    ("cuda:7", "no CUDA GPU"),
    ("tpu", "not a device name"),
])
def test_unusable_device_names_are_explained(name, message):
    if torch.cuda.is_available() and name.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=message):
        pick_device(name)


def test_cpu_and_auto_devices():
    assert pick_device("cpu").type == "cpu" and pick_device("auto").type in ("cpu", "cuda", "mps")


def tiny_state(config: Config) -> dict:
    model = utils.build_model(config)
    return {"model_args": model_arguments(config), "model": model.state_dict(), "config": config.to_dict(),
            "epoch": 1}


def test_auto_precision_is_bf16_only_where_the_hardware_computes_it(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert utils.resolve_amp(cpu, "auto") == ("bf16" if native else "off")
        assert [utils.resolve_amp(cpu, amp) for amp in ("off", "bf16", "fp16")] == ["off", "bf16", "fp16"]
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")  # a torch without the probe: float32
    assert utils.resolve_amp(cpu, "auto") == "off"
    assert utils.resolve_amp(torch.device("mps"), "auto") == "off"


def test_auto_precision_on_a_gpu_that_only_emulates_bf16_is_float32(monkeypatch):
    cuda = torch.device("cuda")  # only named: the probe below answers for the GPU
    emulating = lambda including_emulation=True: including_emulation  # noqa: E731  (a T4 or V100)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulating)
    assert utils.resolve_amp(cuda, "auto") == "off"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert utils.resolve_amp(cuda, "auto") == "bf16"


def test_a_run_folder_lock_is_exclusive_until_released(tmp_path):
    held = utils.lock_run_folder(tmp_path)
    with pytest.raises(utils.RunFolderBusy, match=f"in use by process {os.getpid()} on "):
        utils.lock_run_folder(tmp_path)
    held.close()
    utils.lock_run_folder(tmp_path).close()


def test_a_killed_holder_frees_its_run_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, utils; held = utils.lock_run_folder(sys.argv[1]); "
                               "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(utils.RunFolderBusy, match=f"process {holder.pid} "):
            utils.lock_run_folder(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the operating system drops the lock
        holder.wait()
    utils.lock_run_folder(tmp_path).close()


def test_empty_and_garbage_checkpoints_are_named(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt: the file is empty"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="junk.pt: not a checkpoint written by torch.save"):
        load_checkpoint(tmp_path / "junk.pt")


def test_checkpoint_survives_renamed_config_keys_with_a_warning(tmp_path):
    config = Config(BASE_CHANNELS=4, DEPTH=2, IN_CHANNELS=1)
    state = tiny_state(config)
    state["config"]["OLD_KEY_SINCE_RENAMED"] = 3
    save_checkpoints([tmp_path / "a.pt"], state)
    loaded = load_checkpoint(tmp_path / "a.pt")
    assert loaded.config.BASE_CHANNELS == 4
    assert any("OLD_KEY_SINCE_RENAMED" in w for w in loaded.warnings)


def test_checkpoint_of_the_first_format_loads_with_a_warning(tmp_path):
    config = Config(BASE_CHANNELS=4, DEPTH=2, IN_CHANNELS=1)
    state = tiny_state(config)
    del state["model_args"]
    torch.save(state, tmp_path / "v1.pt")  # no format_version: written before it existed
    loaded = load_checkpoint(tmp_path / "v1.pt")
    assert any("older version" in w for w in loaded.warnings)
    x = torch.randn(1, 1, 16, 16)
    reference = utils.build_model(config)
    reference.load_state_dict(state["model"])
    reference.eval(), loaded.model.eval()
    assert torch.equal(reference(x), loaded.model(x))


def test_checkpoint_from_a_newer_format_is_refused(tmp_path):
    save_checkpoints([tmp_path / "new.pt"], tiny_state(Config(BASE_CHANNELS=4, DEPTH=2)))
    state = torch.load(tmp_path / "new.pt", weights_only=True)
    state["format_version"] = 99
    torch.save(state, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer version"):
        load_checkpoint(tmp_path / "new.pt")


def test_random_states_survive_a_weights_only_checkpoint_and_repeat_the_draws(tmp_path):
    import random

    import numpy as np

    from tumorseg.data.augmentation import training_augmentation
    from utils import random_states, restore_random_states
    generator, augmentation = torch.Generator().manual_seed(1), training_augmentation(3, intensity=True)
    image = np.zeros((8, 8, 1), np.uint8)

    def draws():
        flips = [augmentation(image=np.arange(64, dtype=np.uint8).reshape(8, 8, 1))["image"].tolist()
                 for _ in range(4)]
        return (random.random(), np.random.rand(), torch.rand(1).item(), torch.randperm(9, generator=generator),
                flips, augmentation(image=image)["image"].sum())

    save_checkpoints([tmp_path / "s.pt"], {"rng": random_states(generator, augmentation)})
    first = draws()
    restore_random_states(torch.load(tmp_path / "s.pt", weights_only=True)["rng"], generator, augmentation)
    second = draws()
    assert first[:3] == second[:3] and torch.equal(first[3], second[3]) and first[4:] == second[4:]


def test_sigterm_raises_terminated_inside_the_block_only_and_maps_to_exit_code_143():
    import signal
    import threading

    from utils import Terminated, interruption, sigterm_as_interrupt
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # the handler runs between bytecodes; this loop is never finished
            pass
    assert signal.getsignal(signal.SIGTERM) is before
    assert interruption(Terminated()) == ("SIGTERM", 143) and interruption(KeyboardInterrupt()) == ("Ctrl-C", 130)
    outcome = []

    def in_a_thread():  # handlers can only be set in the main thread: the block must still run
        with sigterm_as_interrupt():
            outcome.append("ran")

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert outcome == ["ran"] and signal.getsignal(signal.SIGTERM) is before

"""utils.py: device names, precision, random states that survive a checkpoint, SIGTERM as an interruption."""

import os

import pytest
import torch

from tumorseg.runs.checkpoints import save_checkpoints
import utils
from utils import pick_device


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

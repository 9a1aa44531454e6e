"""The runtime: signals and interruption, seeds and random states, device, precision, compilation, processes."""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from config import Config


def tolerant_console() -> None:
    """Print file names that are not valid UTF-8 with backslash escapes instead of crashing."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a batch scheduler's stop, a container's shutdown) raised like Ctrl-C, so its clean-up runs."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises Terminated in the main thread; the previous handler comes back after.

    Every `except KeyboardInterrupt` of the scripts then also catches a
    polite stop: half-written outputs are removed and what was kept is
    said, instead of the process vanishing mid-write. Outside the main
    thread (where signal handlers cannot be set) the block changes nothing.
    """
    def terminate(signum: int, frame: Any) -> None:
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_interruptible(body: Callable[[], int], outcome: str) -> int:
    """`body()`'s exit code, SIGTERM handled like Ctrl-C: either is said with `outcome`, and gives 143 or 130.

    For the commands that have nothing of their own to clean up (their
    temporary folders and `write_atomic` staging files go on the way out).
    """
    with sigterm_as_interrupt():
        try:
            return body()
        except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (Terminated)
            cause, code = interruption(error)
            print(f"\ninterrupted ({cause}): {outcome}", file=sys.stderr)
            return code


def interruption(error: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped the process and its shell exit code: ("Ctrl-C", 130) or ("SIGTERM", 143)."""
    return ("SIGTERM", 128 + signal.SIGTERM) if isinstance(error, Terminated) else ("Ctrl-C", 130)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_states(loader_generator: torch.Generator, augmentation: Any) -> dict[str, Any]:
    """Every random stream a training epoch draws from, as plain values a weights_only checkpoint can hold.

    Python, NumPy and torch (CPU and this process's GPU) global states, the training loader's
    generator (shuffle order and worker seeds) and the augmentation's own
    generators: an albumentations Compose and each of its transforms keep a
    random.Random and a numpy Generator apart from the global ones.
    """
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
    generators = [augmentation, *augmentation.transforms] if augmentation is not None else []
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "loader": loader_generator.get_state(),
            "augmentation": [(g.py_random.getstate(), g.random_generator.bit_generator.state) for g in generators]}


def restore_random_states(states: dict[str, Any], loader_generator: torch.Generator, augmentation: Any) -> None:
    """Put back what `random_states` saved, so the next epoch draws exactly what it would have drawn."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].cpu())
    loader_generator.set_state(states["loader"].cpu())
    generators = [augmentation, *augmentation.transforms] if augmentation is not None else []
    for generator, (python_state, numpy_state) in zip(generators, states["augmentation"], strict=True):
        generator.py_random.setstate(python_state)
        generator.random_generator.bit_generator.state = numpy_state


def pick_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; otherwise the named device, checked to exist here.

    Raises ValueError with a message a user can act on for a malformed name
    ('gpu0') or a device this machine lacks ('cuda' without CUDA).
    """
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise ValueError(f"DEVICE {name!r} is not a device name: use auto, cpu, cuda, cuda:N or mps") from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"DEVICE {name!r}: this PyTorch sees no CUDA GPU here; use --device cpu or auto")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"DEVICE {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"DEVICE {name!r}: MPS is not available here; use --device cpu or auto")
        if device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"DEVICE {name!r}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """Mixed precision for forward passes as AMP says ("off", "bf16", "fp16"); a no-op context for "off"."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp != "off")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU from Ampere on, or a CPU with AVX512-BF16 or AMX.

    Elsewhere bf16 works but is emulated, slower than float32 (a 2-core
    AVX2 CPU trains several times slower), so "auto" must not pick it there.
    """
    if device.type == "cuda":
        # Without the argument, emulation counts: a T4 or V100 would get bf16 slower than float32.
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # Private helpers, present since torch 2.0; a torch without them gets float32, never a crash.
        probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return any(probe() for probe in probes if probe is not None)
    return False


def resolve_amp(device: torch.device, amp: str) -> str:
    """AMP as it will run on `device`: "auto" becomes "bf16" where `native_bf16`, else "off"; others unchanged."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "off"


def check_amp(device: torch.device, amp: str) -> str | None:
    """Raise ValueError, naming the device, unless AMP `amp` really computes in its precision on `device`.

    torch.autocast switches itself off with only a warning where a dtype is
    unsupported, so a small convolution is run and its output dtype checked.
    Returns a warning to show when the precision works but is emulated on
    `device`, so it runs slower than float32 (fp16 on a CPU; bf16 on a CPU
    without bf16 instructions); None otherwise.
    """
    if amp == "off":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # autocast's "not supported, disabling" warning becomes an error
            with autocast(device, amp):
                out = torch.nn.functional.conv2d(torch.ones(1, 1, 4, 4, device=device),
                                                 torch.ones(1, 1, 3, 3, device=device))
        reason = None if out.dtype == AMP_DTYPES[amp] else f"the convolution ran in {out.dtype}"
    except (RuntimeError, UserWarning) as error:
        reason = str(error).strip().splitlines()[0]
    if reason is not None:
        raise ValueError(f"AMP {amp!r} is not supported on {device} by this PyTorch ({reason}); "
                         "use --amp off" + (" or --amp bf16" if amp == "fp16" else ""))
    if device.type == "cpu" and amp == "fp16":
        return ("AMP 'fp16' is emulated on a CPU and runs many times slower than float32 (bench.py --compare "
                "measures it); use --amp auto, which picks bf16 where the CPU computes it and float32 elsewhere")
    if device.type == "cpu" and amp == "bf16" and not native_bf16(device):
        return ("AMP 'bf16' is emulated on this CPU (no AVX512-BF16 or AMX) and runs slower than float32; "
                "use --amp auto, which picks float32 here")
    return None


def setup_runtime(config: Config, distributed: bool = False, check: bool = True) -> tuple[torch.device, Config]:
    """The device config.DEVICE names (this process's under torchrun with `distributed`), and `config` with AMP resolved.

    With `check`, AMP is checked to run on the device (ValueError if not) and
    a precision that is only emulated there, slower than float32, is warned
    of on stderr (by the main process).
    """
    device = pick_device(config.DEVICE)
    if distributed:
        device = init_distributed(device)
    config = dataclasses.replace(config, AMP=resolve_amp(device, config.AMP))
    if check:
        slow_precision = check_amp(device, config.AMP)
        if slow_precision and is_main_process():
            print(f"warning: {slow_precision}", file=sys.stderr)
    return device, config


def memory_format_for(channels_last: bool) -> torch.memory_format:
    """torch.channels_last when CHANNELS_LAST asks for it, else the default contiguous layout."""
    return torch.channels_last if channels_last else torch.contiguous_format


def compile_model(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """torch.compile(model), or `model` itself with a warning where this machine cannot compile it.

    Compilation is lazy, so a missing C++ compiler or Triton would only
    surface at the first step: one forward pass of `example` in eval mode
    without gradients (the graph validation needs anyway; running statistics
    untouched) finds out here.
    """
    was_training = model.training
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled.eval()(example)
        return compiled
    except Exception as error:  # dynamo and inductor raise many kinds; any of them means "cannot compile"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"warning: COMPILE: torch.compile cannot compile the model here ({reason}); "
              "running it uncompiled", file=sys.stderr)
        torch._dynamo.reset()  # forget the failed attempt, so the plain model runs eagerly
        return model
    finally:
        model.train(was_training)


def init_distributed(device: torch.device) -> torch.device:
    """Join the process group torchrun set up, if any (NCCL on CUDA, gloo otherwise); this process's device.

    Without torchrun (no WORLD_SIZE, or 1) nothing happens and `device` is
    kept. Under torchrun each process takes the GPU of its LOCAL_RANK.
    Raises ValueError for a device that cannot be shared out that way.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        local_rank = int(os.environ["LOCAL_RANK"])
        if device.index is not None:
            raise ValueError(f"DEVICE {str(device)!r}: under torchrun each process takes the GPU of its "
                             "LOCAL_RANK; use --device auto or cuda")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"--nproc_per_node is more than the {torch.cuda.device_count()} GPU(s) here")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"DEVICE {str(device)!r}: torchrun runs on CUDA GPUs or CPUs only")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes: (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main_process() -> bool:
    """Rank 0, the one process that writes files and prints (the only one without torchrun).

    torchrun's RANK answers before the process group is joined.
    """
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def average_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over all processes (`values` itself with one process)."""
    if not dist.is_initialized():
        return values
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def gather_objects(value: Any) -> list[Any]:
    """`value` of every process, in rank order, on every process ([value] with one process)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def from_main_process(value: Any) -> Any:
    """Rank 0's `value`, on every process: decisions that must agree (stop now? which run folder?)."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]

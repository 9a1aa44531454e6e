"""Glue shared by train.py, test.py and bench.py: seeding, device and precision, processes, checkpoint files, files.

Also the safe-writing helpers: atomic writes, staging names, run-folder locks.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import math
import os
import pickle
import random
import re
import secrets
import shutil
import signal
import socket
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist

try:
    import fcntl  # POSIX file locks; absent on Windows, where run folders are not locked
except ImportError:
    fcntl = None
from torch import nn

from config import Config
from model import UNet, build_unet


CHECKPOINT_FORMAT = 2  # 2: model_args stored apart from the config; 1: config only


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not fit the model its config describes."""


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


def model_arguments(config: Config, type_classes: Sequence[str] = ()) -> dict[str, Any]:
    """The network's own constructor arguments, stored in checkpoints apart from the config.

    `stem`, `type_classes` (the TypeHead's class names, from the data) and
    `deep_supervision` (the auxiliary heads, whose weights the state dict
    holds, so a checkpoint rebuilds them to load) are stored only when set,
    so a plain network's arguments are what they always were.
    """
    arguments: dict[str, Any] = {"name": config.MODEL, "in_channels": config.IN_CHANNELS,
                                 "base_channels": config.BASE_CHANNELS, "depth": config.DEPTH,
                                 "bilinear": config.BILINEAR}
    if config.STEM != "none":
        arguments["stem"] = config.STEM
    if type_classes:
        arguments["type_classes"] = list(type_classes)
    if config.DEEP_SUPERVISION:
        arguments["deep_supervision"] = config.DEEP_SUPERVISION
    return arguments


def build_model_from_arguments(arguments: dict[str, Any]) -> UNet:
    """The network `model_arguments` describes."""
    return build_unet(**arguments)


def build_model(config: Config, type_classes: Sequence[str] = ()) -> UNet:
    """The network a config describes (MODEL, IN_CHANNELS, BASE_CHANNELS, DEPTH, BILINEAR, STEM,
    DEEP_SUPERVISION), with a TypeHead for `type_classes` when given."""
    return build_model_from_arguments(model_arguments(config, type_classes))


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


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """torch.save of `state` into memory: serialised once, then written to one or more files."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_checkpoints(paths: list[Path], state: dict[str, Any]) -> None:
    """Write one checkpoint state to each path, atomically; serialised once."""
    payload = checkpoint_bytes({"format_version": CHECKPOINT_FORMAT, **state})
    for path in paths:
        write_atomic(path, payload)


@dataclass
class LoadedCheckpoint:
    """A checkpoint's rebuilt model (weights loaded), its training config, raw contents and load warnings."""

    model: nn.Module
    config: Config
    state: dict[str, Any]
    warnings: list[str]


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """Rebuild the model a checkpoint was trained as, with its weights.

    Loads with weights_only=True: tensors and plain values only, so a crafted
    file cannot run code. The network is rebuilt from the checkpoint's own
    `model_args`, so renaming a config key never orphans old weights; config
    keys this version does not know are dropped with a warning, missing ones
    take today's defaults (new keys default to the old behaviour). Checkpoints
    written before `format_version` existed load with a warning. Raises
    CheckpointError naming the file otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); an interrupted copy or save? "
                              "use another checkpoint, e.g. last.pt or best.pt of the run")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise CheckpointError(f"{path}: not a checkpoint written by torch.save (not a zip archive); "
                              "truncated, or another kind of file?")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:  # weights_only refused an object beyond tensors and plain values
        raise CheckpointError(f"{path}: cannot be loaded safely as a checkpoint: it holds Python objects "
                              "that could run code when loaded; use a checkpoint written by train.py") from error
    except Exception as error:  # truncated zips, random bytes, other formats
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint of this project ({reason})") from error
    if not isinstance(state, dict) or not {"model", "config"} <= set(state):
        raise CheckpointError(f"{path}: not a checkpoint of this project (needs 'model' and 'config')")
    warnings: list[str] = []
    version = state.get("format_version", 1)
    if version > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: written by a newer version of this project (format {version}, "
                              f"this one reads up to {CHECKPOINT_FORMAT}); update the code")
    if version < CHECKPOINT_FORMAT:
        warnings.append(f"{path}: written by an older version of this project (format {version}); "
                        "loaded, but re-save it by training again to silence this warning")
    try:
        config, dropped = Config.from_saved(state["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its saved config is not valid for this version ({error})") from error
    if dropped:
        warnings.append(f"{path}: config keys this version does not know were ignored: {', '.join(dropped)}")
    try:
        arguments = state.get("model_args") or model_arguments(config)
        model = build_model_from_arguments(arguments)
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as error:
        raise CheckpointError(f"{path}: weights do not fit the model the checkpoint describes ({error})") from error
    return LoadedCheckpoint(model.to(device), config, state, warnings)

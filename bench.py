"""Measure training speed and how long a step waits for data, with the same code train.py runs.

    python bench.py --data-root ../shared/data/figshare-brain-tumor --image-size 256 --base-channels 64
    python bench.py --data-root ../shared/data/figshare-brain-tumor --recipe cpu --compare
    python bench.py --data-root ../shared/data/figshare-brain-tumor --recipe cpu --inference 64

Times `--steps` training steps (after `--warmup` untimed ones) on batches
drawn from the real, augmented training loader, and separately the time the
loader alone takes to produce those batches. Prints one JSON line.

`--compare` times every combination of AMP, CHANNELS_LAST and COMPILE that
this device supports, except keys fixed with a flag (`--compare --compile
false` leaves compilation out), and prints them side by side before the JSON
line, so you see what is worth switching on.

`--inference N` instead times test.py's prediction loop (decoding, the model,
resizing back, the three PNGs per image, per-image scores) on the first N
images, upscaled to `--native-size` px in a temporary folder, with an
untrained model of the config's architecture: once plainly (float32, PNGs
written inline at PIL's default compression) and once as test.py runs with
the config's AMP and CHANNELS_LAST, writing threads and fast compression.
"""

from __future__ import annotations

import dataclasses
import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from config import Config, build_parser, config_from_args
from model import count_parameters
from model import build_model
from tumorseg.data import checks, reading
from tumorseg.evaluation.evaluate import predict_and_write
from tumorseg.evaluation.scoring import Scoring
from tumorseg.inference import outputs
from tumorseg.inference.predict import find_images, native_probabilities
from tumorseg.runs.checkpoints import LoadedCheckpoint
from tumorseg.training.loaders import load_data, make_loaders
from tumorseg.training.optimisation import build_optimisation
from tumorseg.training.steps import train_step
from utils import check_amp, compile_model, memory_format_for, run_interruptible, set_seed, setup_runtime

SPEED_KEYS = ("AMP", "CHANNELS_LAST", "COMPILE")


def time_training(config: Config, loader: torch.utils.data.DataLoader, device: torch.device, steps: int,
                  warmup: int) -> dict:
    """Training images/s of `config`'s model, precision and memory format on batches from `loader`."""
    set_seed(config.SEED)
    torch._dynamo.reset()  # each combination compiles afresh, not against the previous model's guards
    memory_format = memory_format_for(config.CHANNELS_LAST)
    model = build_model(config).to(device, memory_format=memory_format)
    optimisation = build_optimisation(model, config, device, len(loader))  # what train.py steps with
    stream = batches(loader)
    net, compiled = model, False
    if config.COMPILE:
        net = compile_model(model, next(stream)[0].to(device, memory_format=memory_format))
        compiled = net is not model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        images, masks = next(stream)
        train_step(net, images.to(device, non_blocking=True, memory_format=memory_format),
                   masks.to(device, non_blocking=True), optimisation.loss_fn, optimisation.optimizer,
                   optimisation.scheduler, amp=config.AMP, scaler=optimisation.scaler)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    result = {"amp": config.AMP, "channels_last": config.CHANNELS_LAST, "compile": config.COMPILE,
              "compiled": compiled, "train_images_per_second": round(config.BATCH_SIZE / seconds, 2),
              "step_seconds": seconds, "parameters_millions": round(count_parameters(model) / 1e6, 2)}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def time_inference(config: Config, device: torch.device, count: int, native_size: int) -> dict:
    """test.py's prediction-and-writing images/s on `count` images upscaled to `native_size` px.

    Side by side: a plain baseline (float32, PNGs written inline at PIL's
    default compression) and test.py's way with `config`'s AMP and
    CHANNELS_LAST (AMP already resolved), writing threads and fast compression.
    """
    set_seed(config.SEED)
    model = build_model(config).to(device)
    loaded = LoadedCheckpoint(model=model, config=config, state={}, warnings=[])
    scoring = Scoring(group_column="", strata_columns=[], labels={}, spacing=None, spacing_source="", class_mix=None)
    args = argparse.Namespace(postprocess="none", subset="all")
    network = f"{'float32' if config.AMP == 'off' else config.AMP}{', channels last' if config.CHANNELS_LAST else ''}"
    settings = {"float32, inline, compress_level 6": (dataclasses.replace(config, AMP="off", CHANNELS_LAST=False),
                                                      0, 6),
                f"{network}, {outputs.WRITE_THREADS} threads, compress_level {outputs.PNG_COMPRESS_LEVEL}":
                    (config, outputs.WRITE_THREADS, outputs.PNG_COMPRESS_LEVEL)}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "native"
        images, masks = find_images(Path(config.DATA_ROOT))
        for sub, paths, resample in (("images", images[:count], Image.Resampling.BILINEAR),
                                     ("masks", [masks[reading.stem_key(path)] for path in images[:count]],
                                      Image.Resampling.NEAREST)):
            (root / sub).mkdir(parents=True)
            for path in paths:
                Image.open(path).resize((native_size, native_size), resample).save(root / sub / path.name)
        images, masks = find_images(root)
        first = [reading.read_image(images[0], config.IN_CHANNELS)]
        results = {}
        for name, (options, threads, level) in settings.items():
            options = dataclasses.replace(options, DATA_ROOT=str(root))
            model.to(memory_format=memory_format_for(options.CHANNELS_LAST))
            # untimed first pass: a timed setting should not pay for its first-call allocations
            native_probabilities(model, config, first, device, amp=options.AMP, channels_last=options.CHANNELS_LAST)
            staging = outputs.start_staging(Path(folder) / "predictions", "bench", overwrite=False)
            summary, _ = predict_and_write([loaded], [Path(folder) / "bench.pt"], images, masks, scoring,
                                                       staging, device, options, args, time.perf_counter(),
                                                       write_threads=threads, compress_level=level)
            results[name] = round(summary["images_per_second"], 2)
    return results


def batches(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, epoch after epoch, without end."""
    while True:
        yield from loader


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def combinations(config: Config, device: torch.device, fixed: set[str]) -> list[Config]:
    """`config` with every supported value of each speed key not in `fixed`."""
    amps = [config.AMP] if "AMP" in fixed else [amp for amp in ("off", "bf16", "fp16") if supports(device, amp)]
    flags = {key: [getattr(config, key)] if key in fixed else [False, True] for key in ("CHANNELS_LAST", "COMPILE")}
    return [dataclasses.replace(config, AMP=amp, CHANNELS_LAST=channels_last, COMPILE=compile_)
            for compile_, amp, channels_last in itertools.product(flags["COMPILE"], amps, flags["CHANNELS_LAST"])]


def supports(device: torch.device, amp: str) -> bool:
    """Whether AMP `amp` works on `device`."""
    try:
        check_amp(device, amp)
        return True
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """bench.py's command line; prints the timings, returns the exit code."""
    parser = build_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocations, kernel choice, "
                                                              "compilation)")
    parser.add_argument("--compare", action="store_true",
                        help="time every supported AMP / CHANNELS_LAST / COMPILE combination not fixed by a flag")
    parser.add_argument("--inference", type=int, metavar="N",
                        help="time test.py's prediction and writing on N images instead of training")
    parser.add_argument("--native-size", type=int, default=512, help="with --inference: the images' side in px")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.inference is not None and (args.inference < 1 or args.native_size < 1):
        parser.error("--inference and --native-size must be at least 1")
    config = config_from_args(parser, args)
    return run_interruptible(lambda: run_benchmark(args, config), "the timings stop here")


def run_benchmark(args: argparse.Namespace, config: Config) -> int:
    """Time what the parsed flags ask for and print it; the exit code."""
    if args.inference is not None:
        return bench_inference(config, args.inference, args.native_size)
    try:
        device, config = setup_runtime(config, check=not args.compare)  # --compare checks each combination
        data = load_data(config)
    except (checks.DatasetError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    indices = list(range(len(data.pairs)))
    train_loader, _ = make_loaders(data, indices, indices[:1], config, pin_memory=device.type == "cuda")

    stream = batches(train_loader)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(stream)
    data_seconds = (time.perf_counter() - start) / args.steps

    fixed = {key for key in SPEED_KEYS if hasattr(args, key)}
    runs = combinations(config, device, fixed) if args.compare else [config]
    if args.compare:
        print(f"{'AMP':5} {'channels_last':13} {'compile':12} {'train images/s':>14} {'vs first':>8}")
    results = []
    for run in runs:
        result = time_training(run, train_loader, device, args.steps, args.warmup)
        result["data_share_of_step"] = round(data_seconds / result.pop("step_seconds"), 4)
        results.append(result)
        if args.compare:  # row by row: a grid with compilation takes minutes
            print(table_row(result, results[0]["train_images_per_second"]), flush=True)
    report = {
        "device": str(device), "threads": torch.get_num_threads(), "image_size": config.IMAGE_SIZE,
        "in_channels": config.IN_CHANNELS, "base_channels": config.BASE_CHANNELS, "depth": config.DEPTH,
        "batch_size": config.BATCH_SIZE, "cache": config.CACHE, "num_workers": config.NUM_WORKERS,
        "parameters_millions": results[0]["parameters_millions"],
        "data_images_per_second": round(config.BATCH_SIZE / data_seconds, 1)}
    if args.compare:
        report["results"] = [{k: v for k, v in r.items() if k != "parameters_millions"} for r in results]
    else:
        report |= {k: v for k, v in results[0].items() if k != "parameters_millions"}
    print(json.dumps(report))
    return 0


def bench_inference(config: Config, count: int, native_size: int) -> int:
    """bench.py --inference: time test.py's prediction loop both ways and print the table and JSON line."""
    try:
        device, config = setup_runtime(config)
        results = time_inference(config, device, count, native_size)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    first = next(iter(results.values()))
    width = max(len(name) for name in results)
    print(f"{'network, writing':{width}} {'images/s':>8} {'vs first':>8}")
    for name, speed in results.items():
        print(f"{name:{width}} {speed:8.2f} {speed / first:7.2f}x")
    print(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "image_size": config.IMAGE_SIZE,
                      "native_size": native_size, "images": count, "images_per_second": results}))
    return 0


def table_row(result: dict, first: float) -> str:
    """One compared combination, with its speed relative to the first one timed (all off, unless fixed)."""
    compile_text = ("yes" if result["compiled"] else "fell back") if result["compile"] else "no"
    speed = result["train_images_per_second"]
    return (f"{result['amp']:5} {'yes' if result['channels_last'] else 'no':13} {compile_text:12} "
            f"{speed:14.2f} {speed / first:7.2f}x")


if __name__ == "__main__":
    sys.exit(main())

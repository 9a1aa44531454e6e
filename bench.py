"""Measure training speed and how long a step waits for data, with the same code train.py runs.

    python bench.py --data-root ../shared/data/figshare-brain-tumor --image-size 256 --base-channels 64

Times `--steps` training steps (after `--warmup` untimed ones) on batches
drawn from the real, augmented training loader, and separately the time the
loader alone takes to produce those batches. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import dataset
from config import build_parser, config_from_args
from losses import BCEDiceLoss
from model import count_parameters
from train import make_loaders, train_step
from utils import build_model, pick_device, set_seed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocations, kernel choice)")
    args = parser.parse_args(argv)
    config = config_from_args(parser, args)
    set_seed(config.SEED)
    device = pick_device(config.DEVICE)

    data = dataset.load_dataset(Path(config.DATA_ROOT), config.IMAGE_SIZE, config.IN_CHANNELS)
    indices = list(range(len(data.pairs)))
    train_loader, _ = make_loaders(data, indices, indices[:1], config)
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.LEARNING_RATE)
    loss_fn = BCEDiceLoss(config.BCE_WEIGHT, config.DICE_WEIGHT)

    def batches():
        while True:
            yield from train_loader

    stream = batches()
    model.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        images, masks = next(stream)
        train_step(model, images.to(device), masks.to(device), loss_fn, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_seconds = (time.perf_counter() - start) / args.steps

    start = time.perf_counter()
    for _ in range(args.steps):
        next(stream)
    data_seconds = (time.perf_counter() - start) / args.steps

    print(json.dumps({
        "device": str(device), "threads": torch.get_num_threads(), "image_size": config.IMAGE_SIZE,
        "in_channels": config.IN_CHANNELS, "base_channels": config.BASE_CHANNELS, "depth": config.DEPTH,
        "batch_size": config.BATCH_SIZE, "parameters_millions": round(count_parameters(model) / 1e6, 2),
        "train_images_per_second": round(config.BATCH_SIZE / step_seconds, 2),
        "data_images_per_second": round(config.BATCH_SIZE / data_seconds, 1),
        "data_share_of_step": round(data_seconds / step_seconds, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

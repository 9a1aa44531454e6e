"""Regenerate the README pictures from a real run.

    python assets/make_assets.py --data-root ../shared/data/figshare-brain-tumor \
        --run runs/<run name> --predictions predictions/<run name>

Writes assets/dataset_example.png (slices with their expert masks),
assets/curves.png (loss and Dice per epoch from history.csv) and
assets/overlays.png (predictions of the held-out patients over the image, ground truth
outlined, chosen at the 10th, 50th and 90th percentile of Dice and more).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ASSETS = Path(__file__).resolve().parent
CREDIT = "Data: J. Cheng, figshare brain tumour dataset (CC BY 4.0)"


def dataset_example(data_root: Path, out: Path) -> None:
    """One slice per tumour class beside its mask, from metadata.csv."""
    with open(data_root / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_class: dict[str, list[str]] = {}
    for row in rows:
        by_class.setdefault(row["tumor_class"], []).append(row["image_id"])
    picks = {name: ids[len(ids) // 2] for name, ids in by_class.items()}  # a slice from mid-class
    fig, axes = plt.subplots(2, len(picks), figsize=(3 * len(picks), 6.3), squeeze=False)
    for column, (tumour_class, stem) in enumerate(sorted(picks.items())):
        axes[0, column].imshow(Image.open(data_root / "images" / f"{stem}.png"), cmap="gray")
        axes[0, column].set_title(f"{tumour_class} (slice {stem})")
        axes[1, column].imshow(Image.open(data_root / "masks" / f"{stem}.png"), cmap="gray")
        axes[1, column].set_title("expert mask")
    for axis in axes.flat:
        axis.axis("off")
    fig.suptitle(CREDIT, fontsize=8, y=0.02)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def curves(run: Path, out: Path) -> None:
    """Training and validation loss and Dice per epoch, best epoch marked."""
    with open(run / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in history]
    column = lambda name: [float(r[name]) for r in history]  # noqa: E731
    best = json.loads((run / "summary.json").read_text())["best_epoch"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(epochs, column("train_loss"), label="train")
    left.plot(epochs, column("val_loss"), label="inner validation")
    left.set(title="BCE + Dice loss", xlabel="epoch")
    right.plot(epochs, column("train_dice"), label="train (augmented batches)")
    right.plot(epochs, column("val_dice"), label="inner validation, mean per image")
    right.plot(epochs, column("val_dice_pooled"), label="inner validation, pooled", linestyle="--")
    right.axvline(best, color="gray", linestyle=":", label=f"best epoch ({best})")
    right.set(title="Dice", xlabel="epoch", ylim=(0, 1))
    for axis in (left, right):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    fig.suptitle(f"run {run.name}; {CREDIT}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def overlays(predictions: Path, out: Path, count: int = 6) -> None:
    """Overlays at spread Dice percentiles, so the picture shows typical cases, not only the best."""
    with open(predictions / "metrics.csv", newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["dice"]))
    picks = [rows[int(q * (len(rows) - 1))] for q in np.linspace(0.1, 0.95, count)]
    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 3))
    for axis, row in zip(axes, picks, strict=True):
        axis.imshow(Image.open(predictions / "overlays" / f"{row['image']}.png"))
        axis.set_title(f"slice {row['image']}: Dice {float(row['dice']):.2f}", fontsize=9)
        axis.axis("off")
    fig.suptitle("red: prediction, green: expert outline (held-out patients, which chose nothing); " + CREDIT, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """make_assets.py's command line: draw the README pictures; the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True, help="the shared Figshare folder")
    parser.add_argument("--run", type=Path, required=True, help="a run folder written by train.py")
    parser.add_argument("--predictions", type=Path, required=True, help="test.py's output for that run")
    parser.add_argument("--out-dir", type=Path, default=ASSETS, help="where the pictures go")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    dataset_example(args.data_root, args.out_dir / "dataset_example.png")
    curves(args.run, args.out_dir / "curves.png")
    overlays(args.predictions, args.out_dir / "overlays.png")
    print(f"wrote dataset_example.png, curves.png, overlays.png to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

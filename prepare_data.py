"""Make datasets in the layout the pipeline reads: `images/`, `masks/`, `metadata.csv`.

    python prepare_data.py demo --out data/demo            # synthetic MRI-like slices, no download
    python prepare_data.py figshare --out data/figshare-brain-tumor   # the real set (Cheng et al.)
    python prepare_data.py figshare --from ~/Downloads/1512427.zip    # archives you already have
    python prepare_data.py nifti --images BraTS2021 --masks BraTS2021 --out data/brats-flair \
        --image-pattern '*_flair.nii.gz' --mask-pattern '*_seg.nii.gz'   # any image/label volume pairs

Every subcommand writes into `<out>.partial` beside `--out` and renames it at
the end, so an interrupted run never leaves an output that looks complete; on
an error, Ctrl-C or SIGTERM the `.partial` folder is removed again (exit code
1, 130, 143).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from tumorseg.sources.demo import DEMO_MIN_SIZE, make_demo_dataset
from tumorseg.sources.figshare import FIGSHARE_API_URL, FIGSHARE_ARTICLE_ID, prepare_figshare
from tumorseg.sources.nifti import NiftiOptions, convert_nifti, print_nifti_summary
from tumorseg.sources.output import PrepareError
from utils import interruption, sigterm_as_interrupt


def int_at_least(minimum: int, reason: str = "") -> Callable[[str], int]:
    """An argparse `type` accepting whole numbers >= `minimum`; `reason` explains the bound in the message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{reason}, got {value}")
        return value

    return parse


def label_list(text: str) -> tuple[int, ...]:
    """argparse type for --tumour-labels: comma-separated whole numbers above 0 (0 is background)."""
    try:
        labels = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected label values like 1,2,4, got {text!r}") from None
    if labels[0] < 1:
        raise argparse.ArgumentTypeError(f"labels must be above 0 (0 is background), got {text!r}")
    return labels


def non_negative_number(text: str) -> float:
    """argparse type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {text!r}")
    return value


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    """The `demo` subcommand's options."""
    demo = commands.add_parser("demo", help="write a synthetic MRI-like demo set (no download)")
    demo.add_argument("--out", type=Path, default=Path("data/demo"),
                      help="output folder (must not exist) (default: %(default)s)")
    demo.add_argument("--count", type=int_at_least(1), default=240, help="number of slices (default: %(default)s)")
    demo.add_argument("--size", type=int_at_least(DEMO_MIN_SIZE, " (smaller slices can have empty tumour masks)"),
                      default=128, help="slice height and width in pixels (default: %(default)s)")
    demo.add_argument("--seed", type=int_at_least(0), default=0,
                      help="random seed (same seed, same data) (default: %(default)s)")
    demo.add_argument("--slices-per-patient", type=int_at_least(1), default=6,
                      help="consecutive slices sharing one patient_id, for grouped splits (default: %(default)s)")


def add_figshare_parser(commands: argparse._SubParsersAction) -> None:
    """The `figshare` subcommand's options."""
    figshare = commands.add_parser(
        "figshare", help="download and convert the figshare brain tumour set of Cheng et al. (3064 slices)",
        description=f"Download figshare article {FIGSHARE_ARTICLE_ID} (or take --from) and convert it to "
                    "images/, masks/ and metadata.csv with patient IDs, tumour classes and folds.")
    figshare.add_argument("--out", type=Path, default=Path("data/figshare-brain-tumor"),
                          help="output folder (must not exist) (default: %(default)s)")
    figshare.add_argument("--from", dest="source", type=Path, metavar="PATH",
                          help="convert what you already have, without network: a folder, a .zip "
                               "(also figshare's 'Download all' zip) or a .mat (default: download)")
    figshare.add_argument("--size", type=int_at_least(1), help="resample every slice to SIZE x SIZE pixels "
                                                             "(area for images, nearest for masks) (default: keep)")
    figshare.add_argument("--cache-dir", type=Path,
                          help="where downloads are kept and resumed (default: .downloads beside --out)")
    figshare.add_argument("--api-url", default=FIGSHARE_API_URL,
                          help="figshare API base URL (default: %(default)s)")


def add_nifti_parser(commands: argparse._SubParsersAction) -> None:
    """The `nifti` subcommand's options."""
    nifti = commands.add_parser(
        "nifti", help="cut folders of image/label volumes (.nii/.nii.gz, e.g. BraTS) into 2-D slices",
        description="Pair image volumes with label volumes by case name and write one PNG pair per slice "
                    "with tumour (plus --empty-share tumour-free ones) and metadata.csv. The case name is the "
                    "file name without .nii/.nii.gz and without its pattern's fixed end (the text after the "
                    "pattern's last wildcard, less any .nii/.nii.gz): BraTS2021_00001_flair.nii.gz with "
                    "--image-pattern '*_flair.nii.gz' and BraTS2021_00001_seg.nii.gz with --mask-pattern "
                    "'*_seg.nii.gz' are "
                    "case BraTS2021_00001. Every volume is checked before anything is written.")
    nifti.add_argument("--images", type=Path, required=True, metavar="DIR",
                       help="folder of image volumes, searched at any depth")
    nifti.add_argument("--masks", type=Path, required=True, metavar="DIR",
                       help="folder of label volumes, searched at any depth (may be --images itself, with "
                            "patterns that tell the two apart)")
    nifti.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    nifti.add_argument("--image-pattern", default="*.nii*", metavar="GLOB",
                       help="image file names to take, e.g. '*_flair.nii.gz' for BraTS; a pattern with '/' is a "
                            "path glob under --images ('**/' for any depth) (default: %(default)s)")
    nifti.add_argument("--mask-pattern", default="*.nii*", metavar="GLOB",
                       help="label file names to take, e.g. '*_seg.nii.gz' for BraTS (default: %(default)s)")
    nifti.add_argument("--tumour-labels", type=label_list, metavar="L,L,...",
                       help="label values that count as tumour, e.g. 4 for BraTS enhancing tumour, 1,2,4 for "
                            "the whole tumour (default: every label above 0)")
    nifti.add_argument("--axis", choices=("auto", "0", "1", "2"), default="auto",
                       help="voxel axis to slice across; auto: the axis with the fewest voxels of each image "
                            "volume (default: %(default)s)")
    nifti.add_argument("--size", type=int_at_least(1), help="resample every slice to SIZE x SIZE pixels "
                                                          "(area for images, nearest for masks) (default: keep)")
    nifti.add_argument("--empty-share", type=non_negative_number, default=0.0, metavar="X",
                       help="also write tumour-free slices, X times as many as tumour slices (0.1: 10 %%), drawn "
                            "at random from each case's non-blank tumour-free slices (default: %(default)s)")
    nifti.add_argument("--seed", type=int_at_least(0), default=0,
                       help="random seed of the tumour-free slice draw (default: %(default)s)")
    nifti.add_argument("--ignore-affine", action="store_true",
                       help="pair voxels by index even where a label volume's affine differs from its image's "
                            "(default: refuse such a pair)")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface: one subcommand per data source; bad values exit 2 before anything is written."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(commands)
    add_figshare_parser(commands)
    add_nifti_parser(commands)
    # Further data sources add their subparsers here.
    return parser


def main(argv: list[str] | None = None) -> int:
    """prepare_data.py's command line; the exit code."""
    args = build_parser().parse_args(argv)
    with sigterm_as_interrupt():  # SIGTERM removes the .partial folder like Ctrl-C
        return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; the exit code (1 on an error, 130 on Ctrl-C, 143 on SIGTERM)."""
    try:
        if args.command == "demo":
            out = make_demo_dataset(args.out, count=args.count, size=args.size, seed=args.seed,
                                    slices_per_patient=args.slices_per_patient)
            print(f"wrote {args.count} demo slices to {out}")
        elif args.command == "figshare":
            count = prepare_figshare(args.out, args.source, args.size, args.cache_dir, args.api_url)
            print(f"wrote {count} slices to {args.out}")
        elif args.command == "nifti":
            options = NiftiOptions(args.image_pattern, args.mask_pattern, args.tumour_labels,
                                   None if args.axis == "auto" else int(args.axis), args.size, args.empty_share,
                                   args.seed, args.ignore_affine)
            summary = convert_nifti(args.images, args.masks, args.out, options)
            print_nifti_summary(summary, args.out, options)
    except (PrepareError, OSError) as error:  # OSError: a full disk or a folder we may not write to
        print(f"error: {error}", *getattr(error, "__notes__", ()), sep="\n", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (utils.Terminated)
        cause, code = interruption(interrupt)
        print(f"interrupted ({cause})", *getattr(interrupt, "__notes__", ()), sep="\n", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a trained checkpoint for use without this project: ONNX (onnxruntime, any language) or TorchScript.

    python export.py --checkpoint runs/x/best.pt --format onnx --out model.onnx
    python export.py --checkpoint runs/x/best.pt --format torchscript --out model.pt --check-data DATA
    python export.py --checkpoint runs/x/best.pt --format onnx --out model.onnx --opset 18 --overwrite

The exported network takes the batch predict.prepare_image makes: float32
(N, IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), any N; it gives the tumour
probability (the sigmoid is inside the graph), (N, 1, IMAGE_SIZE, IMAGE_SIZE),
named `probability`, and with a type head also the type probabilities
(softmax), (N, classes), named `type_probabilities`. Decoding, head crop,
resizing and normalisation stay outside the graph: FILE.json, written beside
FILE (and, for ONNX, into the file's metadata as "segmentation_pipeline"),
says how to do them and holds the decision rule.

Before anything is written the exported model is checked: it runs on up to 8
slices of --check-data (default: the checkpoint's DATA_ROOT where it has
images/, else random inputs) at batch sizes N and 1, and its probabilities
must be within 1e-4 of the PyTorch model's. FILE and FILE.json are written
under staging names and renamed into place together; an existing FILE or
FILE.json is replaced only with --overwrite. Exit code 0 when exported, 1 on
an error (nothing written), 130 on Ctrl-C and 143 on SIGTERM (nothing written).
"""


from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from config import Config
from tumorseg.data import reading
from tumorseg.evaluation import evaluate
from tumorseg.files import OutputError, publish_files, remove_stale_staging
from tumorseg.inference import predict
from tumorseg.inference.export_formats import (FORMATS, TOLERANCE, ExportError, ExportJob, ProbabilityNetwork,
                                               check_export, export_network, sidecar)
from tumorseg.runs.checkpoints import CheckpointError, load_checkpoint
from utils import interruption, sigterm_as_interrupt, tolerant_console

CHECK_IMAGES = 8  # slices the check runs, spread over the folder
SYNTHETIC_INPUTS = 3  # random inputs the check runs when there is no data folder


def main(argv: list[str] | None = None) -> int:
    """export.py's command line; the exit code."""
    with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C
        return export_and_publish(argv)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line's flags."""
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint to export, e.g. runs/x/best.pt")
    parser.add_argument("--format", required=True, metavar="|".join(FORMATS), help="file format to write")
    parser.add_argument("--out", type=Path, required=True, help="file to write; FILE.json is written beside it")
    parser.add_argument("--check-data", type=Path, metavar="DIR",
                        help="folder with images/ whose slices check the export (default: the checkpoint's "
                             "DATA_ROOT where it has images/, else random inputs)")
    parser.add_argument("--opset", type=int, metavar="N",
                        help="ONNX opset (default: the exporter's own); one the graph cannot be converted to is "
                             "refused, naming the lowest that works")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing FILE and FILE.json")
    return parser.parse_args(argv)


def export_and_publish(argv: list[str] | None) -> int:
    """Parse, check the inputs, export, check the export, publish; the exit code."""
    tolerant_console()
    args = parse_arguments(argv)
    try:
        job = prepare(args)
        announce(job)
        network = ProbabilityNetwork(job.loaded.model).eval().requires_grad_(False)  # inference only
        exported = export_network(network, job)
        check = check_export(exported, job)
        types = (f", type probabilities {check['type_max_abs_difference']:.2e}"
                 if "type_max_abs_difference" in check else "")
        print(f"check:      max |exported - PyTorch| probability {check['max_abs_difference']:.2e}{types} "
              f"(tolerance {TOLERANCE:g}) on {check['data']}, batch sizes {check['batch_sizes']}")
        text = json.dumps(sidecar(job, exported, check), indent=2) + "\n"
        publish_export({job.out: exported.file_bytes(text), job.sidecar: text}, job.overwrite)
    except (CheckpointError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ExportError, OutputError) as error:
        print(f"error: {error}\nnothing was written", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM (utils.Terminated)
        cause, code = interruption(error)
        print(f"\ninterrupted ({cause}): nothing was written", file=sys.stderr)
        return code
    print(f"written:    {job.out}\n            {job.sidecar}")
    return 0


def prepare(args: argparse.Namespace) -> ExportJob:
    """Check the flags and the output folder, load the checkpoint and the check's inputs; raises on bad input."""
    if args.format not in FORMATS:
        raise ValueError(f"unknown --format {args.format!r}; choose one of: {', '.join(FORMATS)}")
    if args.opset is not None and args.format != "onnx":
        raise ValueError("--opset applies to --format onnx only")
    out = args.out
    sidecar_path = out.with_name(out.name + ".json")
    check_output(out, sidecar_path, args.overwrite)
    loaded = load_checkpoint(args.checkpoint, "cpu")
    loaded.model.float().eval()
    try:
        rule, rule_source = evaluate.decision_rule(loaded, argparse.Namespace(postprocess="checkpoint"))
    except ValueError as error:
        raise CheckpointError(f"{args.checkpoint}: its decision rule is not valid ({error})") from error
    inputs, source = check_inputs(args.check_data, loaded.config)
    return ExportJob(args.checkpoint, loaded, args.format, args.opset, out, sidecar_path, args.overwrite, rule,
               rule_source, inputs, source)


def check_output(out: Path, sidecar_path: Path, overwrite: bool) -> None:
    """Raise ValueError unless `out` and `sidecar_path` can be written: folder there and writable, no clobbering."""
    folder = out.parent
    if not folder.is_dir():
        raise ValueError(f"{out}: the output folder {folder} "
                         f"{'is not a folder' if folder.exists() else 'does not exist'}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: the output folder {folder} is not writable")
    for path in (out, sidecar_path):
        if path.is_dir():
            raise ValueError(f"{path}: is a folder; --out must name a file")
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise ValueError(f"{path}: already exists; pass --overwrite to replace it")


def check_inputs(folder: Path | None, config: Config) -> tuple[torch.Tensor, str]:
    """Up to CHECK_IMAGES slices of `folder` (default: DATA_ROOT) as the model's input, or random ones; and whence.

    An explicit folder must hold readable 2-D images, not only volumes
    (FileNotFoundError, ValueError otherwise); the checkpoint's DATA_ROOT is used only where it
    has images/, else SYNTHETIC_INPUTS random normal inputs stand in.
    """
    if folder is None:
        data_root = Path(config.DATA_ROOT)
        if not (data_root / "images").is_dir():
            generator = torch.Generator().manual_seed(0)
            inputs = torch.randn(SYNTHETIC_INPUTS, config.IN_CHANNELS, config.IMAGE_SIZE, config.IMAGE_SIZE,
                                 generator=generator)
            return inputs, (f"{SYNTHETIC_INPUTS} random inputs (synthetic: no --check-data, and the checkpoint's "
                            f"DATA_ROOT {data_root} has no images/)")
        folder = data_root
    if not (folder / "images").is_dir():
        raise FileNotFoundError(f"{folder}: has no images/ folder for the check")
    images, _ = predict.find_images(folder)
    if not images:  # find_images accepts a folder of volumes, which the check does not cut into slices
        raise ValueError(f"{folder / 'images'}: holds no 2-D {'/'.join(reading.IMAGE_EXTENSIONS)} images for the "
                         f"check (only NIfTI/DICOM volumes); give --check-data a folder of slices, such as "
                         "prepare_data.py nifti writes")
    chosen = images[::max(1, len(images) // CHECK_IMAGES)][:CHECK_IMAGES]
    prepared = []
    for path in chosen:
        try:
            image = reading.read_image(path, config.IN_CHANNELS)
        except Exception as error:  # any decoder error: name the file, use the others
            print(f"warning: {path}: skipped by the check, {error}", file=sys.stderr)
            continue
        prepared.append(predict.prepare_image(image, config)[0])
    if not prepared:
        raise ValueError(f"{folder / 'images'}: none of the {len(chosen)} images tried could be read for the check")
    return torch.stack(prepared), f"{len(prepared)} slices of {folder}"


def announce(job: ExportJob) -> None:
    """Say what is about to be exported, with the checkpoint's load warnings."""
    for warning in job.loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    trained = job.loaded.config
    classes = job.loaded.model.type_classes
    print(f"checkpoint: {job.checkpoint} (epoch {job.loaded.state.get('epoch')}, {trained.MODEL} trained at "
          f"{trained.IMAGE_SIZE} px{', head crop' if trained.CROP else ''}, {trained.IN_CHANNELS} channel(s), "
          f"{trained.NORMALIZATION}{', type head: ' + ', '.join(classes) if classes else ''})")
    print(f"format:     {job.form} -> {job.out}")
    if job.form == "torchscript":
        print(f"note: torch {torch.__version__} deprecates TorchScript (torch.jit); prefer --format onnx where "
              "the consumer can read it")


def publish_export(files: dict[Path, bytes | str], overwrite: bool) -> None:
    """Write FILE and FILE.json under staging names and publish them together (tumorseg.files.publish_files).

    An existing file is replaced only with `overwrite`, one made meanwhile by
    another process never; on any failure, Ctrl-C included, the earlier files
    are put back and no new or staging file is left. Raises OutputError naming the file.
    """
    for stale in remove_stale_staging(next(iter(files)).parent):
        print(f"removed {stale}, left by a writer that was stopped")
    publish_files(files, overwrite)


if __name__ == "__main__":
    sys.exit(main())

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
import io
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

import dataset
from tumorseg.evaluation import evaluate
from tumorseg.inference import predict
from config import Config
from model import UNet, model_arguments
from tumorseg.inference.postprocess import DecisionRule
from tumorseg.files import OutputError, publish_files, remove_stale_staging
from tumorseg.runs.checkpoints import CheckpointError, LoadedCheckpoint, load_checkpoint
from utils import interruption, sigterm_as_interrupt, tolerant_console

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # largest |exported - PyTorch| probability the check accepts
CHECK_IMAGES = 8  # slices the check runs, spread over the folder
SYNTHETIC_INPUTS = 3  # random inputs the check runs when there is no data folder
EXAMPLE_BATCH = 2  # batch traced or exported; not 1, which torch.export would fix as the only size
INPUT_NAME = "image"
PROBABILITY_OUTPUT = "probability"
TYPE_OUTPUT = "type_probabilities"
CONVERTER_LOG = "onnxscript.version_converter"  # where the exporter says it could not reach the asked opset
METADATA_KEY = "segmentation_pipeline"  # ONNX metadata_props key; TorchScript extra file METADATA_KEY + ".json"


class ExportError(Exception):
    """The network could not be exported, or the exported one does not compute what PyTorch does."""


@dataclass
class Job:
    """Everything settled before exporting: the checkpoint, the output files and the check's inputs."""

    checkpoint: Path
    loaded: LoadedCheckpoint
    form: str  # one of FORMATS
    opset: int | None
    out: Path
    sidecar: Path  # out + ".json"
    overwrite: bool
    rule: DecisionRule  # the one test.py applies by default
    rule_source: str
    check_inputs: torch.Tensor  # (N, C, S, S) float32, prepared as predict.prepare_image prepares
    check_source: str  # where check_inputs came from, in words


@dataclass
class Exported:
    """An exported network held in memory: how to run it, and its file's bytes with the sidecar JSON inside."""

    run: Callable[[torch.Tensor], list[np.ndarray]]  # batch -> the outputs, in output order
    file_bytes: Callable[[str], bytes]  # sidecar JSON text -> the file to write
    opset: int | None  # ONNX opset of the graph; None for TorchScript


class ProbabilityNetwork(nn.Module):
    """A U-Net with its sigmoid (and its TypeHead's softmax) inside: what the exported graph computes."""

    def __init__(self, network: UNet):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tumour probability (N, 1, S, S); with a TypeHead also the type probabilities (N, classes)."""
        if not self.network.type_classes:
            return torch.sigmoid(self.network(image))
        logits, type_logits = self.network(image, return_type=True)
        return torch.sigmoid(logits), torch.softmax(type_logits, dim=1)


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


def prepare(args: argparse.Namespace) -> Job:
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
    return Job(args.checkpoint, loaded, args.format, args.opset, out, sidecar_path, args.overwrite, rule,
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
        raise ValueError(f"{folder / 'images'}: holds no 2-D {'/'.join(dataset.IMAGE_EXTENSIONS)} images for the "
                         f"check (only NIfTI/DICOM volumes); give --check-data a folder of slices, such as "
                         "prepare_data.py nifti writes")
    chosen = images[::max(1, len(images) // CHECK_IMAGES)][:CHECK_IMAGES]
    prepared = []
    for path in chosen:
        try:
            image = dataset.read_image(path, config.IN_CHANNELS)
        except Exception as error:  # any decoder error: name the file, use the others
            print(f"warning: {path}: skipped by the check, {error}", file=sys.stderr)
            continue
        prepared.append(predict.prepare_image(image, config)[0])
    if not prepared:
        raise ValueError(f"{folder / 'images'}: none of the {len(chosen)} images tried could be read for the check")
    return torch.stack(prepared), f"{len(prepared)} slices of {folder}"


def announce(job: Job) -> None:
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


def output_names(model: UNet) -> list[str]:
    """The exported graph's outputs, in order: the probability, and the type probabilities with a TypeHead."""
    return [PROBABILITY_OUTPUT, TYPE_OUTPUT] if model.type_classes else [PROBABILITY_OUTPUT]


def export_network(network: ProbabilityNetwork, job: Job) -> Exported:
    """`network` exported in the job's format, in memory; raises ExportError when the exporter fails."""
    config = job.loaded.config
    example = torch.zeros(EXAMPLE_BATCH, config.IN_CHANNELS, config.IMAGE_SIZE, config.IMAGE_SIZE)
    try:
        with torch.no_grad():
            return export_onnx(network, example, job.opset) if job.form == "onnx" else \
                export_torchscript(network, example)
    except ExportError as error:  # said in full already; only the checkpoint is added
        raise ExportError(f"{job.checkpoint}: {error}") from error
    except Exception as error:  # the exporters raise many kinds; any of them means "cannot export"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"{job.checkpoint}: cannot be exported as {job.form} ({reason})") from error


def export_onnx(network: ProbabilityNetwork, example: torch.Tensor, opset: int | None) -> Exported:
    """ONNX export through torch.export (the dynamo exporter), with a dynamic batch axis."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it lists every optional torchvision operator it cannot register
    try:
        with captured_log(CONVERTER_LOG) as log:
            program = torch.onnx.export(network, (example,), input_names=[INPUT_NAME],
                                        output_names=output_names(network.network), opset_version=opset,
                                        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
                                        dynamo=True, verbose=False)
    finally:
        exporter_log.setLevel(level)
    model = program.model_proto
    version = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    if opset is not None and version != opset:  # never write another opset than the one asked for
        raise ExportError(opset_refusal(opset, version, log))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> list[np.ndarray]:
        """The outputs of onnxruntime for one batch."""
        return session.run(None, {INPUT_NAME: batch.numpy()})

    def file_bytes(text: str) -> bytes:
        """The model with the sidecar JSON in its metadata_props."""
        onnx.helper.set_model_props(model, {METADATA_KEY: text})
        return model.SerializeToString()

    return Exported(run, file_bytes, version)


@contextmanager
def captured_log(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records of logger `name` inside the block, kept from the console.

    The exporter converts its graph to a requested opset by a pass that, when
    it cannot, logs a library traceback and keeps the graph as it was; the
    caller reads the records to say why instead.
    """
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def opset_refusal(opset: int, version: int, records: list[logging.LogRecord]) -> str:
    """Why the asked `opset` cannot be written, the exporter having made `version`, and which opset to ask for.

    The converter steps one opset at a time, so one that fails below
    `version` fails for every lower opset too: `version` is the lowest that works.
    """
    reason = next((str(record.exc_info[1]).strip().splitlines()[-1].split(": ")[-1].replace("$", "")
                   for record in records if record.exc_info and record.exc_info[1] is not None), "")
    because = f" ({reason})" if reason else ""
    works = f"the lowest opset that works is {version}" if opset < version else f"opset {version} works"
    return (f"--opset {opset} is not available for this network: the exporter makes opset {version} and could "
            f"not convert it to {opset}{because}; {works}: pass --opset {version} or leave --opset out")


def export_torchscript(network: ProbabilityNetwork, example: torch.Tensor) -> Exported:
    """TorchScript by tracing; the conv net's graph holds no batch size, so any batch runs."""
    with warnings.catch_warnings():
        # The shape tests of padding and attention gates are traced as constants: right, the input size is fixed.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates torch.jit: said once, in `announce`
        traced = torch.jit.trace(network, example, check_trace=False)

    def file_bytes(text: str) -> bytes:
        """The saved module, with the sidecar JSON as an extra file."""
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(traced, buffer, _extra_files={f"{METADATA_KEY}.json": text} if text else None)
        return buffer.getvalue()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        reloaded = torch.jit.load(io.BytesIO(file_bytes("")), map_location="cpu")

    def run(batch: torch.Tensor) -> list[np.ndarray]:
        """The outputs of the saved and reloaded module for one batch."""
        with torch.no_grad():
            outputs = reloaded(batch)
        return [output.numpy() for output in (outputs if isinstance(outputs, tuple) else (outputs,))]

    return Exported(run, file_bytes, None)


def check_export(exported: Exported, job: Job) -> dict[str, Any]:
    """Compare the exported network with the PyTorch model on the check's inputs; raises ExportError past TOLERANCE.

    Batch sizes N and 1 (neither is the exported example's), against the
    pipeline's own sigmoid (predict.probabilities) in float32, and the
    TypeHead's softmax where there is one.
    """
    model, config = job.loaded.model, job.loaded.config
    inputs = job.check_inputs
    with torch.no_grad():
        expected = [predict.probabilities(model, inputs, tta=False)]
        if model.type_classes:
            expected.append(torch.softmax(model(inputs, return_type=True)[1].float(), dim=1))
    names = output_names(model)
    differences = {name: 0.0 for name in names}
    batch_sizes = sorted({len(inputs), 1}, reverse=True)
    for size in batch_sizes:
        try:
            outputs = exported.run(inputs[:size].contiguous())
        except Exception as error:  # onnxruntime and torch.jit raise many kinds
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ExportError(f"{job.out}: the exported model fails on a batch of {size} ({reason})") from error
        for name, output, reference in zip(names, outputs, expected, strict=True):
            wanted = tuple(reference[:size].shape)
            if output.shape != wanted:
                raise ExportError(f"{job.out}: the exported {name} has shape {output.shape} for a batch of {size}, "
                                  f"PyTorch's {wanted}")
            differences[name] = max(differences[name], float(np.abs(output - reference[:size].numpy()).max()))
    check = {"data": job.check_source, "images": len(inputs), "batch_sizes": batch_sizes,
             "max_abs_difference": differences[PROBABILITY_OUTPUT], "tolerance": TOLERANCE}
    if model.type_classes:
        check["type_max_abs_difference"] = differences[TYPE_OUTPUT]
    failed = [f"{name} differs by up to {value:.3g}" for name, value in differences.items()
              if not value <= TOLERANCE]  # `not <=` also fails NaN
    if failed:
        raise ExportError(f"{job.out}: the exported model does not match PyTorch on {job.check_source}: "
                          f"{'; '.join(failed)} (tolerance {TOLERANCE:g})")
    return {**check, "passed": True}


def preprocessing(config: Config) -> dict[str, Any]:
    """How a slice becomes the exported network's input, as values and in words (what predict.prepare_image does)."""
    decode = ("decode to 8-bit grey (PIL convert('L'))" if config.IN_CHANNELS == 1
              else "decode to 8-bit RGB (PIL convert('RGB'); grey replicated to 3 channels)")
    crop = (f"crop to the head's bounding box, widened by CROP_MARGIN = {config.CROP_MARGIN:g} of its side on each "
            "side and made square (dataset.head_box: pixels above "
            f"{dataset.HEAD_THRESHOLD_FRACTION:g} x the 99th percentile of a block-sum thumbnail about "
            f"{dataset.HEAD_THUMBNAIL_SIDE} px wide, largest blob); the exported graph does NOT crop"
            if config.CROP else "no crop (CROP false): the whole slice")
    if config.NORMALIZATION == "zscore":
        normalization = {"method": "zscore", "min_std": dataset.ZSCORE_MIN_STD,
                         "formula": "x = pixel / 255; (x - mean(x)) / max(std(x), min_std), mean and population "
                                    "std over the image, per channel"}
    else:
        mean, std = dataset.imagenet_statistics(config.IN_CHANNELS)
        normalization = {"method": "imagenet", "mean": mean.tolist(), "std": std.tolist(),
                         "formula": "x = pixel / 255; (x - mean[c]) / std[c] per channel c"}
    size = config.IMAGE_SIZE
    return {"IMAGE_SIZE": size, "IN_CHANNELS": config.IN_CHANNELS, "NORMALIZATION": config.NORMALIZATION,
            "CROP": config.CROP, "CROP_MARGIN": config.CROP_MARGIN, "normalization": normalization,
            "steps": [f"{decode}; 16-bit images scaled from their own min..max to 0..255", crop,
                      f"resize to {size} x {size}, bilinear (PIL Image.resize, BILINEAR, antialiased when shrinking)",
                      normalization["formula"],
                      f"float32, channels first: (N, {config.IN_CHANNELS}, {size}, {size})"]}


def sidecar(job: Job, exported: Exported, check: dict[str, Any]) -> dict[str, Any]:
    """FILE.json: the input and outputs, the preprocessing, the decision rule, where the model came from, the check."""
    config, model = job.loaded.config, job.loaded.model
    size, batch = config.IMAGE_SIZE, "batch"
    outputs = [{"name": PROBABILITY_OUTPUT, "shape": [batch, 1, size, size], "dtype": "float32",
                "meaning": "tumour probability per pixel (sigmoid applied)"}]
    if model.type_classes:
        outputs.append({"name": TYPE_OUTPUT, "shape": [batch, len(model.type_classes)], "dtype": "float32",
                        "meaning": "probability of each of type_classes, in that order (softmax applied)"})
    info: dict[str, Any] = {"format": job.form, "file": job.out.name}
    if exported.opset is not None:
        info["onnx_opset"] = exported.opset
    return {**info,
            "input": {"name": INPUT_NAME, "shape": [batch, config.IN_CHANNELS, size, size], "dtype": "float32"},
            "outputs": outputs, "type_classes": list(model.type_classes),
            "preprocessing": preprocessing(config),
            "decision_rule": job.rule.to_dict(), "decision_rule_text": job.rule.describe(),
            "decision_rule_source": job.rule_source,
            "postprocessing": ("test.py resizes the probability map bilinearly back to the slice's size (into the "
                               "crop box, 0 outside it, with CROP), then applies decision_rule: tumour where "
                               "probability > threshold, then fill holes, drop 8-connected components under "
                               "min_component_pixels (native pixels), keep the largest, each where set"),
            "checkpoint": str(job.checkpoint), "epoch": job.loaded.state.get("epoch"),
            "model": job.loaded.state.get("model_args") or model_arguments(config),
            "torch_version": torch.__version__, "check": check}


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

"""The export formats: a network as ONNX or TorchScript in memory, its check against PyTorch, and FILE.json.

export.py settles an ExportJob (checkpoint, output files, the check's
inputs); `export_network` exports the network with its sigmoid inside
(ProbabilityNetwork), `check_export` runs it against the PyTorch model, and
`sidecar` gives the JSON written beside the file and carried inside it.
"""

from __future__ import annotations

import io
import logging
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

from config import Config
from model import UNet
from model import model_arguments
from tumorseg.data import preprocess
from tumorseg.inference import predict
from tumorseg.inference.postprocess import DecisionRule
from tumorseg.runs.checkpoints import LoadedCheckpoint

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # largest |exported - PyTorch| probability the check accepts
EXAMPLE_BATCH = 2  # batch traced or exported; not 1, which torch.export would fix as the only size
INPUT_NAME = "image"
PROBABILITY_OUTPUT = "probability"
TYPE_OUTPUT = "type_probabilities"
CONVERTER_LOG = "onnxscript.version_converter"  # where the exporter says it could not reach the asked opset
METADATA_KEY = "segmentation_pipeline"  # ONNX metadata_props key; TorchScript extra file METADATA_KEY + ".json"


class ExportError(Exception):
    """The network could not be exported, or the exported one does not compute what PyTorch does."""


@dataclass
class ExportJob:
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


def output_names(model: UNet) -> list[str]:
    """The exported graph's outputs, in order: the probability, and the type probabilities with a TypeHead."""
    return [PROBABILITY_OUTPUT, TYPE_OUTPUT] if model.type_classes else [PROBABILITY_OUTPUT]


def export_network(network: ProbabilityNetwork, job: ExportJob) -> Exported:
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


def check_export(exported: Exported, job: ExportJob) -> dict[str, Any]:
    """Compare the exported network with the PyTorch model on the check's inputs; raises ExportError past TOLERANCE.

    Batch sizes N and 1 (neither is the exported example's), against the
    pipeline's own sigmoid (predict.probabilities) in float32, and the
    TypeHead's softmax where there is one.
    """
    model = job.loaded.model
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
            # np.max, not max(): max(0.0, nan) keeps 0.0 and a NaN output would pass the check
            differences[name] = float(np.max([differences[name], np.abs(output - reference[:size].numpy()).max()]))
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
            "side and made square (tumorseg.data.preprocess.head_box: pixels above "
            f"{preprocess.HEAD_THRESHOLD_FRACTION:g} x the 99th percentile of a block-sum thumbnail about "
            f"{preprocess.HEAD_THUMBNAIL_SIDE} px wide, largest blob); the exported graph does NOT crop"
            if config.CROP else "no crop (CROP false): the whole slice")
    if config.NORMALIZATION == "zscore":
        normalization = {"method": "zscore", "min_std": preprocess.ZSCORE_MIN_STD,
                         "formula": "x = pixel / 255; (x - mean(x)) / max(std(x), min_std), mean and population "
                                    "std over the image, per channel"}
    else:
        mean, std = preprocess.imagenet_statistics(config.IN_CHANNELS)
        normalization = {"method": "imagenet", "mean": mean.tolist(), "std": std.tolist(),
                         "formula": "x = pixel / 255; (x - mean[c]) / std[c] per channel c"}
    size = config.IMAGE_SIZE
    return {"IMAGE_SIZE": size, "IN_CHANNELS": config.IN_CHANNELS, "NORMALIZATION": config.NORMALIZATION,
            "CROP": config.CROP, "CROP_MARGIN": config.CROP_MARGIN, "normalization": normalization,
            "steps": [f"{decode}; 16-bit images scaled from their own min..max to 0..255", crop,
                      f"resize to {size} x {size}, bilinear (PIL Image.resize, BILINEAR, antialiased when shrinking)",
                      normalization["formula"],
                      f"float32, channels first: (N, {config.IN_CHANNELS}, {size}, {size})"]}


def sidecar(job: ExportJob, exported: Exported, check: dict[str, Any]) -> dict[str, Any]:
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

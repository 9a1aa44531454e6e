"""export_formats.py: a tiny network exported in memory as ONNX and TorchScript, its check, opset refusal, FILE.json."""

from __future__ import annotations

import io
import json
import logging
import re
import sys

import numpy as np
import onnx
import pytest
import torch

from config import Config
from model import build_model
from tumorseg.inference.export_formats import (METADATA_KEY, TOLERANCE, Exported, ExportError, ExportJob,
                                               ProbabilityNetwork, captured_log, check_export, export_network,
                                               opset_refusal, output_names, preprocessing, sidecar)
from tumorseg.inference.postprocess import DecisionRule
from tumorseg.runs.checkpoints import LoadedCheckpoint

# Loading the TorchScript bytes back is the point of some tests; torch deprecates torch.jit and says so each time.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
CLASSES = ("glioma", "meningioma", "pituitary")


def tiny_job(tmp_path, form: str, type_classes: tuple[str, ...] = ()) -> ExportJob:
    """An untrained 32 px network as export.py settles it, with 3 random check inputs."""
    config = Config(IMAGE_SIZE=32, BASE_CHANNELS=4, DEPTH=2, IN_CHANNELS=1, NORMALIZATION="zscore")
    torch.manual_seed(0)
    model = build_model(config, type_classes).float().eval()
    loaded = LoadedCheckpoint(model, config, {"epoch": 3}, [])
    out = tmp_path / ("model.onnx" if form == "onnx" else "model.pt")
    inputs = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    return ExportJob(tmp_path / "best.pt", loaded, form, None, out, out.with_name(out.name + ".json"), False,
                     DecisionRule(threshold=0.4), "checkpoint", inputs, "3 random inputs")


def exported_network(job: ExportJob) -> Exported:
    """The job's network exported in its format, as export.py exports it."""
    return export_network(ProbabilityNetwork(job.loaded.model).eval().requires_grad_(False), job)


@pytest.mark.parametrize("form", ["onnx", "torchscript"])
def test_export_matches_pytorch_at_batch_n_and_1_and_runs_any_batch(tmp_path, form):
    job = tiny_job(tmp_path, form)
    exported = exported_network(job)
    check = check_export(exported, job)
    assert check["passed"] and check["batch_sizes"] == [3, 1] and check["images"] == 3
    assert check["max_abs_difference"] <= TOLERANCE and check["data"] == "3 random inputs"
    (probability,) = exported.run(job.check_inputs[:2].contiguous())
    assert probability.shape == (2, 1, 32, 32) and 0 <= probability.min() and probability.max() <= 1
    assert (exported.opset is not None) == (form == "onnx")
    assert not list(tmp_path.iterdir())  # in memory: nothing written


@pytest.mark.parametrize("form", ["onnx", "torchscript"])
def test_the_file_carries_the_sidecar_json(tmp_path, form):
    exported = exported_network(tiny_job(tmp_path, form))
    text = json.dumps({"format": form}) + "\n"
    data = exported.file_bytes(text)
    if form == "onnx":
        assert {p.key: p.value for p in onnx.load_from_string(data).metadata_props}[METADATA_KEY] == text
    else:
        extra = {f"{METADATA_KEY}.json": ""}
        torch.jit.load(io.BytesIO(data), _extra_files=extra)
        assert json.loads(extra[f"{METADATA_KEY}.json"]) == {"format": form}


def test_a_type_head_is_a_second_output_and_checked_too(tmp_path):
    job = tiny_job(tmp_path, "torchscript", CLASSES)
    assert output_names(job.loaded.model) == ["probability", "type_probabilities"]
    exported = exported_network(job)
    check = check_export(exported, job)
    assert check["type_max_abs_difference"] <= TOLERANCE
    probability, types = exported.run(job.check_inputs)
    assert probability.shape == (3, 1, 32, 32) and types.shape == (3, len(CLASSES))
    assert np.allclose(types.sum(axis=1), 1, atol=1e-5)  # the softmax is inside


def test_check_export_refuses_an_export_that_differs_fails_or_has_the_wrong_shape(tmp_path):
    job = tiny_job(tmp_path, "torchscript")
    reference = exported_network(job)

    def shifted(batch):
        return [output + 3e-3 for output in reference.run(batch)]

    def failing(batch):
        raise RuntimeError("no kernel\nsecond line")

    def flat(batch):
        return [np.zeros((len(batch), 32 * 32), np.float32)]

    for run, said in [(shifted, "does not match PyTorch"), (failing, "fails on a batch of 3 (no kernel)"),
                      (flat, "has shape (3, 1024) for a batch of 3")]:
        with pytest.raises(ExportError, match=re.escape(said)) as raised:
            check_export(Exported(run, reference.file_bytes, None), job)
        assert str(raised.value).startswith(f"{job.out}: ")


def test_a_nan_output_fails_the_check(tmp_path):
    job = tiny_job(tmp_path, "torchscript")
    reference = exported_network(job)
    nan = Exported(lambda batch: [output * np.nan for output in reference.run(batch)], reference.file_bytes, None)
    with pytest.raises(ExportError, match="probability differs by up to nan"):
        check_export(nan, job)


def test_opset_refusal_names_the_lowest_opset_that_works_and_the_converters_reason():
    try:
        raise ValueError("convert: Pad $mode$ needs opset 18")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    refusal = opset_refusal(17, 18, [record])
    assert refusal.startswith("--opset 17 is not available for this network: the exporter makes opset 18")
    assert "(Pad mode needs opset 18)" in refusal and "the lowest opset that works is 18" in refusal
    assert "opset 18 works: pass --opset 18" in opset_refusal(21, 18, []) and "()" not in opset_refusal(21, 18, [])


def test_captured_log_keeps_records_from_the_console_and_restores_the_logger(capsys):
    logger = logging.getLogger("tests.export_formats.captured")
    handlers, propagate = list(logger.handlers), logger.propagate
    with captured_log(logger.name) as records:
        logger.error("cannot convert")
    assert [record.getMessage() for record in records] == ["cannot convert"]
    assert logger.handlers == handlers and logger.propagate == propagate
    assert "cannot convert" not in capsys.readouterr().err


@pytest.mark.parametrize("form", ["onnx", "torchscript"])
def test_sidecar_names_the_input_outputs_rule_and_check(tmp_path, form):
    job = tiny_job(tmp_path, form)
    exported = exported_network(job)
    info = sidecar(job, exported, {"passed": True})
    assert info["format"] == form and info["file"] == job.out.name and ("onnx_opset" in info) == (form == "onnx")
    assert info["input"] == {"name": "image", "shape": ["batch", 1, 32, 32], "dtype": "float32"}
    assert [o["name"] for o in info["outputs"]] == ["probability"] and info["type_classes"] == []
    assert info["decision_rule"]["threshold"] == 0.4 and info["decision_rule_source"] == "checkpoint"
    assert info["epoch"] == 3 and info["check"] == {"passed": True} and info["preprocessing"]["IMAGE_SIZE"] == 32
    json.dumps(info)  # all of it JSON


def test_preprocessing_says_the_normalisation_and_whether_the_graph_crops():
    plain = preprocessing(Config(IMAGE_SIZE=32, IN_CHANNELS=1, NORMALIZATION="zscore", CROP=False))
    assert plain["normalization"]["method"] == "zscore" and "min_std" in plain["normalization"]
    assert plain["steps"][1].startswith("no crop") and plain["steps"][-1] == "float32, channels first: (N, 1, 32, 32)"
    cropped = preprocessing(Config(IMAGE_SIZE=32, IN_CHANNELS=3, NORMALIZATION="imagenet", CROP=True))
    assert len(cropped["normalization"]["mean"]) == 3 and "does NOT crop" in cropped["steps"][1]

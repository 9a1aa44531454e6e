"""export.py: ONNX and TorchScript files that match PyTorch on real slices, their JSON, refusals, clean failures."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from PIL import Image

from config import Config
from conftest import ROOT, load_script
from model import build_model, model_arguments
from tumorseg import files
from tumorseg.data import preprocess, reading
from tumorseg.inference import predict
from tumorseg.runs.checkpoints import load_checkpoint, save_checkpoints

export = load_script(ROOT / "export.py")
# Loading the TorchScript files back is the point of these tests; torch deprecates torch.jit and says so each time.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

RULE = {"threshold": 0.4, "keep_largest": True, "min_component_pixels": 16, "fill_holes": True}
CLASSES = ("glioma", "meningioma", "pituitary")
SLICES = ("1", "100", "1000")  # real 256 px slices, the three run as one batch of 3


def tiny_checkpoint(path, data_root, type_classes=(), **overrides):
    """An untrained 64 px network with non-trivial batch-norm statistics, saved as train.py saves checkpoints."""
    settings = {"IMAGE_SIZE": 64, "BASE_CHANNELS": 4, "DEPTH": 2, "IN_CHANNELS": 1, "NORMALIZATION": "zscore",
                "DATA_ROOT": str(data_root), "TYPE_COLUMN": "tumor_class" if type_classes else ""}
    config = Config(**{**settings, **overrides})
    torch.manual_seed(0)
    model = build_model(config, type_classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.set_output_prior(0.05)
    save_checkpoints([path], {"model": model.state_dict(), "config": config.to_dict(),
                              "model_args": model_arguments(config, type_classes), "epoch": 1,
                              "decision_rule": RULE})
    return path


def run_export(*args) -> int:
    return export.main([str(arg) for arg in args])


def real_batch(real_root, config) -> torch.Tensor:
    """SLICES of the real data prepared as the pipeline prepares them: (3, C, S, S)."""
    return torch.stack([predict.prepare_image(reading.read_image(real_root / "images" / f"{stem}.png",
                                                                   config.IN_CHANNELS), config)[0]
                        for stem in SLICES])


def run_file(path, form, batch: torch.Tensor) -> list[np.ndarray]:
    """The exported file's outputs for one batch, through onnxruntime or torch.jit.load."""
    if form == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": batch.numpy()})
    outputs = torch.jit.load(str(path))(batch)
    return [output.numpy() for output in (outputs if isinstance(outputs, tuple) else (outputs,))]


def embedded_json(path, form) -> dict:
    """The JSON the exported file carries: ONNX metadata_props or a TorchScript extra file."""
    if form == "onnx":
        return json.loads({p.key: p.value for p in onnx.load(str(path)).metadata_props}["segmentation_pipeline"])
    extra = {"segmentation_pipeline.json": ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra["segmentation_pipeline.json"])


@pytest.fixture(scope="module")
def plain(real_root, tmp_path_factory):
    """A tiny checkpoint without a type head, exported as ONNX and as TorchScript, checked on real slices."""
    folder = tmp_path_factory.mktemp("export")
    checkpoint = tiny_checkpoint(folder / "best.pt", real_root)
    outputs = {"onnx": folder / "model.onnx", "torchscript": folder / "model.pt"}
    for form, out in outputs.items():
        assert run_export("--checkpoint", checkpoint, "--format", form, "--out", out,
                          "--check-data", real_root) == 0
    return checkpoint, outputs


@pytest.mark.parametrize("form", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_real_slices_at_batch_1_and_3(plain, real_root, form):
    checkpoint, files = plain
    loaded = load_checkpoint(checkpoint)
    batch = real_batch(real_root, loaded.config)
    expected = predict.probabilities(loaded.model.eval(), batch, tta=False).numpy()
    assert 0.01 < expected.min() and expected.max() < 0.99  # a map worth comparing, not saturated
    for size in (1, 3):
        (probability,) = run_file(files[form], form, batch[:size])
        assert probability.shape == (size, 1, 64, 64) and probability.dtype == np.float32
        assert np.abs(probability - expected[:size]).max() <= 1e-4
    info = json.loads(files[form].with_name(files[form].name + ".json").read_text())
    assert info["check"]["passed"] and info["check"]["max_abs_difference"] <= 1e-4
    assert info["check"]["images"] == 8 and info["check"]["batch_sizes"] == [8, 1]
    assert str(real_root) in info["check"]["data"]
    assert embedded_json(files[form], form) == info
    assert not [p.name for p in files[form].parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_onnx_graph_has_named_input_and_output_with_a_dynamic_batch(plain):
    graph = onnx.load(str(plain[1]["onnx"])).graph
    assert [i.name for i in graph.input] == ["image"] and [o.name for o in graph.output] == ["probability"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 64, 64]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("form", ["onnx", "torchscript"])
def test_sidecar_holds_the_checkpoints_preprocessing_and_decision_rule(plain, real_root, form):
    checkpoint, files = plain
    info = json.loads(files[form].with_name(files[form].name + ".json").read_text())
    loaded = load_checkpoint(checkpoint)
    config = loaded.config
    pre = info["preprocessing"]
    assert {key: pre[key] for key in ("IMAGE_SIZE", "IN_CHANNELS", "NORMALIZATION", "CROP", "CROP_MARGIN")} == \
        {"IMAGE_SIZE": config.IMAGE_SIZE, "IN_CHANNELS": config.IN_CHANNELS, "NORMALIZATION": config.NORMALIZATION,
         "CROP": config.CROP, "CROP_MARGIN": config.CROP_MARGIN}
    assert loaded.state["decision_rule"] == RULE  # as written into the checkpoint
    assert info["decision_rule"] == {**RULE, "keep_most_probable": False}  # every field of the rule, defaults too
    assert info["format"] == form and info["file"] == files[form].name
    assert info["input"] == {"name": "image", "shape": ["batch", 1, 64, 64], "dtype": "float32"}
    assert [o["name"] for o in info["outputs"]] == ["probability"] and info["type_classes"] == []
    assert info["checkpoint"] == str(checkpoint) and info["epoch"] == 1
    assert info["torch_version"] == torch.__version__ and ("onnx_opset" in info) == (form == "onnx")
    # The recorded normalisation, applied by hand, is the pipeline's.
    image = preprocess.resize_image(reading.read_image(real_root / "images" / "100.png", 1), 64)
    x = image[..., 0].astype(np.float32) / 255
    by_hand = (x - x.mean()) / max(x.std(), pre["normalization"]["min_std"])
    assert np.abs(by_hand - preprocess.normalize(image, "zscore")[0]).max() < 1e-5


def test_sidecar_records_imagenet_statistics_and_crop(real_root, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "rgb.pt", real_root, IN_CHANNELS=3, NORMALIZATION="imagenet",
                                 CROP=True, CROP_MARGIN=0.1)
    assert run_export("--checkpoint", checkpoint, "--format", "torchscript", "--out", tmp_path / "m.pt",
                      "--check-data", real_root) == 0
    pre = json.loads((tmp_path / "m.pt.json").read_text())["preprocessing"]
    assert pre["NORMALIZATION"] == "imagenet" and pre["CROP"] is True and pre["CROP_MARGIN"] == 0.1
    assert pre["normalization"]["mean"] == pytest.approx(preprocess.IMAGENET_MEAN.tolist())
    assert pre["normalization"]["std"] == pytest.approx(preprocess.IMAGENET_STD.tolist())
    assert any("does NOT crop" in step for step in pre["steps"])


@pytest.mark.parametrize("form", ["onnx", "torchscript"])
def test_type_head_is_exported_as_a_second_output(real_root, tmp_path, form):
    checkpoint = tiny_checkpoint(tmp_path / "typed.pt", real_root, type_classes=CLASSES)
    out = tmp_path / f"typed.{form}"
    assert run_export("--checkpoint", checkpoint, "--format", form, "--out", out, "--check-data", real_root) == 0
    loaded = load_checkpoint(checkpoint)
    batch = real_batch(real_root, loaded.config)
    with torch.no_grad():
        logits, type_logits = loaded.model.eval()(batch, return_type=True)
    for size in (1, 3):
        probability, types = run_file(out, form, batch[:size])
        assert types.shape == (size, len(CLASSES))
        assert np.abs(types - torch.softmax(type_logits[:size], dim=1).numpy()).max() <= 1e-4
        assert np.abs(probability - torch.sigmoid(logits[:size]).numpy()).max() <= 1e-4
    info = json.loads((tmp_path / f"typed.{form}.json").read_text())
    assert [o["name"] for o in info["outputs"]] == ["probability", "type_probabilities"]
    assert info["type_classes"] == list(CLASSES) and info["check"]["type_max_abs_difference"] <= 1e-4
    if form == "onnx":
        assert [o.name for o in onnx.load(str(out)).graph.output] == ["probability", "type_probabilities"]


@pytest.mark.parametrize("form", ["onnx", "torchscript"])
def test_a_deep_supervision_checkpoint_exports_the_plain_networks_single_output(real_root, tmp_path, form):
    checkpoint = tiny_checkpoint(tmp_path / "deep.pt", real_root, DEEP_SUPERVISION=1)
    out = tmp_path / f"deep.{form}"
    assert run_export("--checkpoint", checkpoint, "--format", form, "--out", out, "--check-data", real_root) == 0
    loaded = load_checkpoint(checkpoint)  # loads with the flag on: the heads are rebuilt and their weights loaded
    assert loaded.state["model_args"]["deep_supervision"] == 1 and len(loaded.model.deep_heads) == 1
    # The same network without heads, given every other weight of the checkpoint: what a plain run exports.
    plain = build_model(dataclasses.replace(loaded.config, DEEP_SUPERVISION=0))
    plain.load_state_dict({k: v for k, v in loaded.state["model"].items() if not k.startswith("deep_heads.")})
    batch = real_batch(real_root, loaded.config)
    expected = predict.probabilities(loaded.model.eval(), batch, tta=False).numpy()
    assert np.array_equal(expected, predict.probabilities(plain.eval(), batch, tta=False).numpy())
    for size in (1, 3):
        outputs = run_file(out, form, batch[:size])
        assert len(outputs) == 1 and outputs[0].shape == (size, 1, 64, 64)  # no head's output in the graph
        assert np.abs(outputs[0] - expected[:size]).max() <= 1e-4
    info = json.loads((tmp_path / f"deep.{form}.json").read_text())
    assert [o["name"] for o in info["outputs"]] == ["probability"] and info["check"]["passed"]
    assert info["model"]["deep_supervision"] == 1
    if form == "onnx":
        assert [o.name for o in onnx.load(str(out)).graph.output] == ["probability"]


def test_without_data_the_check_runs_on_random_inputs_and_says_so(real_root, tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "best.pt", tmp_path / "no-such-data")
    assert run_export("--checkpoint", checkpoint, "--format", "torchscript", "--out", tmp_path / "m.pt") == 0
    assert "random inputs (synthetic" in capsys.readouterr().out
    check = json.loads((tmp_path / "m.pt.json").read_text())["check"]
    assert "synthetic" in check["data"] and check["images"] == 3 and check["batch_sizes"] == [3, 1]


@pytest.fixture
def checkpoint_in(real_root, tmp_path):
    """A tiny checkpoint in tmp_path/run and an empty output folder tmp_path/out."""
    (tmp_path / "run").mkdir()
    (tmp_path / "out").mkdir()
    return tiny_checkpoint(tmp_path / "run" / "best.pt", real_root)


@pytest.mark.parametrize("case", ["missing", "not_a_checkpoint", "unknown_format", "no_folder", "opset_for_jit"])
def test_bad_input_is_refused_by_name_and_writes_nothing(checkpoint_in, tmp_path, capsys, case):
    out = tmp_path / "out" / "model.onnx"
    args = {"checkpoint": checkpoint_in, "format": "onnx", "out": out}
    if case == "missing":
        args["checkpoint"] = tmp_path / "run" / "nope.pt"
    elif case == "not_a_checkpoint":
        args["checkpoint"] = tmp_path / "run" / "notes.txt"
        args["checkpoint"].write_text("not a checkpoint")
    elif case == "unknown_format":
        args["format"] = "tflite"
    elif case == "no_folder":
        args["out"] = tmp_path / "out" / "missing" / "model.onnx"
    extra = ["--opset", "17"] if case == "opset_for_jit" else []
    if case == "opset_for_jit":
        args["format"] = "torchscript"
    assert run_export(*[item for key, value in args.items() for item in (f"--{key}", value)], *extra) == 1
    err = capsys.readouterr().err
    named = {"missing": args["checkpoint"], "not_a_checkpoint": args["checkpoint"], "unknown_format": "tflite",
             "no_folder": args["out"], "opset_for_jit": "--opset"}[case]
    assert err.startswith("error: ") and str(named) in err and "Traceback" not in err
    assert list((tmp_path / "out").iterdir()) == []


def test_an_opset_the_exporter_cannot_reach_is_refused_naming_the_lowest_that_works(checkpoint_in, tmp_path,
                                                                                     capsys):
    out = tmp_path / "out" / "model.onnx"
    args = ["--checkpoint", checkpoint_in, "--format", "onnx", "--out", out]
    assert run_export(*args, "--opset", "17") == 1  # the exporter makes 18 and cannot take Pad down to 17
    captured = capsys.readouterr()
    assert "written" not in captured.out and "Traceback" not in captured.err
    assert "--opset 17 is not available" in captured.err and "the lowest opset that works is 18" in captured.err
    assert str(checkpoint_in) in captured.err and "nothing was written" in captured.err
    assert list((tmp_path / "out").iterdir()) == []
    assert run_export(*args, "--opset", "18") == 0
    assert [entry.version for entry in onnx.load(str(out)).opset_import if entry.domain in ("", "ai.onnx")] == [18]


def test_check_data_with_volumes_only_is_refused_saying_it_holds_no_2d_images(checkpoint_in, tmp_path, capsys):
    import nibabel as nib
    volumes_only = tmp_path / "volumes"
    (volumes_only / "images").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 3), np.float32), np.eye(4)), str(volumes_only / "images" / "v.nii.gz"))
    assert run_export("--checkpoint", checkpoint_in, "--format", "torchscript", "--out", tmp_path / "out" / "m.pt",
                      "--check-data", volumes_only) == 1
    err = capsys.readouterr().err
    assert f"error: {volumes_only / 'images'}: holds no 2-D .png/.jpg/.jpeg images for the check" in err
    assert "0 images" not in err and list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("existing", ["model.pt", "model.pt.json"])
def test_existing_output_is_kept_without_overwrite_and_replaced_with_it(checkpoint_in, tmp_path, capsys, existing):
    out = tmp_path / "out" / "model.pt"
    (tmp_path / "out" / existing).write_bytes(b"earlier")
    assert run_export("--checkpoint", checkpoint_in, "--format", "torchscript", "--out", out) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out' / existing}: already exists" in err and "--overwrite" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == [existing]
    assert (tmp_path / "out" / existing).read_bytes() == b"earlier"
    assert run_export("--checkpoint", checkpoint_in, "--format", "torchscript", "--out", out, "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.pt", "model.pt.json"]
    assert json.loads((tmp_path / "out" / "model.pt.json").read_text())["check"]["passed"]


def test_a_failing_check_leaves_nothing_behind(checkpoint_in, tmp_path, capsys, monkeypatch):
    pipeline = predict.probabilities
    monkeypatch.setattr(predict, "probabilities", lambda model, x, tta: pipeline(model, x, tta) + 3e-3)
    out = tmp_path / "out" / "model.pt"
    assert run_export("--checkpoint", checkpoint_in, "--format", "torchscript", "--out", out) == 1
    err = capsys.readouterr().err
    assert "does not match PyTorch" in err and str(out) in err
    measured = float(re.search(r"probability differs by up to ([0-9.e-]+)", err).group(1))
    assert measured == pytest.approx(3e-3, rel=0.05)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_interruption_while_publishing_undoes_it(checkpoint_in, tmp_path, capsys, monkeypatch, overwrite):
    out = tmp_path / "out" / "model.pt"
    if overwrite:
        out.write_bytes(b"old model")
        (tmp_path / "out" / "model.pt.json").write_text("old json")
    sidecar, stopped = tmp_path / "out" / "model.pt.json", []

    def stop_at_the_sidecar(rename):
        def renaming(source, target, *args, **kwargs):
            if Path(target) == sidecar and not stopped:  # the model is in place (the old one out), the JSON not
                stopped.append(source)
                raise KeyboardInterrupt
            return rename(source, target, *args, **kwargs)
        return renaming

    for name in ("replace", "rename", "link"):  # every way the publisher renames a file in
        monkeypatch.setattr(os, name, stop_at_the_sidecar(getattr(os, name)))
    monkeypatch.setattr(files, "renameat2", stop_at_the_sidecar(files.renameat2))
    args = ["--checkpoint", checkpoint_in, "--format", "torchscript", "--out", out]
    assert run_export(*args, *(["--overwrite"] if overwrite else [])) == 130
    monkeypatch.undo()
    assert stopped
    assert "interrupted (Ctrl-C): nothing was written" in capsys.readouterr().err
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    if overwrite:
        assert left == ["model.pt", "model.pt.json"]
        assert out.read_bytes() == b"old model" and (tmp_path / "out" / "model.pt.json").read_text() == "old json"
    else:
        assert left == []


@pytest.mark.parametrize("appearing", ["model.pt", "model.pt.json"])
def test_a_file_made_at_out_after_the_check_is_never_overwritten(checkpoint_in, tmp_path, capsys, monkeypatch,
                                                                 appearing):
    out = tmp_path / "out" / "model.pt"
    real_renameat2 = files.renameat2

    def another_process_writes(source, target, flags):  # after every check, right before the rename
        if Path(target) == tmp_path / "out" / appearing and not os.path.lexists(target):
            Path(target).write_bytes(b"theirs")
        return real_renameat2(source, target, flags)

    monkeypatch.setattr(files, "renameat2", another_process_writes)
    assert run_export("--checkpoint", checkpoint_in, "--format", "torchscript", "--out", out) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out' / appearing}: already exists" in err and "nothing was written" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == [appearing]  # ours taken back, no staging left
    assert (tmp_path / "out" / appearing).read_bytes() == b"theirs"


@pytest.mark.parametrize("signal_name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_a_file_is_written_leaves_no_staging_file(checkpoint_in, tmp_path, capsys, monkeypatch,
                                                                 signal_name, code):
    import os
    import signal
    real_fsync, sent = os.fsync, []

    def signalled_fsync(descriptor):
        if not sent:  # the model's bytes are in its staging file, not yet renamed: a real signal to this process
            sent.append(signal_name)
            os.kill(os.getpid(), getattr(signal, signal_name))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", signalled_fsync)
    out = tmp_path / "out" / "model.pt"
    assert run_export("--checkpoint", checkpoint_in, "--format", "torchscript", "--out", out) == code
    monkeypatch.undo()
    assert sent and "nothing was written" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []  # hidden staging files included


def test_readme_example_runs_without_torch_and_matches_the_pipeline(plain, real_root, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Export: export.py", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "import torch" not in code and "from torch" not in code  # numpy, Pillow and onnxruntime only
    (tmp_path / "predict_onnx.py").write_text(code)
    checkpoint, files = plain
    image = real_root / "images" / "1000.png"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["predict_onnx.py", str(files["onnx"]), str(image)])
    namespace = runpy.run_path(str(tmp_path / "predict_onnx.py"), run_name="__main__")
    loaded = load_checkpoint(checkpoint)
    prepared = predict.prepare_image(reading.read_image(image, 1), loaded.config)[0]
    expected = predict.probabilities(loaded.model.eval(), prepared[None], tta=False)[0, 0].numpy()
    assert np.abs(namespace["probability"] - expected).max() <= 1e-4
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}
    assert (mask > 0).sum() == 16 * (expected > RULE["threshold"]).sum()  # 64 px map, each pixel 4 x 4 native

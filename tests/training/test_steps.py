"""Tests of tumorseg/training/steps.py: one step, one epoch, evaluation."""

import numpy as np
import pytest
import torch

from config import Config
from tumorseg.data import augmentation, checks, preprocess, reading
from tumorseg.training import steps


def test_an_epoch_without_a_step_raises_instead_of_reporting_nan():
    from torch.utils.data import DataLoader, TensorDataset

    from losses import BCEDiceLoss
    from model import build_model
    model = build_model(Config(IMAGE_SIZE=32, BASE_CHANNELS=4, DEPTH=2, IN_CHANNELS=1))
    one_image = TensorDataset(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32))
    loader = DataLoader(one_image, batch_size=4, drop_last=True)  # gives no batch
    with pytest.raises(RuntimeError, match="no optimiser step was made"):
        steps.train_one_epoch(model, loader, BCEDiceLoss(reduction="none"), torch.optim.Adam(model.parameters()),
                              None, torch.device("cpu"), 0.5, "epoch 1/1 train")


def test_validation_keeps_only_the_preview_probabilities(demo_root):
    from torch.utils.data import DataLoader

    import dataset
    from losses import BCEDiceLoss
    from model import build_model
    data = dataset.load_dataset(demo_root, 32, 1)
    loader = DataLoader(dataset.SegmentationDataset(data.images, data.masks, "zscore"), batch_size=5)
    model = build_model(Config(IN_CHANNELS=1, BASE_CHANNELS=4, DEPTH=2, IMAGE_SIZE=32))
    metrics, kept = steps.evaluate(model, loader, BCEDiceLoss(), "cpu", 0.5, "val", keep=3)
    assert kept.shape == (3, 1, 32, 32) and 0 <= metrics["dice"] <= 1
    assert steps.evaluate(model, loader, BCEDiceLoss(), "cpu", 0.5, "val", keep=0)[1].numel() == 0


@pytest.mark.parametrize("amp, channels_last", [("bf16", False), ("off", True), ("bf16", True), ("fp16", False)])
def test_a_mixed_precision_or_channels_last_step_lowers_the_loss(demo_root, amp, channels_last):
    import dataset
    from losses import BCEDiceLoss
    from utils import check_amp, set_seed
    from model import build_model
    device = torch.device("cpu")
    try:
        check_amp(device, amp)
    except ValueError as error:  # a PyTorch without this precision on a CPU must say so plainly
        assert "not supported on cpu" in str(error) and "--amp" in str(error)
        pytest.skip(f"check_amp refuses {amp} here: {error}")
    set_seed(0)
    data = dataset.load_dataset(demo_root, 32, 1)
    images = torch.from_numpy(np.stack([preprocess.normalize(i, "zscore") for i in data.images[:8]]))
    masks = torch.from_numpy(data.masks[:8, None].astype(np.float32))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(Config(IN_CHANNELS=1, BASE_CHANNELS=4, DEPTH=2, IMAGE_SIZE=32)).to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp == "fp16" else None
    images = images.to(memory_format=memory_format)
    losses = [steps.train_step(model, images, masks, BCEDiceLoss(), optimizer, amp=amp, scaler=scaler)[0].item()
              for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters())  # AMP computes in low precision, keeps fp32


def test_a_type_head_step_lowers_the_summed_loss_and_the_dataset_carries_the_label(demo_root):
    import dataset
    from losses import BCEDiceLoss
    from model import UNet
    data = dataset.load_dataset(demo_root, 32, 1)
    classes, types = checks.type_labels(demo_root, "tumor_class", data.pairs)
    augment = augmentation.training_augmentation(0, flips=True, affine=True, intensity=True, elastic=True)
    samples = dataset.SegmentationDataset(data.images, data.masks, "zscore", augment, range(16), types)
    image, mask, label = samples[5]
    assert image.shape == (1, 32, 32) and mask.shape == (1, 32, 32) and label.dtype == torch.long
    assert classes[int(label)] == dict(reading.read_metadata(demo_root)[1])["demo_0005"]["tumor_class"]
    assert len(dataset.SegmentationDataset(data.images, data.masks, "zscore", indices=range(4))[0]) == 2  # unchanged
    torch.manual_seed(0)
    model = UNet(1, 4, 2, type_classes=classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = BCEDiceLoss(reduction="none", type_weight=1.0)
    images, masks, labels = (torch.stack(column) for column in zip(*(samples[i] for i in range(16)), strict=True))
    losses = [steps.train_step(model, images, masks, loss_fn, optimizer, types=labels)[0].mean().item()
              for _ in range(25)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_deep_supervision_step_lowers_the_summed_loss_of_every_level(demo_root):
    import dataset
    from losses import BCEDiceLoss
    from model import UNet
    data = dataset.load_dataset(demo_root, 32, 1)
    samples = dataset.SegmentationDataset(data.images, data.masks, "zscore", indices=range(16))
    images, masks = (torch.stack(column) for column in zip(*(samples[i] for i in range(16)), strict=True))
    torch.manual_seed(0)
    model = UNet(1, 4, 3, deep_supervision=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = BCEDiceLoss(reduction="none")
    with torch.no_grad():
        first_levels = model.train()(images)
    losses, logits = steps.train_step(model, images, masks, loss_fn, optimizer)
    assert torch.allclose(losses, loss_fn(first_levels, masks))  # the step's loss took all 3 levels
    assert logits.shape == (16, 1, 32, 32)  # and it returns the full-resolution logits for the Dice
    for _ in range(20):
        losses = steps.train_step(model, images, masks, loss_fn, optimizer)[0]
    assert losses.mean().item() < 0.8 * loss_fn(first_levels, masks).mean().item()

import pytest
import torch
import torch.nn.functional as F

from losses import BCEDiceLoss, soft_dice_loss


def test_dice_loss_is_zero_for_confident_correct_predictions():
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:5, 2:5] = 1
    logits = (target * 2 - 1) * 30  # saturated sigmoid
    assert soft_dice_loss(logits, target).item() < 1e-6
    assert BCEDiceLoss()(logits, target).item() < 1e-6


def test_empty_mask_is_well_defined_and_penalises_false_positives():
    empty = torch.zeros(1, 1, 8, 8)
    good = BCEDiceLoss()(torch.full_like(empty, -30.0), empty)
    bad = BCEDiceLoss()(torch.full_like(empty, 30.0), empty)
    assert torch.isfinite(good) and torch.isfinite(bad)
    assert good.item() < 1e-6 and bad.item() > 1.0


def test_full_mask_and_gradients_are_finite_for_extreme_logits():
    full = torch.ones(1, 1, 8, 8)
    logits = torch.full_like(full, -100.0, requires_grad=True)
    loss = BCEDiceLoss()(logits, full)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() > 50  # BCE-with-logits stays linear in the logit instead of saturating


def test_weights_select_the_terms():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1
    logits = torch.randn(1, 1, 4, 4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert torch.isclose(BCEDiceLoss(1.0, 0.0)(logits, target), bce)
    assert torch.isclose(BCEDiceLoss(0.0, 2.0)(logits, target), 2 * soft_dice_loss(logits, target))


def test_dice_is_averaged_per_image():
    # Image 0: perfect; image 1: empty prediction on a tumour -> (1 - 1/5) with smooth=1 and 4 pixels.
    target = torch.zeros(2, 1, 4, 4)
    target[:, :, :2, :2] = 1
    logits = torch.full((2, 1, 4, 4), -60.0)
    logits[0, :, :2, :2] = 60.0
    expected = (0.0 + (1 - 1 / 5)) / 2
    assert abs(soft_dice_loss(logits, target).item() - expected) < 1e-6


def test_reduction_none_gives_each_images_loss_and_its_mean_is_the_batch_loss():
    torch.manual_seed(0)
    target = (torch.rand(3, 1, 8, 8) > 0.7).float()
    logits = torch.randn(3, 1, 8, 8)
    per_image = BCEDiceLoss(reduction="none")(logits, target)
    assert per_image.shape == (3,)
    assert torch.isclose(per_image.mean(), BCEDiceLoss()(logits, target))
    for i in range(3):  # each value is the loss of that image alone
        assert torch.isclose(per_image[i], BCEDiceLoss()(logits[i:i + 1], target[i:i + 1]))


def test_an_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction"):
        BCEDiceLoss(reduction="sum")


def test_type_term_adds_weighted_cross_entropy_per_image_and_is_absent_without_type_logits():
    torch.manual_seed(0)
    logits, masks = torch.randn(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.5).float()
    type_logits, types = torch.randn(3, 4), torch.tensor([0, 3, 1])
    plain = BCEDiceLoss(reduction="none")
    typed = BCEDiceLoss(reduction="none", type_weight=0.25)
    assert torch.equal(typed(logits, masks), plain(logits, masks))  # no type logits: BCE + Dice exactly
    expected = plain(logits, masks) + 0.25 * F.cross_entropy(type_logits, types, reduction="none")
    assert torch.allclose(typed(logits, masks, type_logits, types), expected)
    assert torch.allclose(BCEDiceLoss(type_weight=0.25)(logits, masks, type_logits, types), expected.mean())

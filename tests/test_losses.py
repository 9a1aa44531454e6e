import pytest
import torch
import torch.nn.functional as F

from losses import BCEDiceLoss, deep_supervision_weights, downsample_mask, soft_dice_loss


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


def test_recall_weight_one_half_is_soft_dice_exactly():
    torch.manual_seed(0)
    logits, target = torch.randn(3, 1, 8, 8), (torch.rand(3, 1, 8, 8) > 0.6).float()
    assert torch.equal(soft_dice_loss(logits, target, recall_weight=0.5), soft_dice_loss(logits, target))
    assert torch.equal(BCEDiceLoss(recall_weight=0.5)(logits, target), BCEDiceLoss()(logits, target))


def test_recall_weight_is_the_tversky_index_and_charges_misses_more_than_false_alarms():
    torch.manual_seed(1)
    logits, target = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.6).float()
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    tp, fp, fn = (p * t).sum(1), (p * (1 - t)).sum(1), ((1 - p) * t).sum(1)
    expected = 1 - (2 * tp + 1) / (2 * tp + 2 * 0.3 * fp + 2 * 0.7 * fn + 1)  # smooth 1, b = 0.7
    assert torch.allclose(soft_dice_loss(logits, target, reduction="none", recall_weight=0.7), expected)
    # A 4-pixel tumour: missing half of it costs more than the same number of false-alarm pixels.
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    miss = torch.full_like(mask, -60.0)
    miss[..., 0, :2] = 60.0  # 2 of 4 tumour pixels found
    false_alarm = torch.where(mask > 0, 60.0, -60.0)
    false_alarm[..., 3, :2] = 60.0  # all 4 found, plus 2 background pixels
    for b, misses_cost_more in ((0.7, True), (0.3, False)):
        assert (soft_dice_loss(miss, mask, recall_weight=b) > soft_dice_loss(false_alarm, mask, recall_weight=b)) \
            == misses_cost_more


@pytest.mark.parametrize("weight", [0.0, 1.0, -0.2])
def test_recall_weight_outside_zero_one_is_refused(weight):
    with pytest.raises(ValueError, match="recall_weight"):
        BCEDiceLoss(recall_weight=weight)
    with pytest.raises(ValueError, match="recall_weight"):
        soft_dice_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), recall_weight=weight)


# ----------------------------------------------------------------------------- deep supervision


def test_deep_supervision_weights_halve_per_level_and_sum_to_one():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(2) == pytest.approx([2 / 3, 1 / 3])
    assert deep_supervision_weights(4) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])


def test_deep_supervision_loss_is_the_weighted_sum_of_each_levels_loss_against_the_max_pooled_mask():
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 16, 16)
    target[0, :, 3:9, 4:10] = 1
    target[1, :, 13, 2] = 1  # a one-pixel tumour: nearest-neighbour pooling could drop it, max-pooling keeps it
    levels = [torch.randn(2, 1, 16 // 2**k, 16 // 2**k) for k in range(3)]
    type_logits, types = torch.randn(2, 3), torch.tensor([2, 0])
    loss_fn = BCEDiceLoss(0.7, 1.3, reduction="none", type_weight=0.25, recall_weight=0.6)
    plain = BCEDiceLoss(0.7, 1.3, reduction="none", recall_weight=0.6)
    # By hand: weights 1, 1/2, 1/4 over their sum 7/4; masks max-pooled by blocks of 2**k; the type term once.
    expected = sum(w / 1.75 * plain(level, F.max_pool2d(target, 2**k))
                   for k, (w, level) in enumerate(zip([1, 0.5, 0.25], levels, strict=True)))
    expected = expected + 0.25 * F.cross_entropy(type_logits, types, reduction="none")
    assert torch.allclose(loss_fn(levels, target, type_logits, types), expected)
    assert torch.allclose(BCEDiceLoss(0.7, 1.3, type_weight=0.25, recall_weight=0.6)(levels, target, type_logits,
                                                                                      types), expected.mean())
    assert downsample_mask(target, (4, 4))[1, 0, 3, 0] == 1  # the one-pixel tumour, still there at 1/4
    # One level, as a tensor or a list of one: exactly the loss without deep supervision.
    assert torch.equal(plain([levels[0]], target), plain(levels[0], target))


def test_masks_of_sides_not_divisible_by_the_factor_pool_to_the_heads_ceil_sized_outputs():
    target = torch.zeros(1, 1, 37, 50)
    target[..., 36, 49] = 1  # the last pixel: in the last, partial block
    pooled = downsample_mask(target, (10, 13))  # ceil(37 / 4), ceil(50 / 4), as UNet's heads give
    assert pooled.shape == (1, 1, 10, 13) and pooled[..., 9, 12] == 1 and pooled.sum() == 1
    assert downsample_mask(target, (37, 50)) is target


def test_a_perfect_prediction_is_the_minimal_loss_and_smooth_zero_gives_an_empty_mask_no_credit():
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:5, 2:5] = 1  # the second image has no tumour
    perfect = (target * 2 - 1) * 30
    wrong = -perfect
    per_image = BCEDiceLoss(reduction="none")
    assert soft_dice_loss(perfect, target, reduction="none").max() < 1e-6 and per_image(perfect, target).max() < 1e-6
    assert soft_dice_loss(wrong, target, reduction="none").min() > 0.9 and per_image(wrong, target).min() > 0.9
    empty = torch.zeros(1, 1, 8, 8)
    assert soft_dice_loss(torch.full_like(empty, -30.0), empty, smooth=0.0).item() == 1.0
    assert torch.isnan(soft_dice_loss(torch.full_like(empty, float("nan")), empty))
    assert downsample_mask(empty, (8, 8)) is empty and not downsample_mask(empty, (2, 2)).any()
    assert deep_supervision_weights(0) == []

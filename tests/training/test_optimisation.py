import torch

from config import Config
from tumorseg.training import optimisation


def test_build_optimisation_builds_the_configured_loss():
    """DICE_RECALL_WEIGHT and TYPE_WEIGHT reach the loss that training steps on."""
    from model import build_unet
    config = Config(BASE_CHANNELS=4, DEPTH=2, DICE_RECALL_WEIGHT=0.7, TYPE_WEIGHT=0.3, EPOCHS=2,
                    LR_SCHEDULE="cosine")
    built = optimisation.build_optimisation(build_unet("unet", 1, 4, 2), config, torch.device("cpu"), steps_per_epoch=5)
    assert built.loss_fn.recall_weight == 0.7 and built.loss_fn.type_weight == 0.3
    assert built.scheduler.T_max == 10  # the schedule spans the whole run

"""Score networks: Equinox modules called on one example, `model(t, x) -> score`."""

from ._base import AbstractScoreModel as AbstractScoreModel
from ._base import GaussianFourierFeatures as GaussianFourierFeatures
from ._ddpmpp import DDPMpp as DDPMpp
from ._mlp import MLP as MLP
from ._unet import UNet as UNet

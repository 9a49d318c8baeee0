"""Score networks: Equinox modules called on one example, `model(t, x) -> score`."""

from ._base import AbstractScoreModel as AbstractScoreModel
from ._base import GaussianFourierFeatures as GaussianFourierFeatures
from ._ddpmpp import DDPMpp as DDPMpp
from ._ddpmpp import NCSNpp as NCSNpp
from ._mlp import MLP as MLP
from ._score_sde import ScoreSDEModel as ScoreSDEModel
from ._unet import UNet as UNet

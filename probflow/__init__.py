"""probflow: score-based generative modelling through SDEs, solved with diffrax."""

from ._mixture import GaussianMixture as GaussianMixture
from ._mixture import MixtureClassifier as MixtureClassifier
from ._mixture import MixtureScore as MixtureScore
from ._nfe import AbstractCountedSolver as AbstractCountedSolver
from ._nfe import count_evaluations as count_evaluations
from ._ode import AugmentedProbabilityFlowODE as AugmentedProbabilityFlowODE
from ._ode import ODEOptions as ODEOptions
from ._ode import ProbabilityFlowODE as ProbabilityFlowODE
from ._ode import bits_per_dim as bits_per_dim
from ._ode import decode as decode
from ._ode import encode as encode
from ._ode import log_likelihood as log_likelihood
from ._ode import sample_ode as sample_ode
from ._results import BitsPerDimResult as BitsPerDimResult
from ._results import DecodeResult as DecodeResult
from ._results import EncodeResult as EncodeResult
from ._results import LikelihoodResult as LikelihoodResult
from ._results import SampleResult as SampleResult
from ._sde import AbstractSDE as AbstractSDE
from ._sde import SubVPSDE as SubVPSDE
from ._sde import VESDE as VESDE
from ._sde import VPSDE as VPSDE

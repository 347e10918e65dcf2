"""sbnn_addons: Spiking Bayesian Neural Networks for snnTorch and SpikingJelly.

The core (this namespace) is framework-free: IW-ST spike functions, variational layers
with the local reparameterisation, variance propagation, the SBNN objective and the
evaluation modes. Host-library adapters live in :mod:`sbnn_addons.snntorch` and
:mod:`sbnn_addons.spikingjelly` and are imported only when used.
"""

from . import _inductor_fixes, kernels
from .base import check_finite
from .calibration import SpikeStdCalibration, calibrate_spike_std
from .estimators import AGR, IWST, ST, BernoulliSpike, Estimator, get_estimator, sample_spikes
from .layers import (
    BayesConv1d,
    BayesConv2d,
    BayesLinear,
    ChannelAffine,
    GaussianPrior,
    is_bayesian,
    scale_mixture_prior,
    share_posterior,
)
from .losses import aux_loss, enable_aux_loss, kl_divergence, sbnn_objective
from .modes import get_mode, mode, set_mode
from .moments import (
    VarianceFlowError,
    attach_variance,
    check_variance_flow,
    get_variance,
    track_variance,
    variance_flow,
)
from .neurons import LIF, LIFState
from .optim import noise_parameters, param_groups
from .spike import IWSTSpike, seed_spikes, spike_seed
from .uncertainty import Prediction, mc_predict

__version__ = "0.1.0"

_inductor_fixes.install()  # a compiled step's gradients (see the module)

__all__ = [
    "AGR", "IWST", "ST", "Estimator", "get_estimator", "BernoulliSpike", "sample_spikes",
    "BayesLinear", "BayesConv1d", "BayesConv2d", "ChannelAffine", "GaussianPrior",
    "scale_mixture_prior", "is_bayesian", "share_posterior",
    "aux_loss", "enable_aux_loss", "kl_divergence", "sbnn_objective",
    "set_mode", "get_mode", "mode", "mc_predict", "Prediction",
    "attach_variance", "get_variance", "track_variance", "variance_flow",
    "check_variance_flow", "VarianceFlowError",
    "LIF", "LIFState", "IWSTSpike", "seed_spikes", "spike_seed", "kernels", "param_groups",
    "noise_parameters", "check_finite", "calibrate_spike_std", "SpikeStdCalibration",
]
